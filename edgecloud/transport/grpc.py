"""The gRPC transport: KServe V2 over gRPC (``GRPCInferenceService``), as Triton and KServe use.

``GrpcTransport("grpc://host:8001", region=...)`` is a ``Transport`` like ``HttpTransport``: the
router, breakers and health probes treat both alike. It needs the ``grpc`` extra
(``pip install 'edgecloud[grpc]'``: grpcio and protobuf); the messages and stubs are generated
from edgecloud's own ``grpc_predict_v2.proto`` (``edgecloud/transport/_proto``), wire-compatible
with the spec, so a Triton or KServe gRPC endpoint is a region unchanged.

Tensors always travel as ``raw_input_contents``/``raw_output_contents`` (little-endian bytes, one
entry per tensor in order): there is no JSON-vs-binary choice to negotiate over gRPC. Responses
whose outputs carry typed ``contents`` instead (some servers send those) are decoded too.

Each call's gRPC deadline is the request's remaining deadline. ``grpc.RpcError`` codes are
translated in one place, ``translate_grpc_error``, each error carrying the region:

    DEADLINE_EXCEEDED                         -> TransportTimeout
    UNAVAILABLE                               -> ConnectionFailed (refused, reset, overloaded)
    UNAUTHENTICATED / PERMISSION_DENIED       -> AuthError(401 / 403)
    INVALID_ARGUMENT, FAILED_PRECONDITION,
      OUT_OF_RANGE                            -> RemoteError(400)
    NOT_FOUND                                 -> RemoteError(404)
    RESOURCE_EXHAUSTED                        -> RemoteError(413 for a message over the limit,
                                                 else 429)
    UNIMPLEMENTED                             -> RemoteError(501)
    UNKNOWN naming a model not found          -> RemoteError(404) (MLServer's unknown model)
    any other code                            -> RemoteError(500)
    a response that is not a valid V2 answer  -> ProtocolError

Thread-safe: one channel (HTTP/2, multiplexed) serves every thread of the router.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    MissingDependencyError,
    ProtocolError,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from edgecloud.transport.base import Transport
from edgecloud.transport.compact import UpstreamCounter
from edgecloud.transport.v2 import DTYPE_TO_V2, V2_TO_DTYPE, InferRequest, InferResponse

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GrpcTransport",
    "decode_tensors",
    "encode_parameters",
    "load_proto",
    "parameters_of",
    "translate_grpc_error",
]

#: Largest message either side accepts by default (gRPC's own default is 4 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_NOT_FOUND = re.compile(r"ModelNotFound|model \S+ (with version \S* )?not found", re.IGNORECASE)

#: ``InferTensorContents`` field per V2 datatype, for messages without raw contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def load_proto() -> tuple[Any, Any, Any]:
    """``(grpc, messages, stubs)``: imported lazily, so ``import edgecloud`` never needs grpcio."""
    try:
        import grpc

        from edgecloud.transport._proto import grpc_predict_v2_pb2 as pb
        from edgecloud.transport._proto import grpc_predict_v2_pb2_grpc as pb_grpc
    except ImportError as exc:
        raise MissingDependencyError("grpcio", "grpc", "the V2 gRPC transport") from exc
    return grpc, pb, pb_grpc


def encode_parameters(target: Any, params: Mapping[str, Any]) -> None:
    """Fill a protobuf ``map<string, InferParameter>`` from plain Python values."""
    for key, value in params.items():
        p = target[str(key)]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


def parameters_of(params: Any) -> dict[str, Any]:
    """Plain Python values of a protobuf ``map<string, InferParameter>``."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[str(key)] = getattr(p, which)
    return out


