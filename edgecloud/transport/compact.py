"""Smaller upstream requests: FP16 tensors for regions that accept them, and byte counters.

An offloaded request carries the model's input tensors; for an FP32 model half of those bytes
are precision the cloud model rarely needs (docs/benchmarks.md measures the accuracy effect).
The device may send FP16 instead, but only to a region that says it can take them: a stock
Triton/KServe/MLServer region refuses an FP16 tensor for an FP32 input, as it should.

Contract (docs/protocol.md, "FP16 upstream"): the request carries the V2 request parameter
``upcast_fp16: true``; a region that understands it casts every FP16 input whose model input is
FP32 back to FP32 before validation, and nothing else (an FP16 tensor for an FP16 input stays,
an FP16 tensor without the parameter is the usual datatype error). ``upcast_fp16`` that is not
a boolean is a 400 naming it.

``UpstreamCounter`` is what the HTTP and MQTT transports count their encoded request bodies
with (``transport.upstream``): bytes per offload come from the client's own counters, not from
an estimate.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Collection
from typing import Any

import numpy as np

from edgecloud.errors import ConfigError, InputError
from edgecloud.transport.v2 import InferRequest

__all__ = [
    "PARAMETER",
    "UpstreamCounter",
    "check_setting",
    "downcast_fp16",
    "upcast_input",
    "wants_fp16",
]

#: The V2 request parameter that declares "FP16 sent for FP32 inputs: cast them up".
PARAMETER = "upcast_fp16"


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


def check_setting(setting: Any) -> bool | frozenset[str]:
    """``HybridClient(upstream_fp16=...)``: True/False for every region, or region names."""
    if isinstance(setting, bool):
        return setting
    if isinstance(setting, Collection) and not isinstance(setting, str | bytes):
        names = list(setting)
        if all(isinstance(n, str) and n for n in names):
            return frozenset(names)
    raise ConfigError(
        f"upstream_fp16 must be true/false or a list of region names, got {setting!r}"
    )


def wants_fp16(setting: bool | frozenset[str], region: str) -> bool:
    """Whether requests to ``region`` go upstream as FP16 (``setting`` from check_setting)."""
    return setting if isinstance(setting, bool) else region in setting


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
