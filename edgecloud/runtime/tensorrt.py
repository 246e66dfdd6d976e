"""A native TensorRT engine backend, for devices whose package carries a prebuilt engine.

TensorRT and the CUDA runtime bindings (``cuda-python``) are imported only when a backend is
created, so importing this module costs nothing on a device without a GPU; a missing library is a
``MissingDependencyError`` naming ``pip install 'edgecloud[trt]'`` and a missing GPU is a
``BackendUnavailableError``. An engine is specific to the TensorRT version and the GPU's compute
capability it was built for; the converter records both in the variant's ``extra`` and
``engine_matches`` checks them before a deserialisation that would otherwise fail obscurely.

Buffers: device memory is allocated per input/output at the largest size seen so far and reused,
so steady-state requests of one shape do no allocation; copies and execution run on one CUDA
stream and the call returns after the stream synchronises.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.deps import require
from edgecloud.errors import BackendUnavailableError, RuntimeBackendError
from edgecloud.package.manifest import TensorSpec, Variant
from edgecloud.runtime.base import Backend, InputPolicy

__all__ = ["TensorRTBackend", "engine_matches", "gpu_compute_capability"]


def _cudart() -> Any:
    require("cuda", "trt", "CUDA runtime bindings for the TensorRT backend")
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeBackendError(f"CUDA {what} failed with error {int(err)}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def gpu_compute_capability(device: int = 0) -> str | None:
    """The GPU's compute capability as "8.7", or None when there is no usable GPU."""
    try:
        cudart = _cudart()
        major = _check(
            cudart.cudaDeviceGetAttribute(
                cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device
            ),
            "get compute capability",
        )
        minor = _check(
            cudart.cudaDeviceGetAttribute(
                cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device
            ),
            "get compute capability",
        )
    except Exception:
        return None
    return f"{major}.{minor}"


def engine_matches(variant: Variant) -> tuple[bool, str]:
    """Whether a TensorRT variant can run here, and why not when it cannot."""
    try:
        trt = require("tensorrt", "trt")
    except ImportError as exc:
        return False, str(exc)
    cc = gpu_compute_capability()
    if cc is None:
        return False, "no CUDA GPU found"
    want_cc = variant.extra.get("compute_capability")
    if want_cc is not None and str(want_cc) != cc:
        return False, f"engine built for compute capability {want_cc}, this GPU is {cc}"
    want_v = variant.extra.get("tensorrt_version")
    if want_v is not None and str(want_v) != str(trt.__version__):
        return False, f"engine built with TensorRT {want_v}, this device has {trt.__version__}"
    return True, ""


class TensorRTBackend(Backend):
    """Runs a serialised TensorRT engine with explicit I/O tensors (TensorRT 10 API)."""

    kind = "tensorrt"

    def __init__(
        self,
        engine_path: Path | str,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        *,
        policy: InputPolicy | None = None,
        device: int = 0,
    ) -> None:
        super().__init__(inputs, outputs, policy=policy)
        trt = require("tensorrt", "trt", "native TensorRT engine backend")
        self._cudart = cudart = _cudart()
        if gpu_compute_capability(device) is None:
            raise BackendUnavailableError("TensorRT backend needs a CUDA GPU; none was found")
        _check(cudart.cudaSetDevice(device), "set device")
        self.engine_path = Path(engine_path)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise RuntimeBackendError(
                f"TensorRT could not deserialise {self.engine_path.name} (built for another "
                "TensorRT version or GPU?)"
            )
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        in_names = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        want_in = {s.name for s in inputs}
        if in_names != want_in:
            raise RuntimeBackendError(
                f"{self.engine_path.name}: engine inputs {sorted(in_names)} differ from the "
                f"manifest's {sorted(want_in)}"
            )
        self._out_names = [s.name for s in outputs]
        missing = [n for n in self._out_names if n not in names]
        if missing:
            raise RuntimeBackendError(f"{self.engine_path.name}: engine lacks outputs {missing}")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity)
        self._stream = _check(cudart.cudaStreamCreate(), "create stream")
        self._lock = threading.Lock()  # one execution context: one request at a time

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr), "free")
            ptr = _check(self._cudart.cudaMalloc(max(nbytes, 1)), "malloc")
            self._buffers[name] = (ptr, nbytes)
            self._context.set_tensor_address(name, ptr)
        return int(ptr)

    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = self._cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            for name, arr in inputs.items():
                host = np.ascontiguousarray(arr, dtype=self._dtypes[name])
                if not self._context.set_input_shape(name, host.shape):
                    raise RuntimeBackendError(
                        f"input '{name}': shape {list(host.shape)} is outside the engine's "
                        "optimisation profile"
                    )
                ptr = self._buffer(name, host.nbytes)
                _check(
                    cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self._stream),
                    "copy to device",
                )
            results: dict[str, np.ndarray] = {}
            for name in self._out_names:
                shape = tuple(self._context.get_tensor_shape(name))
                out = np.empty(shape, dtype=self._dtypes[name])
                self._buffer(name, out.nbytes)
                results[name] = out
            if not self._context.execute_async_v3(self._stream):
                raise RuntimeBackendError(f"TensorRT failed to run {self.engine_path.name}")
            for name, out in results.items():
                ptr = self._buffers[name][0]
                _check(
                    cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self._stream),
                    "copy to host",
                )
            _check(cudart.cudaStreamSynchronize(self._stream), "synchronise")
        return results

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._cudart.cudaStreamDestroy(self._stream)
