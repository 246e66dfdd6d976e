"""The client's settings: one schema for the Python API, the client's TOML and the agent's TOML.

``HybridClient`` is configured by four frozen groups, each checked once when it is built, so a
bad value is a ``ConfigError`` naming the field wherever it came from (a keyword, a
``[routing]`` key of the client's config file, or the agent's ``agent.toml``):

- ``LocalSettings``: how the local model is loaded and how many requests may run on it at once;
- ``RoutingSettings``: the mode, the confidence threshold, the deadline, the cloud input adapter;
- ``FailoverSettings``: health probes and circuit breakers, shared by every region;
- ``EscalationSettings``: background escalation, its rate limit and audits
  (``routing.escalation``).

``ClientSettings`` holds the four; ``ClientSettings.with_options(**kw)`` applies the client's
flat keywords (``HybridClient(threshold=0.8, max_concurrency=2)``), each to the one group that
declares it. Adding a client option is one field in its group plus one key in ``ClientOptions``
(``tests/routing/test_settings.py`` checks that the two agree) and, when files may set it, one
key in the config reader (``edgecloud.config``).

``RegionConfig`` is the one description of a cloud region, read by the client's
``[[regions]]``, the agent's ``[[regions]]`` and the client's ``regions=[{...}]`` mappings alike
(``RegionConfig.from_mapping``); ``check_threshold`` is the one threshold check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from edgecloud.errors import ConfigError
from edgecloud.routing.modes import Mode, parse_mode
from edgecloud.routing.regions import CloudInputs
from edgecloud.routing.result import DEFAULT_THRESHOLD
from edgecloud.runtime.base import InputPolicy
from edgecloud.transport.compact import check_settings as check_upstream_settings

if TYPE_CHECKING:
    from edgecloud.routing.confidence import ConfidencePolicy
    from edgecloud.transport.base import Transport

__all__ = [
    "DEFAULT_THRESHOLD",
    "ClientOptions",
    "ClientSettings",
    "EscalationSettings",
    "FailoverSettings",
    "LocalSettings",
    "RegionConfig",
    "RoutingSettings",
    "check_threshold",
]

Shape = tuple[int, ...]
#: One threshold, or one per model name (``"*"``: every other model).
Threshold = float | dict[str, float]


def check_threshold(
    value: object, where: str = "threshold", *, above_one: bool = False
) -> Threshold:
    """A confidence threshold: a number in [0, 1], or a mapping of model name to one.

    The one check behind the client's keyword, ``set_policy``, the per-request override and
    both config files. ``above_one`` admits numbers above 1 (a threshold no answer reaches:
    every request goes on to the cloud), which only the Python constructor takes.
    """
    if isinstance(value, Mapping):
        return {
            str(k): _one_threshold(v, f"{where} for '{k}'", above_one) for k, v in value.items()
        }
    return _one_threshold(value, where, above_one)


def _one_threshold(value: object, where: str, above_one: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or value < 0.0
        or (value > 1.0 and not above_one)
    ):
        bounds = "a number >= 0" if above_one else "a number in [0, 1]"
        raise ConfigError(f"{where} must be {bounds}, got {value!r}")
    return float(value)


def check_shape(value: object, where: str) -> Shape | dict[str, Shape]:
    """A per-sample shape (positive integers), or a mapping of input name to one."""
    if isinstance(value, Mapping):
        return {str(k): _one_shape(v, f"{where}.{k}") for k, v in value.items()}
    return _one_shape(value, where)


def _one_shape(value: object, where: str) -> Shape:
    if not isinstance(value, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value
    ):
        raise ConfigError(f"{where}: expected a list of positive integers, got {value!r}")
    return tuple(value)


def _positive(value: object, where: str, *, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{where}: expected a number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class LocalSettings:
    """How the local model is loaded (``[model]``) and how much of the device it may use."""

    require_signature: bool = True
    variant: str = "auto"
    providers: tuple[str, ...] | None = None
    threads: int | None = None
    inter_op_threads: int | None = None
    input_policy: InputPolicy | None = None
    #: Local inference slots, and how many callers may wait for one (and how long).
    max_concurrency: int = 1
    max_queue: int = 0
    max_wait: float = 0.05
    #: Above this system CPU load a request counts as ``no_capacity`` (None: not checked).
    max_cpu_percent: float | None = None

    def __post_init__(self) -> None:
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """Where a request goes: the mode, the threshold, the deadline and the cloud's input form."""

    mode: Mode | str = Mode.EDGE_FIRST
    #: None: the manifest's ``confidence_threshold``, else ``DEFAULT_THRESHOLD``.
    threshold: Threshold | None = None
    confidence: str | ConfidencePolicy | Callable[..., Any] = "max_probability"
    #: Seconds a request may take in all (None: no limit).
    deadline: float | None = 1.0
    #: Adapts the local inputs to the cloud model's (or ``cloud_input_shape`` reshapes them).
    cloud_inputs: CloudInputs | None = None
    cloud_input_shape: Shape | dict[str, Shape] | None = None
    #: FP32 inputs sent as FP16 to every region (True) or to those named
    #: (edgecloud/transport/compact.py; only regions that honour ``upcast_fp16``).
    upstream_fp16: bool | frozenset[str] = False
    #: FP32 inputs sent as UINT8 with per-tensor dequantize parameters, likewise; never to a
    #: region ``upstream_fp16`` selects too.
    upstream_int8: bool | frozenset[str] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_mode(self.mode))
        fp16, int8 = check_upstream_settings(self.upstream_fp16, self.upstream_int8)
        object.__setattr__(self, "upstream_fp16", fp16)
        object.__setattr__(self, "upstream_int8", int8)
        if self.threshold is not None:
            object.__setattr__(self, "threshold", check_threshold(self.threshold, above_one=True))
        if self.deadline is not None and not (
            isinstance(self.deadline, int | float)
            and not isinstance(self.deadline, bool)
            and self.deadline > 0
        ):
            raise ConfigError(f"deadline must be > 0 seconds or None, got {self.deadline!r}")
        if self.cloud_inputs is not None and self.cloud_input_shape is not None:
            raise ConfigError("give cloud_inputs or cloud_input_shape, not both")
        if self.cloud_input_shape is not None:
            shape = check_shape(self.cloud_input_shape, "cloud_input_shape")
            object.__setattr__(self, "cloud_input_shape", shape)


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    """Region health, for every region: probes (``HealthProber``) and breakers."""

    #: Seconds between readiness probes (None: no prober thread; real requests only).
    probe_interval: float | None = 5.0
    probe_timeout: float = 1.0
    #: Consecutive failures that open a region's breaker, and how long it stays open.
    failure_threshold: int = 3
    cooldown: float = 10.0


