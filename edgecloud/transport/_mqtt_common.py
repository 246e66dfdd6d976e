"""MQTT plumbing shared by the MQTT transport, the cloud workers and the fleet/agent code.

Public (the fleet controller and the device agent reuse them):

- ``BrokerSettings`` / ``parse_broker_url``: ``mqtt://[user:pass@]host[:1883]`` and
  ``mqtts://...[:8883]`` plus TLS files, validated once, so bad configuration fails at startup
  with a ``ConfigError`` instead of inside paho.
- ``make_client``: a paho-mqtt 2.x MQTT 5 client (``CallbackAPIVersion.VERSION2``) with TLS and
  credentials applied.
- ``set_tcp_nodelay``: paho and Mosquitto leave Nagle's algorithm on, which turns a sub-millisecond
  QoS 1 round trip into 40-90 ms (Nagle + delayed ACK); every socket we open gets TCP_NODELAY.
- ``reason_code_error``: an MQTT 5 reason code (CONNACK, PUBACK, SUBACK) as an edgecloud error
  that names the code and its name (``AuthError`` for credential and ACL refusals).
- ``SelectorLoop``: one thread that drives any number of paho clients from one
  ``selectors.DefaultSelector`` (epoll on Linux). paho's own threaded loop uses ``select()``,
  which fails once a file descriptor passes 1024, and paho then reconnects silently forever; a
  process with many connections (1,000 simulated agents, N workers) must not use it.
- ``MqttConnection``: one paho client on a ``SelectorLoop`` that connects, reconnects with capped
  exponential backoff and jitter, resubscribes after every reconnect, and stops for good (with an
  ``AuthError``) when the broker refuses the credentials, where paho would retry forever.

Threading rule: paho callbacks run on the loop thread and must never block; they hand work to
queues or futures. ``publish``/``subscribe`` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import random
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    RemoteError,
    TransportError,
)

__all__ = [
    "AUTH_REASON_CODES",
    "Backoff",
    "BrokerSettings",
    "MqttConnection",
    "PublishProperties",
    "SelectorLoop",
    "default_loop",
    "make_client",
    "parse_broker_url",
    "publish_properties",
    "reason_code_error",
    "reason_name",
    "set_tcp_nodelay",
    "user_properties",
]

log = logging.getLogger("edgecloud.mqtt")

#: Reason codes that mean "you may not": retrying cannot help, so we stop and raise AuthError.
AUTH_REASON_CODES: dict[int, str] = {
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x8A: "Banned",
    0x8C: "Bad authentication method",
}


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect. Build it with ``parse_broker_url``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    tls_insecure: bool = False
    connect_timeout: float = 5.0
    keepalive: int = 30

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca: str | os.PathLike[str] | None = None,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    tls_insecure: bool = False,
    connect_timeout: float = 5.0,
    keepalive: int = 30,
) -> BrokerSettings:
    """Parse ``mqtt://`` / ``mqtts://`` URLs; explicit keyword credentials override the URL's.

    Certificates are checked to exist now, because paho would only fail at connect time with an
    ``ssl`` error that does not name the file.
    """
    try:
        parts = urlsplit(url)
        port_in_url = parts.port
    except ValueError as exc:
        raise ConfigError(f"MQTT broker URL {url!r} is invalid: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"MQTT broker URL {url!r} must start with mqtt:// or mqtts://, got {parts.scheme!r}"
        )
    if not parts.hostname:
        raise ConfigError(f"MQTT broker URL {url!r} has no host")
    tls = parts.scheme == "mqtts" or any(x is not None for x in (ca, certfile))
    if (certfile is None) != (keyfile is None):
        raise ConfigError("MQTT client TLS needs both certfile and keyfile, or neither")
    for what, path in (("ca", ca), ("certfile", certfile), ("keyfile", keyfile)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"MQTT TLS {what} file {os.fspath(path)!r} does not exist")
    if connect_timeout <= 0:
        raise ConfigError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
    return BrokerSettings(
        host=parts.hostname,
        port=port_in_url or (8883 if tls else 1883),
        tls=tls,
        username=username
        if username is not None
        else (unquote(parts.username) if parts.username else None),
        password=password
        if password is not None
        else (unquote(parts.password) if parts.password else None),
        ca=os.fspath(ca) if ca is not None else None,
        certfile=os.fspath(certfile) if certfile is not None else None,
        keyfile=os.fspath(keyfile) if keyfile is not None else None,
        tls_insecure=tls_insecure,
        connect_timeout=connect_timeout,
        keepalive=keepalive,
    )


class _Client(paho.Client):
    """paho's client, closing the TLS socket when the handshake fails.

    paho 2.2 leaves the half-made ``SSLSocket`` to the garbage collector when ``do_handshake``
    raises (wrong CA, refused client certificate), so every reconnect attempt would leak a
    descriptor until a GC pass, with a ResourceWarning. Our SSL contexts always check the host
    name themselves (``check_hostname``) or verify nothing (``tls_insecure``), so paho's extra
    ``match_hostname`` step is not needed here.
    """

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        ctx = self._ssl_context
        if ctx is None:  # pragma: no cover - paho only calls this with TLS configured
            raise ValueError("TLS is not configured")
        ssl_sock = ctx.wrap_socket(
            tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
        )
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock


def make_client(settings: BrokerSettings, client_id: str) -> paho.Client:
    """An MQTT 5 paho client with credentials and TLS applied (not yet connected)."""
    client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.connect_timeout = settings.connect_timeout
    # paho queues unboundedly by default; bound it so a dead broker cannot eat the memory.
    client.max_queued_messages_set(10_000)
    client.max_inflight_messages_set(1_000)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        try:
            ctx = ssl.create_default_context(cafile=settings.ca)
            if settings.certfile and settings.keyfile:
                ctx.load_cert_chain(settings.certfile, settings.keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"MQTT TLS files (ca={settings.ca}, cert={settings.certfile}) unusable: {exc}"
            ) from exc
        if settings.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        client.tls_set_context(ctx)
    return client


def set_tcp_nodelay(sock: Any) -> None:
    """Turn Nagle's algorithm off on a paho socket (plain or TLS); ignore non-TCP sockets."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def reason_name(code: int, packet_type: int | None = None) -> str:
    """The MQTT 5 name of a reason code, e.g. ``0x87 Not authorized``."""
    if code in AUTH_REASON_CODES:
        return AUTH_REASON_CODES[code]
    for pt in (packet_type, PacketTypes.PUBACK, PacketTypes.SUBACK, PacketTypes.CONNACK):
        if pt is None:
            continue
        try:
            return str(ReasonCode(pt, identifier=code).getName())
        except (KeyError, ValueError, TypeError):
            continue
    return "Unknown reason code"


