"""The data of fleet jobs: rollout and abort configuration, retries, the Job/Execution records.

Operators write durations, rates and retry specs as text (``10m``, ``60/min``,
``FAILED=2``); the parsers here turn them into numbers with errors that name the field, and
``RolloutConfig``/``AbortCriterion`` validate themselves. ``Job`` and ``Execution`` are what the
store persists (``to_dict``/``from_dict``). The rules that move executions between states are
``edgecloud.fleet.jobs.JobEngine``'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from edgecloud.errors import FleetError
from edgecloud.fleet.messages import TERMINAL_STATES, ExecutionState, JobCancel, JobNotification

__all__ = [
    "FAILURE_TYPES",
    "MAX_RETRIES",
    "RETRY_TYPES",
    "AbortCriterion",
    "Execution",
    "Job",
    "JobStatus",
    "RolloutConfig",
    "TickResult",
    "parse_duration",
    "parse_rate",
    "parse_retry",
]

FAILURE_TYPES = ("FAILED", "REJECTED", "TIMED_OUT", "ALL")
_FAILURES = {
    "FAILED": {ExecutionState.FAILED},
    "REJECTED": {ExecutionState.REJECTED},
    "TIMED_OUT": {ExecutionState.TIMED_OUT},
    "ALL": {ExecutionState.FAILED, ExecutionState.REJECTED, ExecutionState.TIMED_OUT},
}
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class JobStatus:
    """A job's own status (not an execution's): AWS IoT Jobs' names."""

    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """``90``, ``90s``, ``10m``, ``1h`` -> seconds (refuses zero, negatives and junk)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
        if not m:
            raise FleetError(f"{what} {text!r} is not a duration like 90s, 10m or 1h")
        value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise FleetError(f"{what} must be a positive number of seconds, got {text!r}")
    return value


def parse_rate(text: str | float | int) -> float:
    """``10``, ``10/min``, ``1/s``, ``10/hour`` -> devices per minute."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*([a-z]+))?\s*", str(text).lower())
        per = _PER_MINUTE.get(m.group(2)) if m else None
        if not m or per is None:
            raise FleetError(f"rate {text!r} is not a rate like 10/min, 1/s or 10/hour")
        value = float(m.group(1)) * per
    if not math.isfinite(value) or value <= 0:
        raise FleetError(f"rate must be a positive number of devices per minute, got {text!r}")
    return value


# units of a rate -> factor to devices per minute
_PER_MINUTE: dict[str | None, float] = {
    None: 1.0,
    **dict.fromkeys(("m", "min", "minute"), 1.0),
    **dict.fromkeys(("s", "sec", "second"), 60.0),
    **dict.fromkeys(("h", "hr", "hour"), 1 / 60),
}


RETRY_TYPES = ("FAILED", "TIMED_OUT", "ALL")
MAX_RETRIES = 10  # per failure type, as in AWS IoT Jobs


def parse_retry(spec: str | dict[str, Any] | None) -> dict[str, int]:
    """``FAILED:2,TIMED_OUT:1`` (or ``{"FAILED": 2}``) -> retries allowed per failure type.

    The AWS IoT Jobs vocabulary (``jobExecutionsRetryConfig``): ``FAILED``, ``TIMED_OUT`` or
    ``ALL`` (both), 0-10 retries each. REJECTED is never retried: the device refused the job
    itself (a bad signature, a malformed document), and trying again cannot change that.
    """
    if spec is None or spec == "":
        return {}
    items: list[tuple[str, Any]]
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            kind, sep, n = part.strip().partition(":")
            if not sep:
                raise FleetError(f"retry {part.strip()!r} must look like FAILED:2 or TIMED_OUT:1")
            items.append((kind, n.strip()))
    else:
        raise FleetError(f"retry must be like FAILED:2,TIMED_OUT:1, got {spec!r}")
    out: dict[str, int] = {}
    for kind, n in items:
        k = str(kind).strip().upper()
        if k not in RETRY_TYPES:
            raise FleetError(f"retry failure type {kind!r} must be one of {RETRY_TYPES}")
        try:
            count = int(n)
            if isinstance(n, bool) or isinstance(n, float) or str(count) != str(n).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise FleetError(f"retry count for {k} must be an integer, got {n!r}") from None
        if not 0 <= count <= MAX_RETRIES:
            raise FleetError(f"retry count for {k} must be in [0, {MAX_RETRIES}], got {count}")
        out[k] = count
    return out


@dataclass(frozen=True)
class RolloutConfig:
    """How fast notifications go out. All ``None``: as fast as devices come online."""

    max_per_minute: float | None = None
    base_rate_per_minute: float | None = None
    increment_factor: float = 2.0
    on_succeeded: int = 1

    def __post_init__(self) -> None:
        for name in ("max_per_minute", "base_rate_per_minute"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v <= 0):
                raise FleetError(f"rollout {name} must be > 0, got {v!r}")
        if not math.isfinite(self.increment_factor) or self.increment_factor < 1.0:
            raise FleetError(f"rollout increment_factor must be >= 1, got {self.increment_factor}")
        if self.on_succeeded < 1:
            raise FleetError(f"rollout on_succeeded must be >= 1, got {self.on_succeeded}")

    def rate(self, succeeded: int) -> float | None:
        """Devices per minute now, given how many executions have succeeded so far."""
        rate: float | None = None
        if self.base_rate_per_minute is not None:
            waves = succeeded // self.on_succeeded
            rate = self.base_rate_per_minute * self.increment_factor ** min(waves, 64)
        if self.max_per_minute is not None:
            rate = self.max_per_minute if rate is None else min(rate, self.max_per_minute)
        return rate

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RolloutConfig:
        d = d or {}
        try:
            return cls(
                max_per_minute=_opt_float(d.get("max_per_minute")),
                base_rate_per_minute=_opt_float(d.get("base_rate_per_minute")),
                increment_factor=float(d.get("increment_factor", 2.0)),
                on_succeeded=int(d.get("on_succeeded", 1)),
            )
        except (TypeError, ValueError) as exc:
            raise FleetError(f"rollout config {d!r} is malformed: {exc}") from exc


