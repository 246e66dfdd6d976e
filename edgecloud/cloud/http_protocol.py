"""The region's connection layer under uvicorn: what h11 and asyncio need to hold the ``Limits``.

uvicorn's own protocol times out nothing but keep-alive, starts a task for every connection
and answers refusals in plain text; the region needs header, idle and request deadlines, a
connection cap that fits the process's file limit, canned V2 JSON errors for what it refuses
before a request exists, write coalescing (one send per small response) and parser warnings
at a bounded rate. ``edgecloud.cloud.server`` (routes, V2 bodies, auth, metrics) builds its
``CloudServer`` from these.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from typing import Any

from edgecloud.limits import DEFAULT_LIMITS, Limits
from edgecloud.transport.v2 import encode_error

#: The header naming the region in every reply, canned ones included.
REGION_HEADER = "X-Edgecloud-Region"

__all__ = [
    "REGION_HEADER",
    "WriteCoalescer",
    "accept_backlog",
    "connection_cap",
    "http_protocol",
    "limit_parser_warnings",
    "server_class",
]

log = logging.getLogger(__name__)


class WriteCoalescer:
    """An asyncio transport proxy that sends everything written in one loop iteration at once.

    uvicorn writes a response's status line and headers, then its body, as two ``write`` calls:
    two send syscalls and two TCP segments for every small V2 response, roughly a sixth of the
    server's CPU per request on loopback. Buffering until the end of the current loop iteration
    joins them without delaying anything past that iteration.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(bytes(data))

    def _flush(self) -> None:
        if not self._buffer:
            return
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _canned(status: int, message: str, region: str) -> bytes:
    """A complete V2 error response for the protocol layer, which runs before the app."""
    body = encode_error(message)
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{REGION_HEADER}: {region}\r\n\r\n"
    )
    return head.encode("latin-1") + body


_FD_RESERVE = 64  # files the process needs besides connections (models, logs, the loop)


