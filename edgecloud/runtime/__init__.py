"""Local inference: one small ``Backend`` seam, an onnxruntime backend, a TensorRT engine backend.

``load_backend`` verifies a package and loads the variant that fits the device; see
docs/routing.md for how the router uses the result.
"""

from edgecloud.runtime.base import Backend, InputMessages, InputPolicy
from edgecloud.runtime.loader import LoadedModel, explain_selection, load_backend, select_variant
from edgecloud.runtime.ort import (
    OnnxRuntimeBackend,
    available_providers,
    choose_providers,
    read_specs,
)

__all__ = [
    "Backend",
    "InputMessages",
    "InputPolicy",
    "LoadedModel",
    "OnnxRuntimeBackend",
    "available_providers",
    "choose_providers",
    "explain_selection",
    "load_backend",
    "read_specs",
    "select_variant",
]
