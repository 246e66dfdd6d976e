"""The cloud region's HTTP face: KServe V2 (Open Inference Protocol) REST on Starlette + uvicorn.

Everything model-related is the ``ServingCore``'s job; this module only speaks HTTP: routes, the
binary tensor data extension, V2 error bodies with their status codes, the ``Limits`` (body and
JSON bytes, JSON depth, rows, concurrent large decodes, connections, header/idle/request
timeouts, log rate), optional bearer-token auth, the demo's artificial latency and Prometheus
metrics. Starlette, uvicorn
and prometheus-client (extra ``cloud``) are imported by the functions that build the app, never at
module import, so a device that has only ``edgecloud`` can still import this module.

Endpoints (supported subset documented in docs/protocol.md):

    GET  /v2/health/live            200 while the process runs            (no auth)
    GET  /v2/health/ready           200 when every model is loaded, else 400 (no auth)
    GET  /v2                        server metadata
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    200 / 400 / 404
    POST /v2/models/{m}[/versions/{v}]/infer    JSON or binary tensor data
    GET  /metrics                   Prometheus text format
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import resource
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from edgecloud import __version__ as _edgecloud_version
from edgecloud.cloud.core import BatchEvent, ServingCore, status_for
from edgecloud.deps import require
from edgecloud.errors import ConfigError, EdgeCloudError, ProtocolError
from edgecloud.limits import (
    DEFAULT_LIMITS,
    LimitExceeded,
    Limits,
    RateLimitedLog,
    check_rows,
    parse_decimal,
    release_memory,
)
from edgecloud.transport.v2 import (
    HEADER_LENGTH,
    binary_outputs_requested,
    decode_request,
    encode_error,
    encode_response_mixed,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "CloudServer", "create_app", "encode_response_mixed"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = DEFAULT_LIMITS.max_body_bytes
REGION_HEADER = "X-Edgecloud-Region"
_OFFLOAD_BYTES = 256 * 1024  # bodies above this are decoded/encoded off the event loop
_MAX_TIMEOUT_US = 86_400 * 1e6  # a request's own "timeout" parameter, capped at a day
# The infer routes, matched before Starlette's middleware and router (see create_app).
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

Handler = Callable[["Request"], Awaitable["Response"]]


class _TooLarge(EdgeCloudError):
    pass


def _request_deadline(value: Any) -> float | None:
    """The monotonic deadline of V2 ``parameters.timeout`` (microseconds), or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError("parameters.timeout must be a number of microseconds")
    try:
        us = float(value)
    except OverflowError:  # an integer literal beyond float range
        us = math.inf
    if math.isnan(us) or us < 0:
        raise ProtocolError("parameters.timeout must be a non-negative number of microseconds")
    return time.monotonic() + min(us, _MAX_TIMEOUT_US) / 1e6


def _bearer_ok(got: str, token: str) -> bool:
    """RFC 7235: the scheme is case-insensitive; the token is compared in constant time."""
    scheme, _, value = got.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode("utf-8", "replace"), token.encode()
    )