def decode_tensors(
    tensors: Sequence[Any], raw: Sequence[bytes], what: str
) -> dict[str, np.ndarray]:
    """Arrays of V2 gRPC tensors (``inputs`` or ``outputs``), from raw bytes or typed contents.

    Every tensor is checked (known datatype, non-negative shape, byte or element count against
    the shape) and a bad one raises ``ProtocolError`` naming it; ``raw`` must hold one entry per
    tensor or none at all.
    """
    if raw and len(raw) != len(tensors):
        raise ProtocolError(
            f"{what}: {len(raw)} raw contents for {len(tensors)} tensors (one each, in order)"
        )
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        name = t.name
        if not name:
            raise ProtocolError(f"{what}: tensor {i} has no name")
        if name in out:
            raise ProtocolError(f"{what}: tensor '{name}' appears twice")
        dtype = V2_TO_DTYPE.get(t.datatype)
        if dtype is None:
            raise ProtocolError(
                f"tensor '{name}': unsupported datatype {t.datatype!r} "
                f"(supported: {', '.join(V2_TO_DTYPE)})"
            )
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise ProtocolError(f"tensor '{name}': negative dimension in shape {list(shape)}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if raw:
            blob = raw[i]
            want = count * dtype.itemsize
            if len(blob) != want:
                raise ProtocolError(
                    f"tensor '{name}': {len(blob)} raw bytes, but shape {list(shape)} of "
                    f"{t.datatype} needs {want}"
                )
            arr = np.frombuffer(blob, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        else:
            field = _CONTENTS_FIELD.get(t.datatype)
            if field is None:  # FP16 has no typed field in the spec: raw contents only
                raise ProtocolError(f"tensor '{name}': {t.datatype} needs raw contents")
            values = getattr(t.contents, field)
            if len(values) != count:
                raise ProtocolError(
                    f"tensor '{name}': {len(values)} values, but shape {list(shape)} needs {count}"
                )
            arr = np.asarray(values, dtype=dtype)
        out[name] = arr.reshape(shape)
    return out


def raw_bytes(name: str, arr: np.ndarray) -> tuple[str, bytes]:
    """The V2 datatype and little-endian bytes of one array."""
    a = np.asarray(arr)
    try:
        datatype = DTYPE_TO_V2[a.dtype]
    except KeyError:
        raise ProtocolError(f"tensor '{name}': dtype {a.dtype} has no V2 datatype") from None
    return datatype, np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def translate_grpc_error(exc: Exception, region: str) -> TransportError:
    """The edgecloud error for a ``grpc.RpcError`` (``TransportError`` for anything else)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if not callable(code):
        return TransportError(f"region '{region}': {type(exc).__name__}: {exc}", region=region)
    name = getattr(code(), "name", str(code()))
    text = f"region '{region}': gRPC {name}: {(details() if callable(details) else '') or ''}"
    if name == "DEADLINE_EXCEEDED":
        return TransportTimeout(text, region=region)
    if name == "UNAVAILABLE":
        return ConnectionFailed(text, region=region)
    if name == "UNAUTHENTICATED":
        return AuthError(text, region=region, status=401)
    if name == "PERMISSION_DENIED":
        return AuthError(text, region=region, status=403)
    status = {
        "INVALID_ARGUMENT": 400,
        "FAILED_PRECONDITION": 400,
        "OUT_OF_RANGE": 400,
        "NOT_FOUND": 404,
        "UNIMPLEMENTED": 501,
    }.get(name)
    if name == "RESOURCE_EXHAUSTED":
        status = 413 if "larger than max" in text or "message length" in text.lower() else 429
    if name == "UNKNOWN" and _NOT_FOUND.search(text):
        status = 404  # MLServer answers an unknown model with UNKNOWN "...ModelNotFound..."
    return RemoteError(text, region=region, status=status or 500)


class GrpcTransport(Transport):
    """A V2 gRPC client for one region, over one HTTP/2 channel.

    ``endpoint`` is ``grpc://host:port`` (plaintext) or ``grpcs://host:port`` (TLS; ``ca`` names
    a PEM file of root certificates, default the system's). ``token`` is sent as
    ``authorization: Bearer <token>`` metadata. ``model_version`` pins a version for requests
    that name none. ``propagate_deadline`` also sends the remaining deadline as the V2 ``timeout``
    parameter (microseconds), as the HTTP transport does; the gRPC deadline itself always goes.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        region: str,
        token: str | None = None,
        model_version: str | None = None,
        connect_timeout: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        ca: str | None = None,
        propagate_deadline: bool = True,
    ) -> None:
        grpc, pb, pb_grpc = load_proto()
        parts = urlsplit(endpoint)
        if parts.scheme not in ("grpc", "grpcs") or not parts.hostname or not parts.port:
            raise ConfigError(
                f"region '{region}': gRPC endpoint must be grpc://host:port or grpcs://host:port, "
                f"got {endpoint!r}"
            )
        if connect_timeout <= 0:
            raise ConfigError(f"connect_timeout must be > 0 s, got {connect_timeout}")
        if max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
        self.region = region
        self.endpoint = endpoint
        self.model_version = model_version
        self.connect_timeout = connect_timeout
        self.propagate_deadline = propagate_deadline
        self.ready_detail: str | None = None
        self.upstream = UpstreamCounter()  # serialized ModelInferRequest messages (compact.py)
        self._grpc = grpc
        self._pb = pb
        self._model_ready_unsupported = False
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        target = f"{host}:{parts.port}"
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_http_proxy", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if parts.scheme == "grpcs":
            roots = None
            if ca is not None:
                with open(ca, "rb") as f:
                    roots = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._closed = False

    @property
    def features(self) -> dict[str, Any]:
        """Protocol features, for health summaries: raw tensors always (no extension needed)."""
        return {
            "protocol": "grpc",
            "binary": True,
            "model_ready_path": not self._model_ready_unsupported,
        }

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except self._grpc.RpcError as exc:
            raise translate_grpc_error(exc, self.region) from exc
        except ValueError as exc:  # a channel closed under the call
            raise ConnectionFailed(f"region '{self.region}': {exc}", region=self.region) from exc

    def _call(self, method: str, message: Any, timeout: float) -> Any:
        if timeout <= 0:
            raise TransportTimeout(
                f"region '{self.region}': the request's deadline has already passed",
                region=self.region,
            )
        with self._translate():
            return getattr(self._stub, method)(
                message, timeout=timeout, metadata=self._metadata, wait_for_ready=False
            )

    def _request(self, request: InferRequest, timeout: float) -> Any:
        pb = self._pb
        msg = pb.ModelInferRequest(
            model_name=request.model,
            model_version=request.version or self.model_version or "",
            id=request.id or "",
        )
        params = dict(request.parameters)
        if self.propagate_deadline and "timeout" not in params and timeout > 0:
            params["timeout"] = max(1, int(timeout * 1e6))
        encode_parameters(msg.parameters, params)
        raw = []
        for name, arr in request.inputs.items():
            datatype, blob = raw_bytes(name, arr)
            t = msg.inputs.add(name=name, datatype=datatype, shape=list(np.shape(arr)))
            encode_parameters(t.parameters, request.input_parameters.get(name, {}))
            raw.append(blob)
        msg.raw_input_contents.extend(raw)
        for name in request.outputs:
            msg.outputs.add(name=name)
        return msg

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        try:
            msg = self._request(request, timeout)
        except ProtocolError as exc:
            raise ProtocolError(f"region '{self.region}': {exc}", region=self.region) from exc
        self.upstream.add(msg.ByteSize())
        resp = self._call("ModelInfer", msg, timeout)
        try:
            outputs = decode_tensors(resp.outputs, resp.raw_output_contents, "response")
        except ProtocolError as exc:
            raise ProtocolError(f"region '{self.region}': {exc}", region=self.region) from exc
        return InferResponse(
            model=resp.model_name or request.model,
            outputs=outputs,
            version=resp.model_version or None,
            id=resp.id or None,
            parameters=parameters_of(resp.parameters),
        )

    def ready(self, *, timeout: float) -> bool | None:
        """ServerReady: True when the server says ready, False otherwise or on no answer."""
        try:
            ok = bool(self._call("ServerReady", self._pb.ServerReadyRequest(), timeout).ready)
        except TransportError as exc:
            self.ready_detail = str(exc)
            return False
        self.ready_detail = None if ok else "server not ready"
        return ok

    def model_ready(
        self, model: str | None, version: str | None = None, *, timeout: float
    ) -> bool | None:
        """ModelReady for ``model``; ServerReady only where the server does not implement it."""
        version = version or self.model_version
        if model is None or self._model_ready_unsupported:
            return self.ready(timeout=timeout)
        end = time.monotonic() + timeout
        req = self._pb.ModelReadyRequest(name=model, version=version or "")
        try:
            ok = bool(self._call("ModelReady", req, timeout).ready)
        except RemoteError as exc:
            if exc.status == 501:
                self._model_ready_unsupported = True
                return self.ready(timeout=end - time.monotonic())
            self.ready_detail = str(exc)
            return False
        except TransportError as exc:
            self.ready_detail = str(exc)
            return False
        what = f"model '{model}'" + (f" version {version}" if version else "")
        self.ready_detail = None if ok else f"{what} not ready"
        return ok

    def server_metadata(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """ServerMetadata as a dict: name, version, extensions."""
        resp = self._call("ServerMetadata", self._pb.ServerMetadataRequest(), timeout)
        return {"name": resp.name, "version": resp.version, "extensions": list(resp.extensions)}

    def metadata(self, model: str, *, timeout: float = 5.0) -> dict[str, Any]:
        """V2 model metadata of ``model``, shaped like the HTTP transport's."""
        resp = self._call("ModelMetadata", self._pb.ModelMetadataRequest(name=model), timeout)

        def tensors(ts: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {
            "name": resp.name,
            "versions": list(resp.versions),
            "platform": resp.platform,
            "inputs": tensors(resp.inputs),
            "outputs": tensors(resp.outputs),
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()