@dataclass(frozen=True)
class AbortCriterion:
    """Cancel the job when ``failure_type`` executions reach ``threshold_percent`` of executed
    ones, once at least ``min_executed`` executions have finished."""

    failure_type: str = "ALL"
    threshold_percent: float = 50.0
    min_executed: int = 1

    def __post_init__(self) -> None:
        if self.failure_type not in FAILURE_TYPES:
            raise FleetError(
                f"abort failure_type {self.failure_type!r} must be one of {FAILURE_TYPES}"
            )
        if not (0.0 < self.threshold_percent <= 100.0):
            raise FleetError(
                f"abort threshold_percent must be in (0, 100], got {self.threshold_percent}"
            )
        if self.min_executed < 1:
            raise FleetError(f"abort min_executed must be >= 1, got {self.min_executed}")

    def tripped(self, counts: dict[str, int]) -> bool:
        executed = sum(
            n
            for s, n in counts.items()
            if ExecutionState(s) in TERMINAL_STATES
            and s not in (ExecutionState.CANCELED.value, ExecutionState.REMOVED.value)
        )
        if executed < self.min_executed:
            return False
        failed = sum(counts.get(s.value, 0) for s in _FAILURES[self.failure_type])
        return 100.0 * failed / executed >= self.threshold_percent

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AbortCriterion:
        try:
            return cls(
                failure_type=str(d.get("failure_type", "ALL")).upper(),
                threshold_percent=float(d.get("threshold_percent", 50.0)),
                min_executed=int(d.get("min_executed", 1)),
            )
        except (TypeError, ValueError) as exc:
            raise FleetError(f"abort criterion {d!r} is malformed: {exc}") from exc


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass
class Job:
    """One job. ``targets`` are device ids (groups already resolved); ``groups`` for display."""

    job_id: str
    operation: str
    document: dict[str, Any]
    targets: list[str]
    created_at: float
    groups: list[str] = field(default_factory=list)
    status: str = JobStatus.IN_PROGRESS
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    abort: list[AbortCriterion] = field(default_factory=list)
    timeout_s: float = 600.0
    job_timeout_s: float | None = None
    reason: str = ""
    completed_at: float | None = None
    retry: dict[str, int] = field(default_factory=dict)

    def retries_for(self, state: ExecutionState) -> int:
        """Retries allowed after an execution ends in ``state`` (0 when none)."""
        if state.value not in ("FAILED", "TIMED_OUT"):
            return 0
        return self.retry.get(state.value, self.retry.get("ALL", 0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rollout"] = asdict(self.rollout)
        d["abort"] = [asdict(a) for a in self.abort]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(
            job_id=str(d["job_id"]),
            operation=str(d["operation"]),
            document=dict(d.get("document") or {}),
            targets=[str(t) for t in d.get("targets") or []],
            created_at=float(d["created_at"]),
            groups=[str(g) for g in d.get("groups") or []],
            status=str(d.get("status", JobStatus.IN_PROGRESS)),
            rollout=RolloutConfig.from_dict(d.get("rollout")),
            abort=[AbortCriterion.from_dict(a) for a in d.get("abort") or []],
            timeout_s=float(d.get("timeout_s", 600.0)),
            job_timeout_s=_opt_float(d.get("job_timeout_s")),
            reason=str(d.get("reason", "")),
            completed_at=_opt_float(d.get("completed_at")),
            retry=parse_retry(d.get("retry") or None),
        )


@dataclass
class Execution:
    """One device's part of a job. ``sent_at`` is when the notification went out (None: not
    yet, or to be sent again after the device went offline before starting)."""

    job_id: str
    device_id: str
    state: ExecutionState = ExecutionState.QUEUED
    queued_at: float = 0.0
    sent_at: float | None = None
    started_at: float | None = None
    updated_at: float = 0.0
    last_seq: int = -1
    execution_number: int = 1
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: earlier attempts (execution numbers replaced by a retry): number, state, reason, at
    attempts: list[dict[str, Any]] = field(default_factory=list)
    #: set when the controller ended the execution (timeout, cancel) and the device reported
    #: afterwards: what the controller had decided, kept next to the device's own outcome
    ended_by_controller: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.device_id)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Execution:
        return cls(
            job_id=str(d["job_id"]),
            device_id=str(d["device_id"]),
            state=ExecutionState(d.get("state", "QUEUED")),
            queued_at=float(d.get("queued_at", 0.0)),
            sent_at=_opt_float(d.get("sent_at")),
            started_at=_opt_float(d.get("started_at")),
            updated_at=float(d.get("updated_at", 0.0)),
            last_seq=int(d.get("last_seq", -1)),
            execution_number=int(d.get("execution_number", 1)),
            reason=str(d.get("reason", "")),
            details=dict(d.get("details") or {}),
            attempts=[dict(a) for a in d.get("attempts") or []],
            ended_by_controller=(
                dict(d["ended_by_controller"]) if d.get("ended_by_controller") else None
            ),
        )

    def retries_used(self, state: ExecutionState) -> int:
        return sum(1 for a in self.attempts if a.get("state") == state.value)


@dataclass
class TickResult:
    """What one tick changed: notifications to publish and records to persist."""

    notify: list[tuple[str, JobNotification]] = field(default_factory=list)
    cancel: list[tuple[str, JobCancel]] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)
