"""The fleet's MQTT payloads: shadow, jobs, telemetry and status (topics in edgecloud.topics).

Both the controller and the device agent parse through these classes, so a malformed payload is
refused at one place with a ``FleetError`` naming the field, and the two sides cannot drift apart.
All payloads are JSON objects; unknown fields are ignored so that either side can be upgraded
first. The vocabulary of jobs follows AWS IoT Jobs (execution states, in-progress timeout,
rollout rate, abort criteria) so that operators who know it need not learn another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar, TypeVar

from edgecloud.errors import FleetError

__all__ = [
    "TERMINAL_STATES",
    "DesiredState",
    "ExecutionState",
    "ExecutionUpdate",
    "JobNotification",
    "ReportedState",
    "StatusMessage",
    "TelemetryRecord",
    "dumps",
    "loads",
]


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
    """Device -> controller, retained on ``shadow/reported``: what the device actually runs."""

    _WHAT: ClassVar[str] = "reported state"


@dataclass(frozen=True)
class TelemetryRecord:
    """Device -> controller on ``telemetry`` (QoS 1). ``seq`` increases by one per record per
    device and survives restarts (it lives in the durable queue), so the receiver deduplicates
    redeliveries and detects gaps."""

    device_id: str
    seq: int
    ts: float
    kind: str = "heartbeat"
    data: dict[str, Any] = field(default_factory=dict)

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
        )
