"""The KServe V2 (Open Inference Protocol) tensor codec, shared by HTTP and MQTT.

One codec for both transports means a region can be reached either way with the same bytes, and a
Triton, KServe or MLServer deployment is a drop-in region. Two encodings:

- JSON: tensors as flat ``data`` lists in the JSON body.
- Binary tensor data extension: a JSON header whose tensors carry
  ``parameters.binary_data_size`` instead of ``data``, followed by the raw little-endian bytes of
  each such tensor in header order. Over HTTP the header's length travels in the
  ``Inference-Header-Content-Length`` header; over MQTT in a user property of the same name.

Decoding validates everything it reads (datatype, shape against element count, sizes against the
body) and raises ``ProtocolError`` naming the tensor, so a malformed request is a 400, not a crash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecloud.errors import ProtocolError

__all__ = [
    "DTYPE_TO_V2",
    "HEADER_LENGTH",
    "V2_TO_DTYPE",
    "InferRequest",
    "InferResponse",
    "decode_error",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
]

HEADER_LENGTH = "Inference-Header-Content-Length"

V2_TO_DTYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DTYPE_TO_V2: dict[np.dtype[Any], str] = {v: k for k, v in V2_TO_DTYPE.items()}
_LE = {k: v.newbyteorder("<") for k, v in V2_TO_DTYPE.items()}


@dataclass
class InferRequest:
    """A V2 inference request. ``outputs`` empty means "all outputs"."""

    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    id: str | None = None
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    """A V2 inference response."""

    model: str
    outputs: dict[str, np.ndarray]
    version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _v2_type(name: str, arr: np.ndarray) -> str:
    try:
        return DTYPE_TO_V2[arr.dtype]
    except KeyError:
        raise ProtocolError(f"tensor '{name}': dtype {arr.dtype} has no V2 datatype") from None


def _encode_tensors(
    tensors: Mapping[str, np.ndarray], binary: bool | int, blobs: list[bytes]
) -> list[dict[str, Any]]:
    """JSON entries for ``tensors``; binary ones append their bytes to ``blobs``.

    ``binary`` is True/False, or an int threshold in bytes above which a tensor goes binary.
    """
    out: list[dict[str, Any]] = []
    for name, arr in tensors.items():
        a = np.asarray(arr)
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(a.shape),
            "datatype": _v2_type(name, a),
        }
        use_binary = binary if isinstance(binary, bool) else a.nbytes >= binary
        if use_binary:
            raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = a.ravel().tolist()
        out.append(entry)
    return out


def _finish(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def encode_request(
    req: InferRequest, *, binary: bool | int = False, binary_outputs: bool = False
) -> tuple[bytes, int | None]:
    """Encode a request; returns ``(body, header_length)``, header_length None for pure JSON."""
    blobs: list[bytes] = []
    header: dict[str, Any] = {"inputs": _encode_tensors(req.inputs, binary, blobs)}
    if req.id is not None:
        header["id"] = req.id
    if req.parameters:
        header["parameters"] = req.parameters
    if req.outputs or binary_outputs:
        names: Iterable[str] = req.outputs
        if binary_outputs and not req.outputs:
            header.setdefault("parameters", {})["binary_data_output"] = True
        header["outputs"] = [
            {"name": n, **({"parameters": {"binary_data": True}} if binary_outputs else {})}
            for n in names
        ]
    return _finish(header, blobs)


def encode_response(resp: InferResponse, *, binary: bool | int = False) -> tuple[bytes, int | None]:
    blobs: list[bytes] = []
    header: dict[str, Any] = {
        "model_name": resp.model,
        "outputs": _encode_tensors(resp.outputs, binary, blobs),
    }
    if resp.version is not None:
        header["model_version"] = resp.version
    if resp.id is not None:
        header["id"] = resp.id
    if resp.parameters:
        header["parameters"] = resp.parameters
    return _finish(header, blobs)


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    if header_length is None:
        head, rest = body, b""
    else:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        head, rest = body[:header_length], body[header_length:]
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"body is not valid JSON: {exc.__class__.__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("body must be a JSON object")
    return header, memoryview(rest)


def _decode_tensors(entries: Any, rest: memoryview, what: str) -> dict[str, np.ndarray]:
    if not isinstance(entries, list):
        raise ProtocolError(f"'{what}' must be a list of tensors")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for e in entries:
        if not isinstance(e, dict):
            raise ProtocolError(f"each entry of '{what}' must be an object")
        name = e.get("name")
        if not isinstance(name, str):
            raise ProtocolError(f"a tensor in '{what}' has no string 'name'")
        dt = e.get("datatype")
        if dt not in _LE:
            raise ProtocolError(f"tensor '{name}': unsupported datatype {dt!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ProtocolError(f"tensor '{name}': shape must be a list of non-negative ints")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        params = e.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            dtype = _LE[dt]
            if not isinstance(size, int) or size != count * dtype.itemsize:
                raise ProtocolError(
                    f"tensor '{name}': binary_data_size {size} does not fit shape {shape} {dt}"
                )
            if offset + size > len(rest):
                raise ProtocolError(f"tensor '{name}': body ends before its {size} binary bytes")
            arr = np.frombuffer(rest[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            data = e.get("data")
            if data is None:
                raise ProtocolError(f"tensor '{name}' has neither 'data' nor binary_data_size")
            try:
                arr = np.asarray(data, dtype=V2_TO_DTYPE[dt])
            except (ValueError, TypeError, OverflowError) as exc:
                raise ProtocolError(f"tensor '{name}': data is not {dt}: {exc}") from exc
            if arr.size != count:
                raise ProtocolError(f"tensor '{name}': {arr.size} values do not fill shape {shape}")
            arr = arr.reshape(shape)
        if name in tensors:
            raise ProtocolError(f"tensor '{name}' appears twice in '{what}'")
        tensors[name] = arr
    if offset != len(rest):
        raise ProtocolError(f"{len(rest) - offset} bytes after the last binary tensor")
    return tensors


def decode_request(
    body: bytes, header_length: int | None = None, *, model: str = "", version: str | None = None
) -> InferRequest:
    """Decode a request body; ``model``/``version`` come from the URL or MQTT properties."""
    header, rest = _split(body, header_length)
    inputs = _decode_tensors(header.get("inputs"), rest, "inputs")
    outs = header.get("outputs") or []
    if not isinstance(outs, list) or not all(isinstance(o, dict) and "name" in o for o in outs):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    rid = header.get("id")
    return InferRequest(
        model=model,
        version=version,
        inputs=inputs,
        id=str(rid) if rid is not None else None,
        outputs=[str(o["name"]) for o in outs],
        parameters=params,
    )


def wants_binary_outputs(body_header: InferRequest) -> bool:
    """Whether the request asked for binary outputs (V2 ``binary_data_output`` or per output)."""
    return bool(body_header.parameters.get("binary_data_output"))


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    header, rest = _split(body, header_length)
    if "error" in header and "outputs" not in header:
        raise ProtocolError(f"expected an inference response, got an error: {header['error']}")
    outputs = _decode_tensors(header.get("outputs"), rest, "outputs")
    mv = header.get("model_version")
    rid = header.get("id")
    return InferResponse(
        model=str(header.get("model_name", "")),
        version=str(mv) if mv is not None else None,
        id=str(rid) if rid is not None else None,
        outputs=outputs,
        parameters=header.get("parameters") or {},
    )


def encode_error(message: str) -> bytes:
    """A V2 error body."""
    return json.dumps({"error": message}).encode()


def decode_error(body: bytes) -> str:
    """The message of a V2 error body, or a short description of a body that is not one."""
    try:
        d = json.loads(body)
        if isinstance(d, dict) and isinstance(d.get("error"), str):
            return str(d["error"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    text = body[:200].decode("utf-8", "replace")
    return f"non-V2 error body: {text!r}"
