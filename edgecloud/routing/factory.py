"""Regions built from their config: ``RegionConfig`` (or a mapping of its keys) -> ``Region``.

The one path from a description of a region (the client's ``[[regions]]``, the agent's, or
``HybridClient(regions=[{...}])``) to a live ``Region`` with its transport and breaker, and the
``reshape_adapter`` a ``cloud_input_shape`` becomes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgecloud.errors import ConfigError, InputError
from edgecloud.routing.breaker import CircuitBreaker
from edgecloud.routing.regions import CloudInputs, Region
from edgecloud.settings import FailoverSettings, RegionConfig

__all__ = ["RegionSpec", "build_region", "build_regions", "reshape_adapter"]

Shape = tuple[int, ...]
#: What ``HybridClient(regions=...)`` takes for one region.
RegionSpec = Region | RegionConfig | Mapping[str, Any]


def reshape_adapter(shape: Shape | Mapping[str, Shape]) -> CloudInputs:
    """A ``cloud_inputs`` adapter reshaping each input to ``[batch, *shape]``.

    For a cloud model with another layout of the same data (the digits MLP takes [N, 64], the CNN
    [N, 1, 8, 8]); a mapping gives a shape per input name, inputs it omits pass unchanged.
    """
    per_input = dict(shape) if isinstance(shape, Mapping) else None
    fixed = tuple(shape) if per_input is None else ()  # type: ignore[arg-type]

    def adapt(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, arr in inputs.items():
            target = fixed if per_input is None else per_input.get(name)
            if target is None:
                out[name] = arr
                continue
            try:
                out[name] = arr.reshape((arr.shape[0], *target))
            except ValueError as exc:
                raise InputError(
                    f"input '{name}': cannot reshape {list(arr.shape)} to "
                    f"[batch, {', '.join(map(str, target))}] for the cloud model",
                    input_name=name,
                ) from exc
        return out

    return adapt


def build_region(
    spec: RegionSpec,
    failover: FailoverSettings,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Region:
    """A live region from ``spec`` (a ``Region`` is taken as it is)."""
    if isinstance(spec, Region):
        return spec
    if isinstance(spec, Mapping):
        name = spec.get("name")
        spec = RegionConfig.from_mapping(spec, f"region {name!r}", python=True)
    if not isinstance(spec, RegionConfig):
        raise ConfigError(f"a region must be a Region or a mapping, got {type(spec).__name__}")
    transport = spec.transport
    if transport is None:
        from edgecloud.transport import open_transport

        assert spec.endpoint is not None  # RegionConfig checked it
        transport = open_transport(spec.endpoint, region=spec.name, **spec.options)
    adapter = spec.cloud_inputs
    if spec.cloud_input_shape is not None:
        adapter = reshape_adapter(spec.cloud_input_shape)
    return Region(
        spec.name,
        transport,
        priority=spec.priority,
        model=spec.model,
        version=spec.version,
        timeout=spec.timeout,
        cloud_inputs=adapter,
        breaker=CircuitBreaker(failover.failure_threshold, failover.cooldown, clock=clock),
    )


def build_regions(
    specs: Sequence[RegionSpec],
    failover: FailoverSettings,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> list[Region]:
    """Every region of ``specs``; on an error, closes the transports already opened."""
    built: list[Region] = []
    try:
        for spec in specs:
            built.append(build_region(spec, failover, clock=clock))
    except BaseException:
        for b in built:
            b.transport.close()
        raise
    return built
