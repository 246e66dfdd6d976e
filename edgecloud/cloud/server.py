"""The cloud region's HTTP face: KServe V2 (Open Inference Protocol) REST on Starlette + uvicorn.

Everything model-related is the ``ServingCore``'s job; this module only speaks HTTP: routes, the
binary tensor data extension, V2 error bodies with their status codes, the request size limit,
optional bearer-token auth, the demo's artificial latency and Prometheus metrics. Starlette, uvicorn
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
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecloud import __version__ as _edgecloud_version
from edgecloud._deps import require
from edgecloud.cloud.core import BatchEvent, ServingCore, status_for
from edgecloud.errors import ConfigError, EdgeCloudError, ProtocolError
from edgecloud.transport.v2 import (
    DTYPE_TO_V2,
    HEADER_LENGTH,
    InferResponse,
    decode_request,
    encode_error,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "CloudServer", "create_app", "encode_response_mixed"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
REGION_HEADER = "X-Edgecloud-Region"
_OFFLOAD_BYTES = 256 * 1024  # bodies above this are decoded/encoded off the event loop
# The infer routes, matched before Starlette's middleware and router (see create_app).
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

Handler = Callable[["Request"], Awaitable["Response"]]


class _TooLarge(EdgeCloudError):
    pass


def encode_response_mixed(resp: InferResponse, binary: bool | set[str]) -> tuple[bytes, int | None]:
    """Encode a V2 response where ``binary`` is all/none or the set of outputs to send binary.

    The shared codec encodes all outputs one way; V2 lets a client ask per output
    (``outputs[i].parameters.binary_data``), which tritonclient does.
    """
    blobs: list[bytes] = []
    outs: list[dict[str, Any]] = []
    for name, arr in resp.outputs.items():
        a = np.asarray(arr)
        dt = DTYPE_TO_V2.get(a.dtype)
        if dt is None:
            raise ProtocolError(f"output '{name}': dtype {a.dtype} has no V2 datatype")
        entry: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(a.shape)}
        if binary is True or (isinstance(binary, set) and name in binary):
            raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = a.ravel().tolist()
        outs.append(entry)
    header: dict[str, Any] = {"model_name": resp.model, "outputs": outs}
    if resp.version is not None:
        header["model_version"] = resp.version
    if resp.id is not None:
        header["id"] = resp.id
    if resp.parameters:
        header["parameters"] = resp.parameters
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _binary_request(
    body: bytes, header_length: int | None, params: dict[str, Any]
) -> bool | set[str]:
    """Which outputs the client wants binary: all (``binary_data_output``), some, or none."""
    if params.get("binary_data_output"):
        return True
    head = body if header_length is None else body[:header_length]
    if b"binary_data" not in head:
        return False
    try:
        outs = json.loads(head).get("outputs") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    names = {
        str(o["name"])
        for o in outs
        if isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data")
    }
    return names or False


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
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    latency_ms: float = 0.0,
) -> Starlette:
    """The V2 ASGI app over ``core``.

    ``latency_ms`` delays every response (health included) to simulate a farther region in demos;
    it is never on by default. With ``token`` every route but health needs
    ``Authorization: Bearer <token>``.
    """
    require("starlette", "cloud", "the cloud server")
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route

    if max_request_bytes < 1:
        raise ConfigError(f"max_request_bytes must be positive, got {max_request_bytes}")
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
                got = request.headers.get("authorization", "").encode()
                if not got:
                    return error(
                        401, "authorization required: send 'Authorization: Bearer <token>'"
                    )
                if not hmac.compare_digest(got, expected_auth):
                    return error(401, "invalid bearer token")
            try:
                return await fn(request)
            except EdgeCloudError as exc:
                return error(status_for(exc), str(exc))
            except Exception as exc:  # never a raw traceback to the client
                log.exception("unexpected error serving %s", request.url.path)
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

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise _TooLarge(f"request body of {declared} bytes exceeds {max_request_bytes}")
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
            return error(413, str(exc))
        except EdgeCloudError as exc:
            status = status_for(exc)
            return error(status, str(exc))
        finally:
            label = name if name in known_models else "_unknown"
            metrics.observe_request(label, status, time.perf_counter() - t0)

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        body = await read_body(request)
        hl_text = request.headers.get(HEADER_LENGTH)
        header_length: int | None = None
        if hl_text is not None:
            if not hl_text.strip().isdigit():
                raise ProtocolError(f"{HEADER_LENGTH} must be a non-negative integer")
            header_length = int(hl_text)
        if len(body) > _OFFLOAD_BYTES:
            # Parsing megabytes of JSON would stall the event loop (and every health probe).
            req = await run_in_threadpool(
                decode_request, body, header_length, model=name, version=version
            )
        else:
            req = decode_request(body, header_length, model=name, version=version)
        deadline = None
        timeout_us = req.parameters.get("timeout")
        if isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool):
            deadline = time.monotonic() + float(timeout_us) / 1e6
        binary = _binary_request(body, header_length, req.parameters)
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


def _http_protocol() -> Any:
    """uvicorn's httptools protocol with coalesced writes; "auto" when httptools is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class _CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(_WriteCoalescer(transport, self.loop))  # type: ignore[arg-type]

    return _CoalescingHttpToolsProtocol


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
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        latency_ms: float = 0.0,
        log_level: str = "warning",
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
        )
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
        self._sock.listen(2048)  # connections made before uvicorn runs wait in the backlog
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http=_http_protocol(),
            log_level=log_level,
            lifespan="off",
            access_log=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
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