@dataclass(frozen=True, slots=True)
class EscalationSettings:
    """Escalation of unsure answers (``routing.escalation.Escalation`` takes these fields)."""

    escalate: str = "sync"
    rate_limit: float | None = None
    burst: float | None = None
    audit_rate: float = 0.0
    workers: int = 1
    max_queue: int = 32
    deadline: float = 5.0
    seed: int | None = None
    recent: int = 32


class ClientOptions(TypedDict, total=False):
    """The keywords ``HybridClient`` takes besides its model, regions and clock.

    Each is a field of exactly one settings group; ``ClientSettings.with_options`` puts it there.
    """

    require_signature: bool
    variant: str
    providers: tuple[str, ...] | list[str] | None
    threads: int | None
    inter_op_threads: int | None
    input_policy: InputPolicy | None
    max_concurrency: int
    max_queue: int
    max_wait: float
    max_cpu_percent: float | None
    mode: Mode | str
    threshold: float | Mapping[str, float] | None
    confidence: str | ConfidencePolicy | Callable[..., Any]
    deadline: float | None
    cloud_inputs: CloudInputs | None
    cloud_input_shape: Shape | Mapping[str, Shape] | list[int] | None
    upstream_fp16: bool | Sequence[str]
    upstream_int8: bool | Sequence[str]
    probe_interval: float | None
    probe_timeout: float
    failure_threshold: int
    cooldown: float


