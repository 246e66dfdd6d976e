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
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from edgecloud import __version__ as _edgecloud_version
from edgecloud.cloud.core import ServingCore, status_for
from edgecloud.cloud.http_protocol import (
    REGION_HEADER,
    accept_backlog,
    http_protocol,
    limit_parser_warnings,
    server_class,
)
from edgecloud.cloud.metrics import RegionMetrics
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
    metrics = RegionMetrics(core, region)
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
            http=http_protocol(limits, region),
            log_level=log_level,
            lifespan="off",
            access_log=False,
            timeout_keep_alive=limits.idle_timeout_s,
            timeout_graceful_shutdown=5,
            backlog=backlog,
            h11_max_incomplete_event_size=limits.max_header_bytes,  # when httptools is missing
        )
        self._server = server_class(uvicorn)(config)
        limit_parser_warnings(limits.log_per_minute)
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
