"""edgecloud: edge-cloud hybrid inference.

``import edgecloud`` is light on purpose (numpy and the error tree): the client, runtimes and
transports are loaded on first use, so a device pays only for what it runs.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgecloud.errors import EdgeCloudError

__version__ = "0.1.0"

_LAZY = {
    "HybridClient": "edgecloud.client",
    "HybridResult": "edgecloud.client",
    "MockTransport": "edgecloud.transport.base",
    "Transport": "edgecloud.transport.base",
    "InferRequest": "edgecloud.transport.v2",
    "InferResponse": "edgecloud.transport.v2",
}

__all__ = [
    "EdgeCloudError",
    "HybridClient",
    "HybridResult",
    "InferRequest",
    "InferResponse",
    "MockTransport",
    "Transport",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgecloud' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
