"""Smaller upstream requests: FP16 or INT8 tensors for regions that accept them, byte counters.

An offloaded request carries the model's input tensors; for an FP32 model half of those bytes
are precision the cloud model rarely needs (docs/benchmarks.md measures the accuracy effect).
The device may send FP16 instead, but only to a region that says it can take them: a stock
Triton/KServe/MLServer region refuses an FP16 tensor for an FP32 input, as it should.

Contract (docs/protocol.md, "FP16 upstream"): the request carries the V2 request parameter
``upcast_fp16: true``; a region that understands it casts every FP16 input whose model input is
FP32 back to FP32 before validation, and nothing else (an FP16 tensor for an FP16 input stays,
an FP16 tensor without the parameter is the usual datatype error). ``upcast_fp16`` that is not
a boolean is a 400 naming it.

INT8 (docs/protocol.md, "INT8 upstream"): an FP32 input goes as a UINT8 tensor with a
per-tensor affine quantization computed from the tensor itself (its min and max over the request,
both widened to include 0.0, so 0.0 is exact) and two V2 *input* parameters: ``dequantize_scale``
(a string, the ``repr`` of the float: V2 parameter values are bool, int64 or string, and a
string carries a double exactly over both JSON and gRPC) and ``dequantize_zero_point`` (an
integer in 0..255). A region that understands them turns the tensor back into FP32,
``(q - zero_point) * scale``, before its one validator; malformed ones are a 400 naming the input
and the key. A region that does not would see a UINT8 tensor for an FP32 input and refuse it, so
the client sends INT8 only to the regions configured for it, as for FP16. A tensor holding NaN
or Inf, or an empty one, stays FP32 (no affine map represents it).

``UpstreamCounter`` is what the HTTP and MQTT transports count their encoded request bodies
with (``transport.upstream``; the gRPC transport counts its serialized messages): bytes per
offload come from the client's own counters, not from an estimate.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Collection
from typing import Any

import numpy as np

from edgecloud.errors import ConfigError, InputError
from edgecloud.transport.v2 import DTYPE_TO_V2, InferRequest

__all__ = [
    "PARAMETER",
    "SCALE",
    "ZERO_POINT",
    "UpstreamCounter",
    "check_setting",
    "check_settings",
    "dequantize_input",
    "downcast_fp16",
    "is_region_setting",
    "quantize_int8",
    "selects",
    "unknown_regions",
    "upcast_input",
    "wants_fp16",
]

#: The V2 request parameter that declares "FP16 sent for FP32 inputs: cast them up".
PARAMETER = "upcast_fp16"
#: The V2 input parameters of a UINT8 tensor that stands for an FP32 one.
SCALE = "dequantize_scale"
ZERO_POINT = "dequantize_zero_point"
_MAX_SCALE_CHARS = 64


class UpstreamCounter:
    """Requests and encoded body bytes sent upstream (thread-safe; transports share one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += n

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            per = self.bytes / self.requests if self.requests else 0.0
            return {"requests": self.requests, "bytes": self.bytes, "bytes_per_request": per}


def is_region_setting(setting: Any) -> bool:
    """Whether ``setting`` has the shape of ``upstream_fp16`` / ``upstream_int8``: a boolean, or
    a collection of non-empty region names (one rule for the client and both config files)."""
    if isinstance(setting, bool):
        return True
    return (
        isinstance(setting, Collection)
        and not isinstance(setting, str | bytes)
        and all(isinstance(n, str) and n for n in setting)
    )


def unknown_regions(setting: Any, names: Collection[str]) -> list[str]:
    """The region names ``setting`` selects that are not among ``names`` (a typo there would
    silently send FP32), sorted; empty for a boolean."""
    return [] if isinstance(setting, bool) else sorted(set(setting) - set(names))


def check_setting(setting: Any, key: str = "upstream_fp16") -> bool | frozenset[str]:
    """``HybridClient(upstream_fp16=...)`` (or ``upstream_int8``): True/False for every region,
    or region names."""
    if isinstance(setting, bool):
        return setting
    if is_region_setting(setting):
        return frozenset(setting)
    raise ConfigError(f"{key} must be true/false or a list of region names, got {setting!r}")


def check_settings(fp16: Any, int8: Any) -> tuple[bool | frozenset[str], bool | frozenset[str]]:
    """Both settings checked, and refused when they select one region: a tensor is sent one way."""
    a, b = check_setting(fp16, "upstream_fp16"), check_setting(int8, "upstream_int8")
    if a is True and b:
        both = "every region" if b is True else f"region(s) {sorted(b)}"
    elif b is True and a:
        both = "every region" if a is True else f"region(s) {sorted(a)}"
    elif isinstance(a, frozenset) and isinstance(b, frozenset) and a & b:
        both = f"region(s) {sorted(a & b)}"
    else:
        return a, b
    raise ConfigError(f"upstream_fp16 and upstream_int8 both select {both}: choose one per region")


def selects(setting: bool | frozenset[str], region: str) -> bool:
    """Whether ``setting`` (from check_setting: upstream_fp16 or upstream_int8) names ``region``."""
    return setting if isinstance(setting, bool) else region in setting


#: Whether requests to ``region`` go upstream as FP16 (the name the FP16 tests know).
wants_fp16 = selects


def downcast_fp16(request: InferRequest) -> InferRequest:
    """The request with its FP32 inputs as FP16 and ``upcast_fp16: true`` (others unchanged)."""
    inputs: dict[str, np.ndarray] = {}
    changed = False
    for name, arr in request.inputs.items():
        a = np.asarray(arr)
        if a.dtype == np.float32:
            inputs[name] = a.astype(np.float16)
            changed = True
        else:
            inputs[name] = a
    if not changed:
        return request
    params = {**request.parameters, PARAMETER: True}
    return dataclasses.replace(request, inputs=inputs, parameters=params)


def quantize_int8(request: InferRequest) -> InferRequest:
    """The request with its finite, non-empty FP32 inputs as UINT8 plus their dequantize
    parameters (see the module docstring); other inputs unchanged."""
    inputs: dict[str, np.ndarray] = {}
    params = {k: dict(v) for k, v in request.input_parameters.items()}
    changed = False
    for name, arr in request.inputs.items():
        a = np.asarray(arr)
        if a.dtype != np.float32 or a.size == 0 or not np.isfinite(a).all():
            inputs[name] = a
            continue
        lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        if np.float32(scale) == 0:  # a range below FP32's smallest step: nothing to gain
            inputs[name] = a
            continue
        zero_point = int(np.clip(round(-lo / scale), 0, 255))
        q = np.clip(np.rint(a.astype(np.float64) / scale) + zero_point, 0, 255)
        inputs[name] = q.astype(np.uint8)
        params[name] = {**params.get(name, {}), SCALE: repr(scale), ZERO_POINT: zero_point}
        changed = True
    if not changed:
        return request
    return dataclasses.replace(request, inputs=inputs, input_parameters=params)


def dequantize_input(
    request: InferRequest, name: str, arr: np.ndarray, want: Any, *, model: str
) -> np.ndarray:
    """Server side: ``arr`` back to FP32 when input ``name`` carries the dequantize parameters;
    else unchanged. Malformed parameters raise ``InputError`` naming the input and the key."""
    params = request.input_parameters.get(name) if request.input_parameters else None
    if not params or (SCALE not in params and ZERO_POINT not in params):
        return arr
    where = f"{model}: input '{name}'"

    def bad(key: str, why: str) -> InputError:
        return InputError(f"{where}: parameter '{key}' {why}", input_name=name)

    for key, other in ((SCALE, ZERO_POINT), (ZERO_POINT, SCALE)):
        if key not in params:
            raise bad(key, f"is missing ('{other}' is given; INT8 upstream needs both)")
    raw = params[SCALE]
    if not isinstance(raw, str) or len(raw) > _MAX_SCALE_CHARS:
        raise bad(SCALE, f"must be a string holding a float, got {str(raw)[:40]!r}")
    try:
        scale = float(raw)
    except ValueError:
        raise bad(SCALE, f"is not a float: {raw!r}") from None
    with np.errstate(over="ignore", under="ignore"):
        s32 = np.float32(scale)
        fits = bool(np.isfinite(s32 * np.float32(255)))
    if not (np.isfinite(scale) and scale > 0):
        raise bad(SCALE, f"must be a finite number > 0, got {raw!r}")
    if not (s32 > 0 and fits):
        raise bad(SCALE, f"must fit FP32 (0 < 255 * scale <= 3.4e38 and scale >= 1e-45): {raw!r}")
    zp = params[ZERO_POINT]
    if isinstance(zp, bool) or not isinstance(zp, int) or not 0 <= zp <= 255:
        raise bad(ZERO_POINT, f"must be an integer in 0..255, got {str(zp)[:40]!r}")
    if arr.dtype != np.uint8:
        dt = DTYPE_TO_V2.get(arr.dtype, str(arr.dtype))
        raise bad(SCALE, f"is for UINT8 tensors, but the tensor is {dt}")
    if np.dtype(want) != np.float32:
        dt = DTYPE_TO_V2.get(np.dtype(want), str(want))
        raise bad(SCALE, f"is for FP32 model inputs, but this input is {dt}")
    return (arr.astype(np.float32) - np.float32(zp)) * s32


def upcast_input(request: InferRequest, arr: np.ndarray, want: Any, *, model: str) -> np.ndarray:
    """Server side: ``arr`` cast to FP32 when it is FP16, the model input FP32 and the request
    declared ``upcast_fp16: true``; else ``arr`` unchanged (the dtype check then judges it)."""
    flag = request.parameters.get(PARAMETER) if request.parameters else None
    if flag is None:
        return arr
    if not isinstance(flag, bool):
        raise InputError(
            f"{model}: request parameter '{PARAMETER}' must be true or false, got {flag!r}"
        )
    if flag and arr.dtype == np.float16 and np.dtype(want) == np.float32:
        return arr.astype(np.float32)
    return arr