_GROUPS = ("local", "routing", "failover")


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """All of a client's settings, by group (see the module docstring)."""

    local: LocalSettings = field(default_factory=LocalSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    escalation: EscalationSettings = field(default_factory=EscalationSettings)

    def with_options(self, **options: Any) -> ClientSettings:
        """These settings with the client's flat keywords applied, each to its own group."""
        if not options:
            return self
        changes: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            group = _OWNER.get(key)
            if group is None:
                raise ConfigError(
                    f"unknown client option {key!r} (known: {', '.join(sorted(_OWNER))})"
                )
            changes.setdefault(group, {})[key] = value
        return dataclasses.replace(
            self,
            **{g: dataclasses.replace(getattr(self, g), **kw) for g, kw in changes.items()},
        )


#: Which group declares each flat keyword (escalation's fields travel as ``escalation=``).
_OWNER: dict[str, str] = {
    f.name: group
    for group, cls in zip(_GROUPS, (LocalSettings, RoutingSettings, FailoverSettings), strict=True)
    for f in dataclasses.fields(cls)
}

# -- regions --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionConfig:
    """One cloud region: where it is, which model to ask for, and how long to wait for it.

    ``timeout`` (seconds; ``timeout_s`` in files, the agent's spelling, is the same key) caps one
    attempt there. ``transport`` (an already built ``Transport``, instead of ``endpoint``) and
    ``cloud_inputs`` (a callable) exist in Python only.
    """

    name: str
    endpoint: str | None = None
    model: str | None = None
    version: str | None = None
    priority: int = 0
    timeout: float | None = None
    cloud_input_shape: Shape | dict[str, Shape] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    transport: Transport | None = None
    cloud_inputs: CloudInputs | None = None

    def __post_init__(self) -> None:
        where = f"region {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a region needs a non-empty 'name', got {self.name!r}")
        for key in ("endpoint", "model", "version"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"{where}: {key}: expected a non-empty string, got {v!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConfigError(f"{where}: priority: expected an integer, got {self.priority!r}")
        _positive(self.timeout, f"{where}: timeout")
        if self.cloud_input_shape is not None:
            shape = check_shape(self.cloud_input_shape, f"{where}: cloud_input_shape")
            object.__setattr__(self, "cloud_input_shape", shape)
            if self.cloud_inputs is not None:
                raise ConfigError(f"{where}: give cloud_inputs or cloud_input_shape, not both")
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"{where}: options: expected a table, got {self.options!r}")
        if self.transport is None:
            if self.endpoint is None:
                raise ConfigError(f"{where}: needs an 'endpoint' or a 'transport'")
            from edgecloud.transport import check_endpoint

            check_endpoint(self.endpoint, region=self.name)

    @property
    def timeout_s(self) -> float | None:
        """``timeout`` under the agent config's name for it."""
        return self.timeout

    def as_client_region(self) -> RegionConfig:
        """What ``HybridClient(regions=...)`` takes: this config itself (kept for old callers)."""
        return self

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], where: str, *, python: bool = False
    ) -> RegionConfig:
        """Check one ``[[regions]]`` table (or a ``regions=[{...}]`` mapping when ``python``).

        Errors name ``where`` and the key as written (``regions[0].timeout_s: ...``). In a
        Python mapping a None value means "not set", and ``transport``/``cloud_inputs`` are
        allowed.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
        known = _REGION_KEYS | ({"transport", "cloud_inputs"} if python else set())
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(known)})")
        if "timeout" in raw and "timeout_s" in raw:
            raise ConfigError(f"{where}: give timeout or timeout_s, not both")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None and python:
                continue
            k = "timeout" if key == "timeout_s" else key
            values[k] = _region_value(k, value, f"{where}.{key}")
        if "name" not in values:
            raise ConfigError(f"{where}: missing required key 'name'")
        if "endpoint" not in values and "transport" not in values:
            raise ConfigError(f"{where}: missing required key 'endpoint'")
        if "transport" not in values:  # the scheme, once every key's type is known good
            from edgecloud.transport import check_endpoint

            try:
                check_endpoint(values["endpoint"], region=values["name"])
            except ConfigError as exc:
                raise ConfigError(f"{where}.endpoint: {exc}") from None
        return cls(**values)


_REGION_KEYS = {
    "name",
    "endpoint",
    "model",
    "version",
    "priority",
    "timeout",
    "timeout_s",
    "cloud_input_shape",
    "options",
}


def _region_value(key: str, value: Any, where: str) -> Any:
    if key in ("name", "endpoint", "model", "version"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
        return value
    if key == "priority":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if key == "timeout":
        return _positive(value, where, optional=False)
    if key == "cloud_input_shape":
        return check_shape(value, where)
    if key == "options":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    return value  # transport, cloud_inputs: Python objects, checked where they are used
