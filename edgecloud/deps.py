"""Lazy imports of optional dependencies.

Heavy or optional libraries (tensorrt, torch, the cloud server's web stack) are imported only by the
function that needs them, through ``require``, so ``import edgecloud`` stays light on a device and a
missing extra becomes one clear ``MissingDependencyError`` naming the pip command instead of an
``ImportError`` from deep inside a call.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgecloud.errors import MissingDependencyError

__all__ = ["available", "require"]


def require(module: str, extra: str, why: str = "") -> ModuleType:
    """Import ``module`` or raise ``MissingDependencyError`` naming ``edgecloud[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module, extra, why) from exc


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it when it is absent."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