class _Metrics:
    """Prometheus metrics in a registry of their own, so several servers fit in one process."""

    def __init__(self, core: ServingCore, region: str) -> None:
        prom = require("prometheus_client", "cloud", "the cloud server's /metrics")
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "edgecloud_cloud_requests",
            "Inference requests by model and HTTP status",
            ["model", "status"],
            registry=r,
        )
        self.latency = prom.Histogram(
            "edgecloud_cloud_request_seconds",
            "Inference request latency inside the server (decode, queue, run, encode)",
            ["model"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.batch_rows = prom.Histogram(
            "edgecloud_cloud_batch_size",
            "Rows per onnxruntime run (dynamic batching joins requests along dim 0)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_requests = prom.Histogram(
            "edgecloud_cloud_batch_requests",
            "Requests joined into one onnxruntime run",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.run_seconds = prom.Histogram(
            "edgecloud_cloud_run_seconds",
            "onnxruntime time per batch",
            ["model"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1),
            registry=r,
        )
        depth = prom.Gauge(
            "edgecloud_cloud_queue_depth", "Requests waiting for a batch", ["model"], registry=r
        )
        for m in core.models():
            depth.labels(m).set_function(lambda m=m: core.queue_depth(m))
        info = prom.Info("edgecloud_cloud", "Cloud region server", registry=r)
        info.info({"region": region, "version": _edgecloud_version})
        core.add_listener(self.on_batch)
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        """Count one request; the labelled children are cached (``labels()`` takes a lock and
        builds a key on every call, a measurable share of a small request's CPU)."""
        children = self._request_children.get((model, status))
        if children is None:
            children = (
                self.requests.labels(model, str(status)),
                self.latency.labels(model),
            )
            self._request_children[(model, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_batch(self, ev: BatchEvent) -> None:
        self.batch_rows.labels(ev.model).observe(ev.rows)
        self.batch_requests.labels(ev.model).observe(ev.requests)
        self.run_seconds.labels(ev.model).observe(ev.seconds)

    def render(self) -> bytes:
        return bytes(self.prom.generate_latest(self.registry))


def create_app(
    core: ServingCore,
    *,
    region: str = "local",
    token: str | None = None,
    max_request_bytes: int | None = None,
    latency_ms: float = 0.0,
    limits: Limits = DEFAULT_LIMITS,
) -> Starlette:
    """The V2 ASGI app over ``core``.

    ``latency_ms`` delays every response (health included) to simulate a farther region in demos;
    it is never on by default. With ``token`` every route but health needs
    ``Authorization: Bearer <token>``. ``max_request_bytes`` overrides ``limits.max_body_bytes``.
    """
    require("starlette", "cloud", "the cloud server")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route

    if max_request_bytes is not None:
        if max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be positive, got {max_request_bytes}")
        limits = limits.with_(max_body_bytes=max_request_bytes)
    max_request_bytes = limits.max_body_bytes
    refusals = RateLimitedLog(log, limits.log_per_minute)
    # Created on first use, inside the server's event loop.
    large_slots: list[asyncio.Semaphore] = []
    if latency_ms < 0:
        raise ConfigError(f"latency_ms must be >= 0, got {latency_ms}")
    metrics = _Metrics(core, region)
    known_models = frozenset(core.models())
    expected_auth = f"Bearer {token}".encode() if token else None
    delay = latency_ms / 1000.0
    base_headers = {REGION_HEADER: region}

    def error(status: int, message: str) -> Response:
        return Response(
            encode_error(message),
            status_code=status,
            media_type="application/json",
            headers=dict(base_headers, **({"WWW-Authenticate": "Bearer"} if status == 401 else {})),
        )

    def ok_json(obj: Any) -> Response:
        return Response(
            json.dumps(obj, separators=(",", ":")).encode(),
            media_type="application/json",
            headers=base_headers,
        )

    def endpoint(fn: Handler, *, auth: bool = True) -> Handler:
        async def wrapped(request: Request) -> Response:
            if delay:
                await asyncio.sleep(delay)
            if auth and expected_auth is not None:
                got = request.headers.get("authorization", "")
                if not got:
                    return error(
                        401, "authorization required: send 'Authorization: Bearer <token>'"
                    )
                if not _bearer_ok(got, token or ""):
                    return error(401, "invalid bearer token")
            try:
                return await fn(request)
            except EdgeCloudError as exc:
                return error(status_for(exc), str(exc))
            except Exception as exc:  # never a raw traceback to the client, nor a flood of them
                if refusals.warning("internal", "unexpected error serving %s", request.url.path):
                    log.error("unexpected error serving %s", request.url.path, exc_info=exc)
                return error(500, f"internal error: {exc.__class__.__name__}")

        return wrapped

    def model_of(request: Request) -> tuple[str, str | None]:
        return request.path_params["name"], request.path_params.get("version")

    async def live(request: Request) -> Response:
        return Response(b"", headers=base_headers)

    async def ready(request: Request) -> Response:
        not_ready = [m for m in core.models() if not core.ready(m)]
        if not_ready:
            return error(400, f"models not ready: {', '.join(not_ready)}")
        return Response(b"", headers=base_headers)

    async def server_metadata(request: Request) -> Response:
        return ok_json(
            {
                "name": "edgecloud",
                "version": _edgecloud_version,
                "extensions": ["binary_tensor_data"],
            }
        )

    async def model_metadata(request: Request) -> Response:
        name, version = model_of(request)
        return ok_json(core.metadata(name, version))

    async def model_ready(request: Request) -> Response:
        name, version = model_of(request)
        core.repository.resolve(name, version)  # 404 for an unknown model or version
        if core.ready(name, version):
            return Response(b"", headers=base_headers)
        return error(400, f"model '{name}' is not ready")

    def declared_length(request: Request) -> int | None:
        declared = parse_decimal(request.headers.get("content-length"), "Content-Length")
        if declared is not None and declared > max_request_bytes:
            raise _TooLarge(f"request body of {declared} bytes exceeds {max_request_bytes}")
        return declared

    async def read_body(request: Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_request_bytes:
                    raise _TooLarge(f"request body exceeds {max_request_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect as exc:
            raise ProtocolError("client disconnected while sending the body") from exc
        return b"".join(chunks)

    async def large_slot() -> asyncio.Semaphore:
        """One of ``max_large_decodes`` slots; 503 when none frees up within the header timeout.

        Reading, decoding and running a large body is what costs memory, so at most this many
        run at once however many clients send them.
        """
        if not large_slots:
            large_slots.append(asyncio.Semaphore(limits.max_large_decodes))
        sem = large_slots[0]
        try:
            await asyncio.wait_for(sem.acquire(), limits.header_timeout_s)
        except TimeoutError:
            raise LimitExceeded(
                f"{limits.max_large_decodes} large requests are already being decoded; retry later",
                status=503,
            ) from None
        return sem

    async def infer(request: Request) -> Response:
        name, version = model_of(request)
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await _infer(request, name, version)
            status = resp.status_code
            return resp
        except _TooLarge as exc:
            status = 413
            refused = error(413, str(exc))
            # The body was not read: its bytes must not be taken for the next request.
            refused.headers["Connection"] = "close"
            return refused
        except EdgeCloudError as exc:
            status = status_for(exc)
            if status < 500 or isinstance(exc, LimitExceeded):
                refusals.warning("refused", "refused %s: %s", request.url.path, exc)
            return error(status, str(exc))
        finally:
            label = name if name in known_models else "_unknown"
            metrics.observe_request(label, status, time.perf_counter() - t0)

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        declared = declared_length(request)
        header_length = parse_decimal(request.headers.get(HEADER_LENGTH), HEADER_LENGTH)
        if declared is None or declared > limits.large_body_bytes:
            sem = await large_slot()
            try:
                return await _infer_body(request, name, version, header_length)
            finally:
                sem.release()
                await run_in_threadpool(release_memory)
        return await _infer_body(request, name, version, header_length)

    async def _infer_body(
        request: Request, name: str, version: str | None, header_length: int | None
    ) -> Response:
        body = await read_body(request)
        if len(body) > _OFFLOAD_BYTES:
            # Parsing megabytes of JSON would stall the event loop (and every health probe).
            req = await run_in_threadpool(
                decode_request, body, header_length, model=name, version=version, limits=limits
            )
        else:
            req = decode_request(body, header_length, model=name, version=version, limits=limits)
        check_rows(req.inputs, limits.max_rows)
        deadline = _request_deadline(req.parameters.get("timeout"))
        binary = binary_outputs_requested(body, header_length, req.parameters)
        fut = core.submit(req, deadline=deadline)
        result = await asyncio.wrap_future(fut)
        if sum(a.nbytes for a in result.outputs.values()) > _OFFLOAD_BYTES // 4:
            out, hl = await run_in_threadpool(encode_response_mixed, result, binary)
        else:
            out, hl = encode_response_mixed(result, binary)
        if hl is None:
            return Response(out, media_type="application/json", headers=base_headers)
        return Response(
            out,
            media_type="application/octet-stream",
            headers=dict(base_headers, **{HEADER_LENGTH: str(hl)}),
        )

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    routes = [
        Route("/v2/health/live", endpoint(live, auth=False), methods=["GET"]),
        Route("/v2/health/ready", endpoint(ready, auth=False), methods=["GET"]),
        Route("/v2", endpoint(server_metadata), methods=["GET"]),
        Route("/v2/models/{name}", endpoint(model_metadata), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", endpoint(model_metadata), methods=["GET"]),
        Route("/v2/models/{name}/ready", endpoint(model_ready), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", endpoint(model_ready), methods=["GET"]),
        Route("/v2/models/{name}/infer", endpoint(infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", endpoint(infer), methods=["POST"]),
        Route("/metrics", endpoint(prometheus), methods=["GET"]),
    ]

    async def not_routed(request: Request, exc: Exception) -> Response:
        # Unknown paths and wrong methods get V2 error bodies too, not Starlette's plain text.
        status = int(getattr(exc, "status_code", 404))
        return error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', '')}")

    infer_handler = endpoint(infer)

    class _App(Starlette):
        """Starlette, except that infer requests skip its middleware stack and router.

        Inference is the one route that runs at thousands of requests per second; the two error
        middlewares and the scan of ten routes cost about as much CPU as decoding the request.
        Nothing is lost: ``endpoint`` already turns every exception into a V2 error body.
        """

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
                m = _INFER_PATH.fullmatch(scope["path"])
                if m is not None:
                    scope["app"] = self
                    scope["path_params"] = (
                        {"name": m[1], "version": m[2]} if m[2] else {"name": m[1]}
                    )
                    response = await infer_handler(Request(scope, receive, send))
                    await response(scope, receive, send)
                    return
            await super().__call__(scope, receive, send)

    app = _App(routes=routes, exception_handlers={404: not_routed, 405: not_routed})
    app.state.core = core
    app.state.metrics = metrics
    return app


class _WriteCoalescer:
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


def _http_protocol(limits: Limits = DEFAULT_LIMITS, region: str = "local") -> Any:
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
            super().connection_made(_WriteCoalescer(transport, self.loop))  # type: ignore[arg-type]
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


def _limit_parser_warnings(per_minute: int) -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _ParserWarningFilter) for f in logger.filters):
        logger.addFilter(_ParserWarningFilter(per_minute))


def _server_class(uvicorn: Any) -> Any:
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


class CloudServer:
    """A V2 server on a uvicorn thread: ``start()`` returns once it accepts connections.

    Used by ``edgecloud cloud serve`` (in the foreground via ``serve_forever``) and by tests and
    benchmarks that want a real server in-process. ``port=0`` picks a free port.
    """

    def __init__(
        self,
        core: ServingCore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str = "local",
        token: str | None = None,
        max_request_bytes: int | None = None,
        latency_ms: float = 0.0,
        log_level: str = "warning",
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        uvicorn = require("uvicorn", "cloud", "the cloud server")
        self.core = core
        self.region = region
        self.app = create_app(
            core,
            region=region,
            token=token,
            max_request_bytes=max_request_bytes,
            latency_ms=latency_ms,
            limits=limits,
        )
        self.limits = limits
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
        # listening socket says TCP, and without it Nagle + delayed ACK add 40 ms per response.
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        backlog = accept_backlog()
        self._sock.listen(backlog)  # connections made before uvicorn runs wait in the backlog
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http=_http_protocol(limits, region),
            log_level=log_level,
            lifespan="off",
            access_log=False,
            timeout_keep_alive=limits.idle_timeout_s,
            timeout_graceful_shutdown=5,
            backlog=backlog,
            h11_max_incomplete_event_size=limits.max_header_bytes,  # when httptools is missing
        )
        self._server = _server_class(uvicorn)(config)
        _limit_parser_warnings(limits.log_per_minute)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, *, timeout: float = 30.0) -> CloudServer:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="uvicorn"
        )
        self._thread.start()
        t_end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > t_end:
                raise ConfigError(f"cloud server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Run in the calling thread until SIGINT/SIGTERM (uvicorn handles the signals)."""
        self._server.run(sockets=[self._sock])

    def stop(self) -> None:
        """Stop accepting, finish in-flight requests (bounded), close the socket. Idempotent."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> CloudServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
