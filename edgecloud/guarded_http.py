"""The standard library's HTTP server, bounded: the device agent's endpoint and the fleet API.

``http.server`` sets one socket timeout per read, so a client that drips a byte a second holds
a handler thread forever, and ``ThreadingMixIn`` starts a thread for every connection. These
classes add, from one ``Limits`` value:

- a deadline per request, not per read: ``idle_timeout_s`` to start a request (then the
  connection is closed without a reply: nothing was asked), ``header_timeout_s`` for the request
  line and headers and ``request_timeout_s`` for the whole request, past which the client gets
  a 408 error body and the connection is closed;
- connections wait for a request without a thread (``GuardedServerMixin``): at most
  ``max_threads`` handler threads serve requests, idle connections cost a file descriptor only,
  and beyond ``max_connections`` the longest-idle one is closed;
- JSON error bodies (``{"error": "..."}``) for everything the stdlib would answer in HTML:
  unknown methods (405), malformed request lines (400), oversized headers (431), and a 500
  (logged at most ``log_per_minute`` times a minute) for a handler's own bug.

A ``GuardedHandler`` subclass implements ``do_GET`` and friends as usual; the request deadline
covers every read of the body, so handlers need no timeouts of their own.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import selectors
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from edgecloud.limits import DEFAULT_LIMITS, Limits, RateLimitedLog

__all__ = ["GuardedHandler", "GuardedServerMixin", "GuardedThreadingHTTPServer"]

log = logging.getLogger("edgecloud.http")
_bugs = RateLimitedLog(log, DEFAULT_LIMITS.log_per_minute)


class _DeadlineReader(io.RawIOBase):
    """Socket reads that share the handler's current deadline instead of a timeout each."""

    def __init__(self, sock: socket.socket, handler: GuardedHandler) -> None:
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(b)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class GuardedHandler(BaseHTTPRequestHandler):
    """A handler whose reads are bounded by the request's deadline; errors are JSON bodies."""

    protocol_version = "HTTP/1.1"
    limits: Limits = DEFAULT_LIMITS
    deadline: float = 0.0
    _phase = "idle"
    _replied = False

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self._reader = io.BufferedReader(_DeadlineReader(self.connection, self), 64 * 1024)
        self.rfile = self._reader

    park = False  # set when the connection should wait for its next request without a thread

    def handle(self) -> None:
        """Serve this connection's pending requests, then hand it back to be parked."""
        while True:
            self.handle_one_request()
            if self.close_connection:
                return
            # Pipelined bytes already buffered are served now; otherwise park the connection.
            self.deadline = 0.0
            try:
                pending = bool(self._reader.peek(1))
            except (TimeoutError, OSError):
                pending = False
            if not pending:
                self.park = True
                return

    def handle_one_request(self) -> None:
        lim = self.limits
        self._phase, self._replied = "idle", False
        # What send_error needs even when the request line never arrived.
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.1"
        self.headers = None  # type: ignore[assignment]
        self.deadline = time.monotonic() + lim.idle_timeout_s
        self.close_connection = True
        try:
            if not self._reader.peek(1):
                return  # the client closed the connection
            start = time.monotonic()
            self._phase = "headers"
            self.deadline = start + lim.header_timeout_s
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
                return
            if not self.raw_requestline:
                return
            if not self.parse_request():  # headers are read here; it answers its own errors
                return
            self._phase = "body"
            self.deadline = start + lim.request_timeout_s
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                # 405, not the stdlib's 501: a client's bad request is never a server error.
                self.send_error(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"method {self.command[:20]!r} is not supported here",
                )
                return
            # Writes (a reply, a long download) get a per-send timeout; reads keep the deadline.
            self.connection.settimeout(lim.request_timeout_s)
            try:
                method()
            except (TimeoutError, ConnectionError):
                raise
            except Exception as exc:  # a handler's bug: a 500 body, never a silent close
                if _bugs.warning("internal", "%s %s failed", self.command, self.path[:200]):
                    log.error("handler failed", exc_info=exc)
                if not self._replied:
                    self.send_error(500, f"internal error: {exc.__class__.__name__}")
                self.close_connection = True
            self.wfile.flush()
        except TimeoutError:
            if self._phase != "idle" and not self._replied:
                what = "headers" if self._phase == "headers" else "request"
                limit = lim.header_timeout_s if self._phase == "headers" else lim.request_timeout_s
                try:
                    self.send_error(
                        HTTPStatus.REQUEST_TIMEOUT, f"{what} not received within {limit}s"
                    )
                except OSError:
                    pass
            self.close_connection = True
        except (ConnectionError, OSError):
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        self._replied = True
        if getattr(self, "request_version", "HTTP/0.9") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.1"  # always a status line, never a bare body
        super().send_response(code, message)
        if code >= 400 and not self.close_connection and self._has_body():
            # The handler may not have read the body; its bytes must not be parsed as the
            # next request, so the connection ends here, and the client is told.
            self.close_connection = True
            self.send_header("Connection", "close")

    def _has_body(self) -> bool:
        headers = getattr(self, "headers", None)
        if headers is None:
            return False
        return bool(headers.get("Transfer-Encoding")) or headers.get("Content-Length", "0") not in (
            "0",
            "",
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A JSON error body instead of the stdlib's HTML page; the connection is closed.

        The stdlib answers an HTTP/2 preface or HTTP/3.0 request line with 505; a client's
        malformed request is a 400 here, never a 5xx.
        """
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = HTTPStatus.BAD_REQUEST
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = _error_body(message or explain or phrase)
        self.close_connection = True
        self.send_response(code, phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", "") != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class GuardedServerMixin:
    """Connections wait for their next request without a thread; ``max_threads`` serve them.

    ``ThreadingMixIn`` gives every connection a thread for its whole life, so idle keep-alive
    connections (or a few hundred opened on purpose) use up the threads and memory. Here an
    accepted connection is *parked* in a selector; when it becomes readable it is queued for one
    of ``max_threads`` handler threads, which serves the request (and any pipelined ones) and
    parks the connection again. Parked connections older than ``idle_timeout_s`` are closed, and
    beyond ``max_connections`` the oldest parked one is closed to make room. When the queue of
    readable connections is longer than ``4 * max_threads`` the newest gets a 503 at once.
    """

    limits: Limits = DEFAULT_LIMITS
    _guard: _Guard

    def process_request(self, request: Any, client_address: Any) -> None:
        guard = self.__dict__.get("_guard")
        if guard is None:
            guard = self._guard = _Guard(self)
        guard.park(request, client_address)

    def server_close(self) -> None:
        guard = self.__dict__.get("_guard")
        if guard is not None:
            guard.close()
        super().server_close()  # type: ignore[misc]


class _Guard:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.limits: Limits = server.limits
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._parked: dict[Any, tuple[Any, float]] = {}  # socket -> (address, parked at)
        self._ready: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._threads: list[threading.Thread] = []  # started as needed, up to max_threads
        self._idle_workers = 0
        self._poller = threading.Thread(target=self._poll, name="http-parker", daemon=True)
        self._poller.start()

    def park(self, request: Any, address: Any) -> None:
        with self._lock:
            if self._closing:
                self.server.shutdown_request(request)
                return
            self._parked[request] = (address, time.monotonic())
            self._sel.register(request, selectors.EVENT_READ)
            victim = None
            if len(self._parked) > self.limits.max_connections:
                victim = min(self._parked, key=lambda s: self._parked[s][1])
                self._unpark(victim)
        if victim is not None:
            self.server.shutdown_request(victim)  # idle: nothing was asked, nothing to answer
        try:
            self._wake_w.send(b"x")
        except OSError:  # closed meanwhile
            pass

    def _unpark(self, sock: Any) -> None:
        self._parked.pop(sock, None)
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _poll(self) -> None:
        while not self._closing:
            try:
                events = self._sel.select(timeout=0.5)
            except (OSError, ValueError):
                events = []
            expired: list[Any] = []
            with self._lock:
                now = time.monotonic()
                for key, _ in events:
                    if key.fileobj is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        continue
                    sock = key.fileobj
                    entry = self._parked.get(sock)
                    if entry is None:
                        continue
                    self._unpark(sock)
                    if self._ready.qsize() >= 4 * self.limits.max_threads:
                        _refuse(sock, self.limits)
                        expired.append(sock)
                    else:
                        self._dispatch(sock, entry[0])
                for sock, (_addr, since) in list(self._parked.items()):
                    if now - since > self.limits.idle_timeout_s:
                        self._unpark(sock)
                        expired.append(sock)
            for sock in expired:
                self.server.shutdown_request(sock)

    def _dispatch(self, sock: Any, address: Any) -> None:
        """Queue a readable connection; start a handler thread when none is free (under lock)."""
        if self._idle_workers <= self._ready.qsize() and len(self._threads) < (
            self.limits.max_threads
        ):
            t = threading.Thread(
                target=self._work, name=f"http-worker-{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
            self._idle_workers += 1
            t.start()
        self._ready.put((sock, address))

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            with self._lock:
                self._idle_workers -= 1
            if item is None or self._closing:
                if item is not None:
                    self.server.shutdown_request(item[0])
                return
            sock, address = item
            keep = False
            try:
                handler = self.server.RequestHandlerClass(sock, address, self.server)
                keep = bool(getattr(handler, "park", False))
            except Exception:
                self.server.handle_error(sock, address)
            if keep and not self._closing:
                self.park(sock, address)
            else:
                self.server.shutdown_request(sock)
            with self._lock:
                self._idle_workers += 1

    def close(self) -> None:
        with self._lock:
            self._closing = True
            parked = list(self._parked)
            for sock in parked:
                self._unpark(sock)
        for sock in parked:
            self.server.shutdown_request(sock)
        # Connections already queued for a handler thread are closed here: a worker that sees
        # ``_closing`` takes one item and exits, so with fewer threads than queued connections
        # the rest would only be closed by the garbage collector (a ResourceWarning, an fd held).
        while True:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.server.shutdown_request(item[0])
        for _ in range(len(self._threads)):
            self._ready.put(None)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._poller is not threading.current_thread():
            self._poller.join(timeout=2)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


def _refuse(sock: Any, limits: Limits) -> None:
    body = _error_body(f"{limits.max_threads} requests are already being served; retry later")
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    )
    try:
        sock.settimeout(1.0)
        sock.sendall(head.encode() + body)
    except OSError:
        pass


class GuardedThreadingHTTPServer(GuardedServerMixin, HTTPServer):
    """``HTTPServer`` whose connections are served by the guarded, parked thread pool."""

    request_queue_size = 128
