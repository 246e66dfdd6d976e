"""One thread that drives any number of paho clients from one ``selectors.DefaultSelector``.

paho's own threaded loop uses ``select()``, which fails once a file descriptor passes 1024, and
paho then reconnects silently forever; a process with many connections (1,000 simulated agents,
N workers) must not use it. Threading rule: paho callbacks run on this loop's thread and must
never block; they hand work to queues or futures.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as paho

from edgecloud.mqtt.client import set_tcp_nodelay

__all__ = ["SelectorLoop", "default_loop"]

log = logging.getLogger("edgecloud.mqtt")


class SelectorLoop:
    """Drives many paho clients from one thread and one ``selectors.DefaultSelector``.

    Attach a client with ``attach(client)`` *before* connecting it: the loop installs paho's
    ``on_socket_open/close/register_write/unregister_write`` callbacks, so every socket the
    client opens (first connect and reconnects) is registered here, and writes queued from any
    thread wake the loop. ``call_later`` runs small callables on the loop thread (reconnect
    timers); blocking work such as a TCP/TLS connect goes to ``run_blocking``, a small pool, so
    one slow broker does not stall every other client.

    Failure mode: an exception in one client's callbacks is logged and that client goes on; the
    loop itself never stops until ``stop()``.
    """

    MISC_INTERVAL = 0.5

    def __init__(self, name: str = "edgecloud-mqtt-loop", connect_workers: int = 4) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._ops: list[Callable[[], None]] = []
        self._ops_lock = threading.Lock()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._clients: set[paho.Client] = set()
        self._names: weakref.WeakKeyDictionary[paho.Client, str] = weakref.WeakKeyDictionary()
        self._writing: set[Any] = set()  # sockets registered for EVENT_WRITE
        self._running = True
        self._pool = ThreadPoolExecutor(connect_workers, thread_name_prefix=f"{name}-connect")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------------------------
    def attach(self, client: paho.Client, name: str = "") -> None:
        """Let this loop drive ``client``'s sockets (call before ``connect``)."""
        self._names[client] = name or "?"
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_want_write
        client.on_socket_unregister_write = self._on_no_write

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (immediately when already on it)."""
        if threading.current_thread() is self._thread:
            fn()
            return
        with self._ops_lock:
            self._ops.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        when = time.monotonic() + max(0.0, delay)
        self.call_soon(lambda: heapq.heappush(self._timers, (when, next(self._seq), fn)))

    def run_blocking(self, fn: Callable[[], object]) -> None:
        """Run blocking work (a connect) off the loop thread."""
        if self._running:
            self._pool.submit(self._guard, fn)

    @property
    def clients(self) -> int:
        """How many client sockets are registered right now."""
        return len(self._clients)

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        self._running = False
        self._wake()
        if not self.in_loop():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- paho socket callbacks (any thread) ------------------------------------------------
    def _on_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        set_tcp_nodelay(sock)
        fobj: Any = sock

        def register() -> None:
            if client.socket() is not sock:  # closed again before we got here
                return
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.register(fobj, selectors.EVENT_READ, client)
                self._clients.add(client)
                if client.want_write():
                    self._sel.modify(fobj, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                    self._writing.add(fobj)

        self.call_soon(register)

    def _on_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Called just before paho closes the socket: unregister now while the fd is still ours.
        def unregister() -> None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sock)
            self._clients.discard(client)
            self._writing.discard(sock)

        if self.in_loop():
            unregister()
        else:
            # The fd must not be reused before we unregister it: do it synchronously under the
            # ops lock from the foreign thread; epoll tolerates concurrent ctl calls.
            with self._ops_lock, contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sock)

            def forget() -> None:
                self._clients.discard(client)
                self._writing.discard(sock)

            self.call_soon(forget)

    def _on_want_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fobj: Any = sock

        def flush() -> None:
            if client.socket() is not sock:
                return
            # A socket is nearly always writable: write now instead of asking epoll first, which
            # saves one loop round per publish. Only a partial write waits for EVENT_WRITE.
            client.loop_write()
            self._ensure_write_interest(client, fobj)

        # Never write re-entrantly from inside paho (this runs within its packet queueing):
        # queue the flush for the loop thread, after the current event.
        with self._ops_lock:
            self._ops.append(flush)
        if not self.in_loop():
            self._wake()

    def _on_no_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fobj: Any = sock

        def no_want() -> None:
            if fobj in self._writing:
                self._writing.discard(fobj)
                if client.socket() is sock:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        self._sel.modify(fobj, selectors.EVENT_READ, client)

        self.call_soon(no_want)

    def _ensure_write_interest(self, client: paho.Client, sock: Any) -> None:
        """Watch for writability whenever paho still holds outgoing bytes.

        paho's register-write callback fires only when its ``_registered_write`` flag flips, and
        a publish from another thread that lands while this thread is inside ``loop_write`` sees
        the flag still set and fires nothing; without this check that packet would wait for the
        next unrelated event (up to a keepalive).
        """
        if sock is None or client.socket() is not sock or sock in self._writing:
            return
        if client.want_write():
            fobj: Any = sock
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.modify(fobj, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                self._writing.add(fobj)

    # -- the loop --------------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def _guard(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            log.exception("MQTT loop task failed")

    def _run(self) -> None:
        next_misc = time.monotonic() + self.MISC_INTERVAL
        while self._running:
            now = time.monotonic()
            timeout = next_misc - now
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - now)
            if self._ops:
                timeout = 0.0  # work queued by the loop thread itself during the last round
            try:
                events = self._sel.select(max(0.0, timeout))
            except OSError:
                log.exception("selector failed")
                time.sleep(0.05)
                continue
            for key, mask in events:
                client = key.data
                if client is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(65536)
                    continue
                self._service(client, key.fileobj, mask)
            with self._ops_lock:
                ops, self._ops = self._ops, []
            for op in ops:
                self._guard(op)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                self._guard(fn)
            if now >= next_misc:
                next_misc = now + self.MISC_INTERVAL
                for c in list(self._clients):
                    self._guard(c.loop_misc)
                    self._ensure_write_interest(c, c.socket())
        for c in list(self._clients):
            # A client still open when the loop stops: say goodbye and close its socket here,
            # since no loop will write the DISCONNECT (paho closes the socket once written).
            with contextlib.suppress(Exception):
                c.disconnect()
                c.loop_write()
            sock = c.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _service(self, client: paho.Client, sock: Any, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and client.socket() is sock:
                client.loop_read()
                # TLS may hold decrypted bytes that epoll cannot see.
                while client.socket() is sock and getattr(sock, "pending", lambda: 0)() > 0:
                    client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is sock:
                client.loop_write()
            self._ensure_write_interest(client, sock)
        except Exception:
            log.exception(
                "MQTT client %s: error while handling its socket", self._names.get(client, "?")
            )


_default_loop: SelectorLoop | None = None
_default_lock = threading.Lock()


def _forget_loop_after_fork() -> None:
    # The loop's thread does not survive fork(); a child starts its own on first use.
    global _default_loop, _default_lock
    _default_loop = None
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_loop_after_fork)


def default_loop() -> SelectorLoop:
    """The process-wide loop (started on first use; a forked child gets a fresh one)."""
    global _default_loop
    with _default_lock:
        if _default_loop is None or not _default_loop._running:
            _default_loop = SelectorLoop()
        return _default_loop
