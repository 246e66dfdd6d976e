"""KServe V2 over gRPC for a cloud region: the same ``ServingCore`` behind ``GRPCInferenceService``.

``edgecloud cloud serve --grpc-port 8001`` runs it beside the HTTP server, so a region answers
tritonclient's and KServe's gRPC clients, and edgecloud's ``GrpcTransport``, with the same
models, batcher and errors as over HTTP (requests from both join the same batches).

RPCs (the inference subset of the spec; others answer UNIMPLEMENTED):

    ServerLive, ServerReady                  no auth (as /v2/health/* over HTTP)
    ServerMetadata, ModelMetadata,
      ModelReady, ModelInfer                 ``authorization: Bearer <token>`` when a token is set

Tensors come as ``raw_input_contents`` (what tritonclient sends) or typed ``contents``; outputs go
back as ``raw_output_contents``. Errors map from the V2 status the core gives
(``core.status_for``) to gRPC codes: 400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND,
503 UNAVAILABLE (queue full: try elsewhere), 504 DEADLINE_EXCEEDED, anything else INTERNAL with a
message that names what failed.

Limits: messages larger than ``max_request_bytes`` are refused by gRPC itself
(RESOURCE_EXHAUSTED, before any decoding); at most ``max_concurrent_rpcs`` RPCs run at once (more
get RESOURCE_EXHAUSTED at once rather than queueing without bound; health and metadata RPCs are
not counted); each request's deadline is the
earlier of its gRPC deadline and its V2 ``timeout`` parameter, and a request still queued then is
dropped (DEADLINE_EXCEEDED).

The server runs on a ``grpc.aio`` event loop in a thread of its own, which only decodes, queues
and encodes: onnxruntime runs in the core's batcher threads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from typing import Any

from edgecloud import __version__ as _edgecloud_version
from edgecloud.cloud.core import ModelNotFoundError, ServingCore, status_for
from edgecloud.errors import ConfigError, EdgeCloudError, ProtocolError
from edgecloud.transport.grpc import (
    decode_tensors,
    encode_parameters,
    load_proto,
    parameters_of,
    raw_bytes,
)
from edgecloud.transport.v2 import InferRequest

__all__ = ["DEFAULT_MAX_CONCURRENT_RPCS", "DEFAULT_MAX_REQUEST_BYTES", "GrpcServer"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_RPCS = 1024

_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "RESOURCE_EXHAUSTED",
    429: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class _Servicer:
    """The ``GRPCInferenceService`` methods, over one ``ServingCore``."""

    def __init__(
        self, core: ServingCore, region: str, token: str | None, max_inflight: int
    ) -> None:
        self.core = core
        self.region = region
        self.max_inflight = max_inflight
        self.inflight = 0  # ModelInfer calls being served; only the event loop thread touches it
        self._token = f"Bearer {token}" if token else None
        self._grpc, self._pb, _ = load_proto()

    async def _abort(self, context: Any, status: int, message: str) -> None:
        code = getattr(self._grpc.StatusCode, _CODES.get(status, "INTERNAL"))
        await context.abort(code, message)

    async def _auth(self, context: Any) -> None:
        if self._token is None:
            return
        got = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not isinstance(got, str) or not hmac.compare_digest(got, self._token):
            await self._abort(context, 401, "missing or wrong bearer token")

    # -- health and metadata
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self._pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self._pb.ServerReadyResponse(
            ready=all(self.core.ready(m) for m in self.core.models())
        )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._auth(context)
        if not request.name:
            await self._abort(context, 400, "ModelReady needs a model name")
        ready = self.core.ready(request.name, request.version or None)
        return self._pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        await self._auth(context)
        return self._pb.ServerMetadataResponse(
            name="edgecloud", version=_edgecloud_version, extensions=[]
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        await self._auth(context)
        try:
            meta = self.core.metadata(request.name, request.version or None)
        except EdgeCloudError as exc:
            await self._abort(context, status_for(exc), str(exc))
            raise  # abort raises; this line only satisfies the type checker
        resp = self._pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for t in meta["inputs"]:
            resp.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        for t in meta["outputs"]:
            resp.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    # -- inference
    def _decode(self, request: Any, context: Any) -> tuple[InferRequest, float | None]:
        if not request.model_name:
            raise ProtocolError("ModelInfer needs a model_name")
        inputs = decode_tensors(request.inputs, request.raw_input_contents, "request")
        params = parameters_of(request.parameters)
        deadline: float | None = None
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = time.monotonic() + remaining
        timeout_us = params.get("timeout")
        if isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool):
            by_param = time.monotonic() + float(timeout_us) / 1e6
            deadline = by_param if deadline is None else min(deadline, by_param)
        req = InferRequest(
            model=request.model_name,
            inputs=inputs,
            version=request.model_version or None,
            id=request.id or None,
            outputs=[o.name for o in request.outputs],
            parameters=params,
            input_parameters={
                t.name: p for t in request.inputs if (p := parameters_of(t.parameters))
            },
        )
        return req, deadline

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._auth(context)
        if self.inflight >= self.max_inflight:
            await context.abort(
                self._grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"region '{self.region}' is serving {self.inflight} requests already (limit "
                f"{self.max_inflight}): try another region or later",
            )
        self.inflight += 1
        try:
            return await self._infer(request, context)
        finally:
            self.inflight -= 1

    async def _infer(self, request: Any, context: Any) -> Any:
        try:
            req, deadline = self._decode(request, context)
            fut = self.core.submit(req, deadline=deadline)
            resp = await asyncio.wrap_future(fut)
            out = self._pb.ModelInferResponse(
                model_name=resp.model, model_version=resp.version or "", id=resp.id or ""
            )
            encode_parameters(out.parameters, resp.parameters)
            raw = []
            for name, arr in resp.outputs.items():
                datatype, blob = raw_bytes(name, arr)
                out.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
                raw.append(blob)
            out.raw_output_contents.extend(raw)
            return out
        except EdgeCloudError as exc:
            status = status_for(exc)
            if status >= 500 and not isinstance(exc, ModelNotFoundError):
                log.warning("gRPC ModelInfer for '%s' failed: %s", request.model_name, exc)
            await self._abort(context, status, str(exc))
            raise


class GrpcServer:
    """The V2 gRPC server on a thread: ``start()`` returns once it listens; ``port=0`` picks one."""

    def __init__(
        self,
        core: ServingCore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str = "local",
        token: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    ) -> None:
        if max_request_bytes < 1024:
            raise ConfigError(f"max_request_bytes must be >= 1024, got {max_request_bytes}")
        if max_concurrent_rpcs < 1:
            raise ConfigError(f"max_concurrent_rpcs must be >= 1, got {max_concurrent_rpcs}")
        self._grpc, _, self._pb_grpc = load_proto()
        self.core = core
        self.region = region
        self.host = host
        self.port = port
        self._token = token
        self._max_request_bytes = max_request_bytes
        self._max_concurrent = max_concurrent_rpcs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._grace = 2.0
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"grpc://{host}:{self.port}"

    async def _serve(self) -> None:
        grpc = self._grpc
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._max_request_bytes),
                ("grpc.max_send_message_length", self._max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            _Servicer(self.core, self.region, self._token, self._max_concurrent), server
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        bound = server.add_insecure_port(f"{host}:{self.port}")
        if not bound:
            raise ConfigError(f"cannot listen for gRPC on {self.host}:{self.port}")
        self.port = bound
        await server.start()
        self._server = server
        stop = asyncio.Event()
        self._stop_event = stop
        self._started.set()
        await stop.wait()
        await server.stop(self._grace)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
        finally:
            loop.close()

    def start(self, *, timeout: float = 30.0) -> GrpcServer:
        self._thread = threading.Thread(target=self._run, name="grpc-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise ConfigError(f"gRPC server did not start on {self.host}:{self.port}")
        if self._error is not None:
            err = self._error
            if isinstance(err, EdgeCloudError):
                raise err
            raise ConfigError(f"gRPC server did not start: {err}") from err
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, give in-flight RPCs ``grace`` seconds, end the thread. Idempotent."""
        loop, stop = self._loop, self._stop_event
        self._grace = grace
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop ended already
                pass
        if self._thread is not None:
            self._thread.join(timeout=grace + 5)
            self._thread = None
        self._server = None

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
