"""The fleet's MQTT payloads: shadow, jobs, telemetry and status (topics in edgecloud.topics).

Both the controller and the device agent parse through these classes, so a malformed payload is
refused at one place with a ``FleetError`` naming the field, and the two sides cannot drift apart.
All payloads are JSON objects; unknown fields are ignored so that either side can be upgraded
first. The vocabulary of jobs follows AWS IoT Jobs (execution states, in-progress timeout,
rollout rate, abort criteria) so that operators who know it need not learn another.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar, TypeVar

from edgecloud.errors import FleetError

__all__ = [
    "POLICY_MODES",
    "TERMINAL_STATES",
    "DesiredState",
    "ExecutionState",
    "ExecutionUpdate",
    "JobCancel",
    "JobNotification",
    "ReportedState",
    "StatusMessage",
    "TelemetryRecord",
    "dumps",
    "loads",
    "validate_policy",
]

#: The routing modes a policy may name (the device agent's and the controller's one list).
POLICY_MODES = ("edge_first", "edge_only", "cloud_only", "cloud_first")


class ExecutionState(StrEnum):
    """A job execution's state on one device (AWS IoT Jobs' names)."""

    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    REMOVED = "REMOVED"


TERMINAL_STATES = frozenset(
    {
        ExecutionState.SUCCEEDED,
        ExecutionState.FAILED,
        ExecutionState.REJECTED,
        ExecutionState.TIMED_OUT,
        ExecutionState.CANCELED,
        ExecutionState.REMOVED,
    }
)


def dumps(obj: Any) -> bytes:
    """Compact JSON of a payload dataclass (or a plain dict)."""
    data = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    return json.dumps(data, separators=(",", ":"), default=_default).encode()


def _default(o: Any) -> Any:
    if isinstance(o, Enum):
        return o.value
    raise TypeError(f"cannot encode {type(o).__name__}")


def loads(payload: bytes | str, what: str) -> dict[str, Any]:
    """Parse a JSON object payload or raise ``FleetError`` naming the message kind."""
    try:
        d = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FleetError(f"{what}: payload is not valid JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise FleetError(f"{what}: payload must be a JSON object, got {type(d).__name__}")
    return d


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in d:
        raise FleetError(f"{what}: missing field '{key}'")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float, (int, float))):
        raise FleetError(f"{what}: field '{key}' must be {_tname(typ)}, got {v!r}")
    return v


def _tname(typ: type | tuple[type, ...]) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


@dataclass(frozen=True)
class JobNotification:
    """Controller -> device on ``jobs/notify`` (QoS 1): run this job execution.

    ``operation`` is ``deploy`` (document: package_url, sha256, model, version), ``rollback``
    (document: optional version to return to) or ``policy`` (document: a routing policy dict).
    ``timeout_s`` is the in-progress timeout after which the controller marks it TIMED_OUT.
    """

    job_id: str
    operation: str
    document: dict[str, Any]
    execution_number: int = 1
    timeout_s: float = 600.0
    issued_at: float = 0.0

    OPERATIONS = ("deploy", "rollback", "policy")

    @classmethod
    def parse(cls, payload: bytes | str) -> JobNotification:
        what = "job notification"
        d = loads(payload, what)
        op = _get(d, "operation", str, what)
        if op not in cls.OPERATIONS:
            raise FleetError(f"{what}: unknown operation {op!r} (expected one of {cls.OPERATIONS})")
        return cls(
            job_id=_get(d, "job_id", str, what),
            operation=op,
            document=_get(d, "document", dict, what),
            execution_number=int(d.get("execution_number", 1)),
            timeout_s=float(d.get("timeout_s", 600.0)),
            issued_at=float(d.get("issued_at", 0.0)),
        )


@dataclass(frozen=True)
class JobCancel:
    """Controller -> device on ``jobs/cancel`` (QoS 1): stop this job execution.

    Sent when the controller ends an execution the device may be running or may resume after a
    restart: an in-progress timeout, ``fleet cancel`` (all notified executions; with ``--force``
    also those in progress), an abort, or a retry that replaces the execution with a new
    ``execution_number``. A device that receives it does not start, resume or finish that
    execution (it stops at the next step boundary, before the swap) and reports ``CANCELED``.
    """

    job_id: str
    execution_number: int
    reason: str = ""

    @classmethod
    def parse(cls, payload: bytes | str) -> JobCancel:
        what = "job cancel"
        d = loads(payload, what)
        return cls(
            job_id=_get(d, "job_id", str, what),
            execution_number=int(_get(d, "execution_number", int, what)),
            reason=str(d.get("reason", "")),
        )


@dataclass(frozen=True)
class ExecutionUpdate:
    """Device -> controller on ``jobs/{job_id}/update`` (QoS 1), idempotent by (job, seq).

    A device retries an update until it is acknowledged by delivery (QoS 1) and never rolls back
    a committed deployment because a report failed: reports are separate from the work.
    """

    job_id: str
    device_id: str
    status: ExecutionState
    seq: int
    ts: float
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    execution_number: int = 1

    @classmethod
    def parse(cls, payload: bytes | str) -> ExecutionUpdate:
        what = "job execution update"
        d = loads(payload, what)
        status = _get(d, "status", str, what)
        try:
            state = ExecutionState(status)
        except ValueError:
            raise FleetError(f"{what}: unknown status {status!r}") from None
        return cls(
            job_id=_get(d, "job_id", str, what),
            device_id=_get(d, "device_id", str, what),
            status=state,
            seq=int(_get(d, "seq", int, what)),
            ts=float(_get(d, "ts", (int, float), what)),
            reason=str(d.get("reason", "")),
            details=dict(d.get("details") or {}),
            execution_number=int(d.get("execution_number", 1)),
        )


_S = TypeVar("_S", bound="_ShadowDocument")


@dataclass(frozen=True)
class _ShadowDocument:
    """The shape both halves of a shadow share: a version, a state document, a timestamp."""

    version: int
    state: dict[str, Any]
    ts: float = 0.0

    _WHAT: ClassVar[str] = "shadow document"

    @classmethod
    def parse(cls: type[_S], payload: bytes | str) -> _S:
        what = cls._WHAT
        d = loads(payload, what)
        return cls(
            version=int(_get(d, "version", int, what)),
            state=_get(d, "state", dict, what),
            ts=float(d.get("ts", 0.0)),
        )


@dataclass(frozen=True)
class DesiredState(_ShadowDocument):
    """Controller -> device, retained on ``shadow/desired``.

    ``version`` increases with every change (optimistic concurrency: the controller refuses an
    update based on a stale version); ``state`` holds ``model`` (name, version, package_url,
    sha256) and ``policy`` (mode, threshold, regions, ...). The device acts on the delta between
    this and its reported state.
    """

    _WHAT: ClassVar[str] = "desired state"


@dataclass(frozen=True)
class ReportedState(_ShadowDocument):
    """Device -> controller, retained on ``shadow/reported``: what the device actually runs.

    The device publishes it after every change of what it runs or how it routes (a deploy or
    rollback by job or by desired state, a policy change, and once at every start), with a
    ``version`` that increases by one per publication and survives restarts, and the identity
    ``epoch`` of the device's store. The controller keeps the highest (epoch, version) it has
    seen, so a stale retained copy that arrives late (after a reconnect, say) never overwrites a
    newer one. ``desired_version`` is the desired state the device last acted on.
    """

    epoch: str = ""
    desired_version: int = 0

    _WHAT: ClassVar[str] = "reported state"

    @classmethod
    def parse(cls, payload: bytes | str) -> ReportedState:
        what = cls._WHAT
        d = loads(payload, what)
        return cls(
            version=int(_get(d, "version", int, what)),
            state=_get(d, "state", dict, what),
            ts=float(d.get("ts", 0.0)),
            epoch=str(d.get("epoch", "")),
            desired_version=int(d.get("desired_version", 0) or 0),
        )


@dataclass(frozen=True)
class TelemetryRecord:
    """Device -> controller on ``telemetry`` (QoS 1). ``seq`` increases by one per record per
    device and survives restarts (it lives in the durable queue), so the receiver deduplicates
    redeliveries and detects gaps. ``epoch`` names the device's identity epoch: a device whose
    store was wiped starts a new one (and its seq from 1), which the receiver treats as a new
    sequence, not as duplicates of the old one."""

    device_id: str
    seq: int
    ts: float
    kind: str = "heartbeat"
    data: dict[str, Any] = field(default_factory=dict)
    epoch: str = ""

    @classmethod
    def parse(cls, payload: bytes | str) -> TelemetryRecord:
        what = "telemetry record"
        d = loads(payload, what)
        return cls(
            device_id=_get(d, "device_id", str, what),
            seq=int(_get(d, "seq", int, what)),
            ts=float(_get(d, "ts", (int, float), what)),
            kind=str(d.get("kind", "heartbeat")),
            data=dict(d.get("data") or {}),
            epoch=str(d.get("epoch", "")),
        )


@dataclass(frozen=True)
class StatusMessage:
    """Device -> anyone, retained on ``status``; the offline form is the device's last will."""

    device_id: str
    online: bool
    ts: float
    group: str = ""
    model_version: str = ""
    agent_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    epoch: str = ""

    @classmethod
    def parse(cls, payload: bytes | str) -> StatusMessage:
        what = "status message"
        d = loads(payload, what)
        online = _get(d, "online", bool, what)
        return cls(
            device_id=_get(d, "device_id", str, what),
            online=online,
            ts=float(d.get("ts", 0.0)),
            group=str(d.get("group", "")),
            model_version=str(d.get("model_version", "")),
            agent_version=str(d.get("agent_version", "")),
            labels={str(k): str(v) for k, v in dict(d.get("labels") or {}).items()},
            epoch=str(d.get("epoch", "")),
        )


