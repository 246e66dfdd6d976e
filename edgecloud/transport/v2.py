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
Hostile input is bounded before it costs anything: JSON nesting is checked on the raw bytes before
``json.loads`` recurses, the JSON part of a request has its own byte limit (``Limits``), shapes are
multiplied in Python integers (no int64 wrap-around) and at most 64 dimensions are taken.

JSON cannot hold NaN or Infinity, so non-finite floats in ``data`` are written as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (as the protobuf JSON mapping does); the decoder
reads those strings back for float tensors. Strict JSON parsers (JavaScript, Go) accept every
body the codec writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecloud.errors import ProtocolError
from edgecloud.limits import DEFAULT_LIMITS, LimitExceeded, Limits, check_json_depth

__all__ = [
    "DTYPE_TO_V2",
    "HEADER_LENGTH",
    "V2_TO_DTYPE",
    "InferRequest",
    "InferResponse",
    "binary_outputs_requested",
    "decode_error",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_response",
    "encode_response_mixed",
    "json_data",
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
MAX_DIMS = 64  # numpy's own limit
_MAX_DIM = 2**62
_NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
# Responses are parsed by clients from servers they chose; they still get a depth bound.
_RESPONSE_DEPTH = 64


@dataclass
class InferRequest:
    """A V2 inference request. ``outputs`` empty means "all outputs"."""

    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    id: str | None = None
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Per input, its V2 tensor ``parameters`` other than ``binary_data_size`` (INT8 upstream's
    #: dequantize keys, edgecloud/transport/compact.py).
    input_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)


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


def json_data(a: np.ndarray) -> list[Any]:
    """The flat ``data`` list of ``a`` for a JSON body, NaN/Inf as strings (JSON has neither)."""
    flat: list[Any] = a.ravel().tolist()
    if a.dtype.kind == "f" and flat and not np.isfinite(a).all():
        flat = [v if math.isfinite(v) else _NONFINITE.get(v, "NaN") for v in flat]
    return flat


def _encode_tensors(
    tensors: Mapping[str, np.ndarray],
    binary: bool | int,
    blobs: list[bytes],
    params: Mapping[str, Mapping[str, Any]] | None = None,
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
        if params and params.get(name):
            entry["parameters"] = dict(params[name])
        use_binary = binary if isinstance(binary, bool) else a.nbytes >= binary
        if use_binary:
            raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
            entry.setdefault("parameters", {})["binary_data_size"] = len(raw)
            blobs.append(raw)
        else:
            entry["data"] = json_data(a)
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
    header: dict[str, Any] = {
        "inputs": _encode_tensors(req.inputs, binary, blobs, req.input_parameters)
    }
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
            entry["data"] = json_data(a)
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


def binary_outputs_requested(
    body: bytes, header_length: int | None, params: dict[str, Any]
) -> bool | set[str]:
    """Which outputs the client wants binary: all (``binary_data_output``), some, or none."""
    if params.get("binary_data_output"):
        return True
    head = body if header_length is None else body[:header_length]
    if b"binary_data" not in head:
        return False
    try:  # decode_request already parsed (and bounded) this header
        outs = json.loads(head).get("outputs") or []
    except (ValueError, RecursionError, AttributeError):
        return False
    if not isinstance(outs, list):
        return False
    names = {
        str(o["name"])
        for o in outs
        if isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data")
    }
    return names or False


def _split(
    body: bytes, header_length: int | None, limits: Limits | None
) -> tuple[dict[str, Any], memoryview]:
    """The JSON header (bounded by ``limits``; responses by depth only) and the binary rest."""
    if header_length is None:
        head, rest = body, b""
    else:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        head, rest = body[:header_length], body[header_length:]
    if limits is not None and len(head) > limits.max_json_bytes:
        raise LimitExceeded(
            f"the JSON part of the body is {len(head)} bytes, over the limit of "
            f"{limits.max_json_bytes}; send large tensors with the binary tensor data extension"
        )
    check_json_depth(head, limits.max_json_depth if limits is not None else _RESPONSE_DEPTH)
    try:
        header = json.loads(head)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, >4300 digits
        raise ProtocolError(
            f"body is not valid JSON: {exc.__class__.__name__}: {str(exc)[:200]}"
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError("body must be a JSON object")
    return header, memoryview(rest)


def _decode_tensors(
    entries: Any,
    rest: memoryview,
    what: str,
    params_out: dict[str, dict[str, Any]] | None = None,
) -> dict[str, np.ndarray]:
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
        name = name[:128]
        dt = e.get("datatype")
        if not isinstance(dt, str) or dt not in _LE:
            raise ProtocolError(f"tensor '{name}': unsupported datatype {str(dt)[:40]!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM for d in shape
        ):
            raise ProtocolError(
                f"tensor '{name}': shape must be a list of non-negative integers up to 2**62"
            )
        if len(shape) > MAX_DIMS:
            raise ProtocolError(f"tensor '{name}': {len(shape)} dimensions, at most {MAX_DIMS}")
        count = math.prod(shape)  # Python ints: no int64 wrap-around
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
            arr = _reshape(name, np.frombuffer(rest[offset : offset + size], dtype=dtype), shape)
            offset += size
        else:
            data = e.get("data")
            if data is None:
                raise ProtocolError(f"tensor '{name}' has neither 'data' nor binary_data_size")
            try:
                arr = np.asarray(data, dtype=V2_TO_DTYPE[dt])
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                raise ProtocolError(
                    f"tensor '{name}': data is not {dt}: {str(exc)[:200]}"
                ) from None
            if arr.size != count:
                raise ProtocolError(
                    f"tensor '{name}': {arr.size} values do not fill shape {shape[:MAX_DIMS]}"
                )
            arr = _reshape(name, arr, shape)
        if name in tensors:
            raise ProtocolError(f"tensor '{name}' appears twice in '{what}'")
        tensors[name] = arr
        if params_out is not None and isinstance(params, dict):
            kept = {k: v for k, v in params.items() if k != "binary_data_size"}
            if kept:
                params_out[name] = kept
    if offset != len(rest):
        raise ProtocolError(f"{len(rest) - offset} bytes after the last binary tensor")
    return tensors


def _reshape(name: str, arr: np.ndarray, shape: list[int]) -> np.ndarray:
    try:
        return arr.reshape(shape)
    except ValueError as exc:  # e.g. [0, 2**62, 2**62]: numpy's size arithmetic overflows
        raise ProtocolError(f"tensor '{name}': shape {shape} is not usable: {exc}") from None


def decode_request(
    body: bytes,
    header_length: int | None = None,
    *,
    model: str = "",
    version: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> InferRequest:
    """Decode a request body; ``model``/``version`` come from the URL or MQTT properties.

    ``limits`` bounds the JSON part (bytes and depth); body bytes and rows are the server's to
    check, since they depend on where the body came from.
    """
    header, rest = _split(body, header_length, limits)
    input_params: dict[str, dict[str, Any]] = {}
    inputs = _decode_tensors(header.get("inputs"), rest, "inputs", input_params)
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
        input_parameters=input_params,
    )


def wants_binary_outputs(body_header: InferRequest) -> bool:
    """Whether the request asked for binary outputs (V2 ``binary_data_output`` or per output)."""
    return bool(body_header.parameters.get("binary_data_output"))


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    header, rest = _split(body, header_length, None)
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
        check_json_depth(body, _RESPONSE_DEPTH)
        d = json.loads(body)
        if isinstance(d, dict) and isinstance(d.get("error"), str):
            return str(d["error"])
    except (ValueError, RecursionError, ProtocolError):
        pass
    text = body[:200].decode("utf-8", "replace")
    return f"non-V2 error body: {text!r}"
