"""The local inference seam: backends implement ``_infer_impl`` only.

As in Polygraphy's runners, the public ``infer`` owns the lifecycle and input validation, so every
backend (onnxruntime, TensorRT, a user's own) refuses bad input the same way and with the same
messages, and a backend author cannot forget a check.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import numpy as np

from edgecloud.errors import RuntimeBackendError
from edgecloud.package.manifest import TensorSpec

__all__ = ["Backend"]


class Backend(ABC):
    """Runs one model variant locally."""

    #: Name of the backend ("onnxruntime", "tensorrt") for results and metrics.
    kind: str = ""

    def __init__(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        self.input_specs = inputs
        self.output_specs = outputs
        self._closed = False

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the model and run it."""
        if self._closed:
            raise RuntimeBackendError(f"{self.kind} backend is closed")
        return self._infer_impl(self.validate(inputs))

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check names, ranks, shapes, dtypes; return arrays ready for ``_infer_impl``.

        Overridden by backends that hold a validation policy; the default accepts arrays as given.
        """
        return {k: np.asarray(v) for k, v in inputs.items()}

    @abstractmethod
    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on already validated inputs."""

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
