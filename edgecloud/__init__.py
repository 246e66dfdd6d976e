"""edgecloud: edge-cloud hybrid inference.

``import edgecloud`` is light on purpose (numpy and the error tree): the client, runtimes and
transports are loaded on first use, so a device pays only for what it runs. The same names are
imported under ``TYPE_CHECKING`` (as httpx does), so a user's type checker sees the real classes
instead of ``Any``: a wrong keyword to ``HybridClient`` is an error before it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgecloud.errors import EdgeCloudError

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports on first use
    from edgecloud.client import HybridClient, HybridResult
    from edgecloud.transport.base import MockTransport, Transport
    from edgecloud.transport.v2 import InferRequest, InferResponse

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
