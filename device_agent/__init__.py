"""The on-device daemon: model store, fleet commands, telemetry, local inference endpoint.

``from device_agent import Agent, load_config`` (loaded on first use, so ``import
device_agent`` stays as light as ``import edgecloud``). See docs/agent.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Agent", "AgentConfig", "load_config"]

_LAZY = {
    "Agent": "device_agent.agent",
    "AgentConfig": "device_agent.config",
    "load_config": "device_agent.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'device_agent' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