def reason_code_error(
    code: int | ReasonCode, what: str, *, region: str | None = None
) -> TransportError:
    """Translate a failing reason code into ``AuthError`` (refusals) or ``RemoteError``."""
    value = int(code.value) if isinstance(code, ReasonCode) else int(code)
    name = code.getName() if isinstance(code, ReasonCode) else reason_name(value)
    msg = f"{what} refused by the broker: reason code 0x{value:02X} {name}"
    if value in AUTH_REASON_CODES:
        return AuthError(msg, region=region, status=value)
    return RemoteError(msg, region=region, status=value)


def publish_properties() -> Properties:
    """An empty MQTT 5 PUBLISH property set (paho's constructor is untyped)."""
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


_PAHO_INTERNALS = frozenset({"packetType", "types", "names", "properties"})
_FAST_NAMES = frozenset(
    {"ResponseTopic", "CorrelationData", "MessageExpiryInterval", "UserProperty"}
)


class PublishProperties(Properties):
    """PUBLISH properties for the request/response hot path, packed directly.

    paho's ``Properties`` validates each attribute on assignment and packs by scanning all of
    MQTT 5's property names with string operations: about 100 us per request on this machine,
    as much as the rest of a loopback round trip's client work. This subclass takes the four
    properties the inference protocol uses and packs them by the spec (MQTT 5.0 section 2.2.2.2:
    identifier, then a four-byte integer, a two-byte-length string or binary, or a string pair).
    Anything else set on it later is packed by paho's own code.
    """

    def __init__(
        self,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        message_expiry: int | None = None,
        user: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        d = self.__dict__
        if response_topic is not None:
            d["ResponseTopic"] = response_topic
        if correlation_data is not None:
            d["CorrelationData"] = correlation_data
        if message_expiry is not None:
            if not 0 <= message_expiry < 2**32:
                raise ConfigError(f"message expiry {message_expiry}s is out of range")
            d["MessageExpiryInterval"] = message_expiry
        if user:
            d["UserProperty"] = list(user)

    def pack(self) -> bytes:
        d = self.__dict__
        if not set(d) - _PAHO_INTERNALS <= _FAST_NAMES:
            return bytes(super().pack())  # type: ignore[no-untyped-call]
        buf = bytearray()
        if "MessageExpiryInterval" in d:
            buf += b"\x02" + int(d["MessageExpiryInterval"]).to_bytes(4, "big")
        if "ResponseTopic" in d:
            buf += b"\x08" + _utf(d["ResponseTopic"].encode())
        if "CorrelationData" in d:
            buf += b"\x09" + _utf(bytes(d["CorrelationData"]))
        for k, v in d.get("UserProperty", ()):
            buf += b"\x26" + _utf(k.encode()) + _utf(v.encode())
        return _varint(len(buf)) + bytes(buf)


def user_properties(props: Properties | None) -> dict[str, str]:
    """MQTT 5 user properties as a dict (last value wins for a repeated key)."""
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter: ``uniform(base, min(cap, base * 2**n))``.

    Jitter keeps a thousand devices from reconnecting in lock step after a broker restart.
    """

    base: float = 0.1
    cap: float = 10.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        hi = min(self.cap, self.base * (2 ** min(attempt, 30)))
        return (rng or random).uniform(min(self.base, hi), hi)


# --------------------------------------------------------------------------------------------
# the selector loop
# --------------------------------------------------------------------------------------------
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
        self._writing: set[Any] = set()  # sockets registered for EVENT_WRITE
        self._running = True
        self._pool = ThreadPoolExecutor(connect_workers, thread_name_prefix=f"{name}-connect")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------------------------
    def attach(self, client: paho.Client) -> None:
        """Let this loop drive ``client``'s sockets (call before ``connect``)."""
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
            if client.socket() is not sock:  # type: ignore[comparison-overlap]  # closed again before we got here
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
            with contextlib.suppress(Exception):
                c.disconnect()
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
            log.exception("MQTT client %s: error while handling its socket", client._client_id)


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


# --------------------------------------------------------------------------------------------
# one managed connection
# --------------------------------------------------------------------------------------------
MessageHandler = Callable[[paho.MQTTMessage], None]
StateListener = Callable[[bool, "TransportError | None"], None]


class MqttConnection:
    """One broker connection that stays up: reconnects with backoff, resubscribes, never blocks.

    ``on_message`` and ``on_state(connected, error)`` run on the loop thread and must not block.
    ``start(timeout)`` waits for the first CONNACK and raises ``AuthError`` (refused credentials,
    reason code named) or ``ConnectionFailed`` (unreachable, TLS failure, or no CONNACK in time;
    it keeps retrying in the background). After a refused CONNACK the connection stops for good;
    paho alone would retry forever. ``publish`` fails fast with ``ConnectionFailed`` while the
    connection is down: callers decide whether to queue.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        on_message: MessageHandler | None = None,
        on_state: StateListener | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        will: tuple[str, bytes, int, bool] | None = None,
        backoff: Backoff = Backoff(),
        loop: SelectorLoop | None = None,
        region: str | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.region = region
        self._loop = loop or default_loop()
        self._on_message_cb = on_message
        self._on_state = on_state
        self._subs: dict[str, int] = dict(subscriptions)
        self._backoff = backoff
        self._attempt = 0
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._first_result = threading.Event()
        self._closing = False
        self.fatal: TransportError | None = None
        self.last_error: TransportError | None = None
        self._cond = threading.Condition()
        self._state_cond = threading.Condition()
        self._subacks: dict[int, ReasonCode] = {}
        self._early_acks: dict[int, ReasonCode] = {}
        self._publish_cbs: dict[int, Callable[[ReasonCode], None]] = {}
        self.client = make_client(settings, client_id)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_subscribe = self._handle_suback
        self.client.on_publish = self._handle_puback
        self._loop.attach(self.client)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float | None = None, *, wait: bool = True) -> MqttConnection:
        """Connect; with ``wait`` block until the first CONNACK or ``timeout``."""
        s = self.settings
        self.client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=True)
        self._loop.run_blocking(self._reconnect)
        if wait:
            self.wait_connected(timeout if timeout is not None else s.connect_timeout + 1.0)
        return self

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait until the first connect attempt has an outcome; True when connected."""
        self._first_result.wait(timeout)
        return self.connected

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise the refusal or failure that kept us from it."""
        deadline = time.monotonic() + timeout
        with self._state_cond:
            while not self._connected.is_set() and self.fatal is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._state_cond.wait(left)
        if self._connected.is_set():
            return
        if self.fatal is not None:
            raise self.fatal
        err = self.last_error
        raise ConnectionFailed(
            f"no MQTT connection to {self.settings.url} within {timeout:.1f}s"
            + (f": {err}" if err else ""),
            region=self.region,
        ) from err

    def close(self) -> None:
        self._closing = True
        self._connected.clear()
        with contextlib.suppress(Exception):
            self.client.disconnect()

    # -- publish / subscribe (any thread) ------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        on_ack: Callable[[ReasonCode], None] | None = None,
    ) -> int:
        """Queue a message; ``on_ack(reason_code)`` runs on the loop thread at PUBACK (QoS 1)."""
        if not self.connected:
            raise self.fatal or ConnectionFailed(
                f"MQTT connection to {self.settings.url} is down", region=self.region
            )
        # Never hold our lock across a paho call: paho's own mutexes are held while it runs our
        # callbacks on the loop thread, so that order would deadlock.
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionFailed(
                f"publish to {topic!r} failed: {paho.error_string(info.rc)}", region=self.region
            )
        if on_ack is not None and qos > 0:
            with self._lock:
                early = self._early_acks.pop(info.mid, None)
                if early is None:
                    self._publish_cbs[info.mid] = on_ack
            if early is not None:
                on_ack(early)
        return int(info.mid)

    def subscribe(self, topic: str, qos: int = 1, *, timeout: float = 5.0) -> None:
        """Subscribe now and after every reconnect; raise ``AuthError`` on SUBACK 0x87."""
        self._subs[topic] = qos
        if not self.connected:
            return  # on_connect subscribes
        rc, mid = self.client.subscribe(topic, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionFailed(
                f"subscribe to {topic!r} failed: {paho.error_string(rc)}", region=self.region
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionFailed(
                        f"no SUBACK for {topic!r} within {timeout}s", region=self.region
                    )
                self._cond.wait(left)
            code = self._subacks.pop(mid)
        if code.is_failure:
            self._subs.pop(topic, None)
            raise reason_code_error(code, f"subscription to {topic!r}", region=self.region)

    # -- internals ---------------------------------------------------------------------------
    def _reconnect(self) -> None:
        """Runs in the loop's connect pool: one blocking TCP (+TLS) connect attempt."""
        if self._closing or self.fatal is not None:
            return
        try:
            rc = self.client.reconnect()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise OSError(paho.error_string(rc))
        except ssl.SSLError as exc:
            self._connect_failed(
                ConnectionFailed(f"TLS handshake with {self.settings.url} failed: {exc}")
            )
        except (OSError, ValueError) as exc:
            self._connect_failed(
                ConnectionFailed(
                    f"cannot connect to MQTT broker {self.settings.url}: {exc}", region=self.region
                )
            )

    def _connect_failed(self, err: TransportError) -> None:
        self.last_error = err
        self._first_result.set()
        with self._state_cond:
            self._state_cond.notify_all()
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._closing or self.fatal is not None:
            return
        delay = self._backoff.delay(self._attempt)
        self._attempt += 1
        log.debug("MQTT %s: reconnect in %.2fs", self.client_id, delay)
        self._loop.call_later(delay, lambda: self._loop.run_blocking(self._reconnect))

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if rc.is_failure:
            err = reason_code_error(rc, f"connection to {self.settings.url}", region=self.region)
            self.last_error = err
            if isinstance(err, AuthError):
                log.error("MQTT %s: %s; giving up (retrying cannot help)", self.client_id, err)
                self.fatal = err
                self._closing = True
            self._first_result.set()
            self._notify(False, err)
            return
        self._attempt = 0
        self.last_error = None
        for topic, qos in self._subs.items():
            client.subscribe(topic, qos=qos)
        self._connected.set()
        self._first_result.set()
        self._notify(True, None)

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        err = ConnectionFailed(
            f"MQTT connection to {self.settings.url} lost ({rc})", region=self.region
        )
        if was or self.last_error is None:
            self.last_error = err
        self._first_result.set()  # a first attempt that ended in a disconnect is an outcome too
        self._notify(False, err)
        with self._lock:
            self._publish_cbs.clear()
        if not self._closing and self.fatal is None:
            self._schedule_reconnect()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message_cb is not None:
            self._on_message_cb(msg)

    def _handle_suback(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        code = codes[0] if codes else ReasonCode(PacketTypes.SUBACK, identifier=0x80)
        if code.is_failure:
            log.warning(
                "MQTT %s: a subscription was refused: 0x%02X %s",
                self.client_id,
                code.value,
                code.getName(),
            )
        with self._cond:
            self._subacks[mid] = code
            while len(self._subacks) > 256:
                self._subacks.pop(next(iter(self._subacks)))
            self._cond.notify_all()

    def _handle_puback(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        with self._lock:
            cb = self._publish_cbs.pop(mid, None)
            if cb is None and rc.is_failure:
                # PUBACK beat the publisher's registration; keep refusals for it (bounded).
                self._early_acks[mid] = rc
                while len(self._early_acks) > 1024:
                    self._early_acks.pop(next(iter(self._early_acks)))
        if cb is not None:
            cb(rc)

    def _notify(self, up: bool, err: TransportError | None) -> None:
        with self._state_cond:
            self._state_cond.notify_all()
        if self._on_state is not None:
            try:
                self._on_state(up, err)
            except Exception:
                log.exception("MQTT state listener failed")