def validate_policy(policy: Mapping[str, Any], what: str = "policy") -> dict[str, Any]:
    """Check a routing policy before it is sent; ``FleetError`` names the field.

    ``mode`` must be one of ``POLICY_MODES``, ``threshold`` a number in [0, 1] (or null for the
    agent's configured one), ``regions`` a list of strings, ``deadline_s`` a positive number,
    ``max_concurrency`` a positive integer. Other keys pass through (an agent reports those it
    does not act on as ``policy_ignored``). The controller refuses here what every device would
    refuse, so a bad value never reaches a desired state or a job.
    """
    if not isinstance(policy, Mapping):
        raise FleetError(f"{what} must be an object, got {type(policy).__name__}")
    out = dict(policy)
    if "mode" in out and out["mode"] not in POLICY_MODES:
        raise FleetError(f"{what}.mode must be one of {list(POLICY_MODES)}, got {out['mode']!r}")
    if "threshold" in out and out["threshold"] is not None:
        t = out["threshold"]
        if (
            isinstance(t, bool)
            or not isinstance(t, int | float)
            or not math.isfinite(float(t))
            or not 0.0 <= float(t) <= 1.0
        ):
            raise FleetError(f"{what}.threshold must be a number in [0, 1], got {t!r}")
    if "regions" in out and (
        not isinstance(out["regions"], list) or not all(isinstance(r, str) for r in out["regions"])
    ):
        raise FleetError(f"{what}.regions must be a list of region names, got {out['regions']!r}")
    if "deadline_s" in out:
        v = out["deadline_s"]
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or not math.isfinite(float(v))
            or v <= 0
        ):
            raise FleetError(f"{what}.deadline_s must be a positive number of seconds, got {v!r}")
    if "max_concurrency" in out:
        v = out["max_concurrency"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FleetError(f"{what}.max_concurrency must be a positive integer, got {v!r}")
    return out