def accept_backlog() -> int:
    """The listen backlog, which asyncio also uses as the most connections accepted at once."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 2048
    return max(16, min(2048, (soft - _FD_RESERVE) // 8))


def connection_cap(limits: Limits) -> int:
    """``limits.max_connections``, lowered to fit the process's open-file limit.

    Past ``RLIMIT_NOFILE`` accept() fails and the server stops answering anyone ("Too many open
    files"). asyncio accepts up to a backlog's worth of connections before any of them runs its
    ``connection_made`` (where the cap evicts), so the cap leaves room for a few such bursts.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(8, min(limits.max_connections, soft - _FD_RESERVE - 3 * accept_backlog()))


def http_protocol(limits: Limits = DEFAULT_LIMITS, region: str = "local") -> Any:
    """uvicorn's httptools protocol with coalesced writes and the connection ``limits``.

    uvicorn arms no timer before a connection's first request and none while a request is being
    received, so an idle or half-sent connection would be held forever. This protocol adds:

    - idle: a connection that has not started a request within ``idle_timeout_s`` is closed
      (uvicorn's own keep-alive timer does the same between requests);
    - header/request: a started request whose headers take over ``header_timeout_s``, or whose
      headers and body take over ``request_timeout_s``, gets a 408 V2 error and is closed;
    - headers over ``max_header_bytes``: 431;
    - connections over the cap: the longest-idle connection is closed to make room; when every
      connection is busy the new one gets 503;
    - HTTP the parser rejects: a 400 V2 error body instead of uvicorn's plain text.

    "auto" (uvicorn's choice, without these guards) when httptools is missing.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"
    cap = connection_cap(limits)

    class _GuardedHttpToolsProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _phase = "idle"  # idle | headers | body | busy
        _idle_since = 0.0
        _started = 0.0
        _header_bytes = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(WriteCoalescer(transport, self.loop))  # type: ignore[arg-type]
            self._to_idle()
            if len(self.connections) > cap:
                self._make_room()

        def _make_room(self) -> None:
            # Connections closed in this loop iteration are still in the set until their
            # connection_lost runs: count (and evict) only the live ones.
            live: list[Any] = [c for c in self.connections if getattr(c, "_phase", "") != "closed"]
            excess = len(live) - cap
            if excess <= 0:
                return
            idle = sorted(
                (c for c in live if c is not self and getattr(c, "_phase", "") == "idle"),
                key=lambda c: float(c._idle_since),
            )
            for victim in idle[:excess]:
                victim._disarm("closed")
                victim.transport.close()  # idle: nothing was asked, nothing to answer
            if len(idle) < excess:
                self._refuse(503, f"the server has {cap} busy connections; retry later")

        def _arm(self, seconds: float, phase: str) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._phase = phase
            self._timer = self.loop.call_later(max(0.0, seconds), self._expired)

        def _disarm(self, phase: str) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._phase = phase

        def _to_idle(self) -> None:
            self._idle_since = self.loop.time()
            self._arm(limits.idle_timeout_s, "idle")

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._phase == "idle":
                self.transport.close()
            elif self._phase == "headers":
                self._refuse(408, f"request headers not received within {limits.header_timeout_s}s")
            elif self._phase == "body":
                self._refuse(408, f"request not received within {limits.request_timeout_s}s")

        def _refuse(self, status: int, message: str) -> None:
            self._disarm("closed")
            if not self.transport.is_closing():
                self.transport.write(_canned(status, message, region))
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._refuse(400, f"malformed HTTP request: {msg}")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm("closed")
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._started = self.loop.time()
            self._header_bytes = 0
            self._arm(limits.header_timeout_s, "headers")

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self._count_header(len(url))

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            self._count_header(len(name) + len(value) + 4)

        def _count_header(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > limits.max_header_bytes and self._phase == "headers":
                self._refuse(
                    431, f"request line and headers exceed {limits.max_header_bytes} bytes"
                )

        def on_headers_complete(self) -> None:
            if self._phase == "closed":
                return
            left = limits.request_timeout_s - (self.loop.time() - self._started)
            self._arm(left, "body")
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._phase != "closed":  # refused: what follows is not parsed
                super().data_received(data)

        def on_body(self, body: bytes) -> None:
            if self._phase != "closed":
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._phase == "closed":
                return
            self._disarm("busy")
            super().on_message_complete()

        def on_response_complete(self) -> None:
            if self._phase in ("headers", "body"):
                # Answered before the request was fully received (e.g. 413 on Content-Length):
                # what follows on this connection is the rest of that body, not a request.
                self._disarm("closed")
                self.transport.close()
                return
            super().on_response_complete()
            if self._phase == "busy" and not self.transport.is_closing():
                # uvicorn armed its keep-alive timer; this one marks the connection evictable.
                self._disarm("idle")
                self._idle_since = self.loop.time()

    return _GuardedHttpToolsProtocol


class _ParserWarningFilter(logging.Filter):
    """At most ``per_minute`` of uvicorn's "Invalid HTTP request received." lines a minute.

    uvicorn logs one warning per request its parser rejects, so a client could grow the log at
    will; the rest are dropped (and the count of them said on the next line let through).
    """

    def __init__(self, per_minute: int) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._start = 0.0
        self._logged = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Invalid HTTP request"):
            return True
        now = time.monotonic()
        if now - self._start >= 60.0:
            self._start, self._logged = now, 0
        if self._logged >= self.per_minute:
            self._dropped += 1
            return False
        self._logged += 1
        if self._dropped:
            record.msg = f"{record.msg} ({self._dropped} similar messages suppressed)"
            self._dropped = 0
        return True


def limit_parser_warnings(per_minute: int) -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _ParserWarningFilter) for f in logger.filters):
        logger.addFilter(_ParserWarningFilter(per_minute))


def server_class(uvicorn: Any) -> Any:
    """uvicorn's Server, closing every connection still open when its shutdown is done.

    uvicorn asks each connection to finish and cancels what outlives the graceful timeout, but it
    leaves those connections' sockets open when its loop ends (a client that never finished its
    request, a connection refused mid-body): in a process that stops and starts servers, as an
    embedding application or a test suite does, they stay open until garbage collection.
    """

    class _Server(uvicorn.Server):  # type: ignore[misc,name-defined]
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            left = list(self.server_state.connections)
            for conn in left:
                transport = getattr(conn, "transport", None)
                if transport is not None:
                    transport.abort()
            if left:
                await asyncio.sleep(0)  # let the aborted transports run connection_lost

    return _Server
