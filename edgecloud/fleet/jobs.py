"""Jobs and rollouts, in the vocabulary of AWS IoT Jobs, as pure logic over an injected clock.

A job targets devices (groups are resolved to their members when the job is created, AWS's
``SNAPSHOT`` target selection) and has one execution per device. An execution moves
``QUEUED -> IN_PROGRESS -> SUCCEEDED | FAILED | REJECTED | TIMED_OUT | CANCELED``.

The engine decides, at every ``tick(now, online)``, which queued executions to notify:

- a device runs one execution at a time, oldest job first, so a second job waits for the first
  on that device; every path out of a stuck execution ends in a terminal state (in-progress
  timeout, job timeout, abort, cancel), which is why a failed job never blocks the next one;
- an offline device's execution stays ``QUEUED`` (not notified) until the device is back online,
  or until the job's own timeout marks it ``TIMED_OUT``;
- the rollout rate limits notifications: at most ``max_per_minute``, or exponential waves that
  start at ``base_rate_per_minute`` and multiply by ``increment_factor`` each time another
  ``on_succeeded`` devices succeeded (both spread evenly over the minute by a token bucket with
  one second of burst, so a rate of 60/min notifies one device per second, not 60 at once);
- abort criteria (failure type, threshold percentage, minimum number executed) are checked after
  every terminal update, over the executions' current states; when one trips, the job is
  ``CANCELED`` with the reason and every execution not yet started is ``CANCELED`` (a device
  already notified gets a ``JobCancel``), while those in progress may still report;
- an execution ``IN_PROGRESS`` (or notified but silent) longer than the in-progress timeout
  becomes ``TIMED_OUT``: always, so a device that died mid-update never holds its queue; the
  device is sent a ``JobCancel`` so that it does not finish or resume it later;
- retries per failure type (``retry``, AWS's ``jobExecutionsRetryConfig``): an execution that
  ends ``FAILED`` or ``TIMED_OUT`` with retries left goes back to ``QUEUED`` with the next
  ``execution_number``; only an execution's final state counts toward the abort criteria;
- a device's final report that arrives after the controller ended the execution is recorded
  (see ``apply_update``): the execution then says what the device did.

Updates are idempotent: an update whose ``seq`` is not above the last one applied for that
(device, job) is a duplicate (QoS 1 redelivery) and is ignored, as is any update to an execution
already in a terminal state. The engine does no I/O: the controller persists what it returns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgecloud.errors import FleetError
from edgecloud.fleet.messages import (
    TERMINAL_STATES,
    ExecutionState,
    ExecutionUpdate,
    JobCancel,
    JobNotification,
)

__all__ = [
    "FAILURE_TYPES",
    "AbortCriterion",
    "Execution",
    "Job",
    "JobEngine",
    "JobStatus",
    "RolloutConfig",
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
class _Bucket:
    tokens: float
    last: float


@dataclass
class TickResult:
    """What one tick changed: notifications to publish and records to persist."""

    notify: list[tuple[str, JobNotification]] = field(default_factory=list)
    cancel: list[tuple[str, JobCancel]] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    executions: list[Execution] = field(default_factory=list)


class JobEngine:
    """All jobs and executions in memory; not thread-safe (the controller holds a lock)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.executions: dict[tuple[str, str], Execution] = {}
        self._by_job: dict[str, list[Execution]] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._dirty_jobs: dict[str, Job] = {}
        self._dirty_execs: dict[tuple[str, str], Execution] = {}
        self._open: set[str] = set()  # jobs that may still have non-terminal executions
        self._cancels: list[tuple[str, JobCancel]] = []  # to publish with the next result
        self._resend: list[tuple[str, str]] = []  # (job, device) to notify again (resume)

    # -- loading ---------------------------------------------------------------------------
    def load(self, jobs: Iterable[Job], executions: Iterable[Execution]) -> None:
        for j in jobs:
            self.jobs[j.job_id] = j
            self._by_job.setdefault(j.job_id, [])
            self._open.add(j.job_id)
        for e in executions:
            if e.job_id in self.jobs:
                self.executions[e.key] = e
                self._by_job[e.job_id].append(e)

    # -- creating and ending jobs ------------------------------------------------------------
    def create(
        self,
        job_id: str,
        operation: str,
        document: dict[str, Any],
        targets: Iterable[str],
        *,
        groups: Iterable[str] = (),
        rollout: RolloutConfig | None = None,
        abort: Iterable[AbortCriterion] = (),
        timeout_s: float = 600.0,
        job_timeout_s: float | None = None,
        retry: dict[str, int] | None = None,
    ) -> Job:
        if not _JOB_ID.match(job_id):
            raise FleetError(f"job id {job_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if job_id in self.jobs:
            raise FleetError(f"job {job_id!r} already exists")
        if operation not in JobNotification.OPERATIONS:
            raise FleetError(
                f"job operation {operation!r} must be one of {JobNotification.OPERATIONS}"
            )
        devices = list(dict.fromkeys(targets))
        if not devices:
            raise FleetError("a job needs at least one target device (no device matched)")
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise FleetError(f"in-progress timeout must be > 0 s, got {timeout_s}")
        now = self.clock()
        job = Job(
            job_id=job_id,
            operation=operation,
            document=dict(document),
            targets=devices,
            created_at=now,
            groups=list(groups),
            rollout=rollout or RolloutConfig(),
            abort=list(abort),
            timeout_s=float(timeout_s),
            job_timeout_s=job_timeout_s,
            retry=parse_retry(retry or None),
        )
        self.jobs[job_id] = job
        self._by_job[job_id] = []
        self._open.add(job_id)
        for dev in devices:
            e = Execution(job_id=job_id, device_id=dev, queued_at=now, updated_at=now)
            self.executions[e.key] = e
            self._by_job[job_id].append(e)
            self._dirty_execs[e.key] = e
        self._dirty_jobs[job_id] = job
        return job

    def cancel(
        self, job_id: str, reason: str = "canceled by operator", *, force: bool = False
    ) -> Job:
        """Cancel a job: executions not yet running become CANCELED (running ones too with
        ``force``). Canceling a finished job is refused."""
        job = self.get(job_id)
        if job.status != JobStatus.IN_PROGRESS:
            raise FleetError(f"job {job_id!r} is already {job.status}; nothing to cancel")
        self._end(job, JobStatus.CANCELED, reason, force=force)
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise FleetError(f"no job {job_id!r}") from None

    def executions_of(self, job_id: str) -> list[Execution]:
        self.get(job_id)
        return list(self._by_job.get(job_id, []))

    def counts(self, job_id: str) -> dict[str, int]:
        out = {s.value: 0 for s in ExecutionState if s is not ExecutionState.REMOVED}
        for e in self._by_job.get(job_id, []):
            out[e.state.value] = out.get(e.state.value, 0) + 1
        return out

    # -- device events -----------------------------------------------------------------------
    def apply_update(self, u: ExecutionUpdate) -> Execution | None:
        """Apply a device's update; None when it is unknown, a duplicate or changes nothing.

        Reconciliation with what the device did, whatever the controller decided meanwhile:

        - a final report (SUCCEEDED, FAILED, REJECTED) for an execution the controller already
          ended (TIMED_OUT or CANCELED) is recorded: the execution takes the device's state,
          and ``ended_by_controller`` keeps what the controller had decided;
        - a device that restarted reports an interrupted execution (IN_PROGRESS with
          ``details.interrupted``) and waits: one still running here is notified again (the
          device resumes it), one the controller ended or replaced by a retry gets a cancel;
        - a report for an older ``execution_number`` (replaced by a retry) goes into that
          attempt's record, never into the current attempt.
        """
        e = self.executions.get((u.job_id, u.device_id))
        if e is None or u.seq <= e.last_seq:
            return None
        if u.status in (ExecutionState.QUEUED, ExecutionState.REMOVED):
            return None  # not a state a device reports
        job = self.jobs[e.job_id]
        now = self.clock()
        interrupted = u.status == ExecutionState.IN_PROGRESS and bool(u.details.get("interrupted"))
        if u.execution_number != e.execution_number:
            e.last_seq = u.seq
            for a in e.attempts:
                if a.get("execution_number") == u.execution_number and u.status in TERMINAL_STATES:
                    a["device_state"] = u.status.value
                    a["device_reason"] = u.reason
            if u.status not in TERMINAL_STATES:
                self._cancels.append(
                    (
                        e.device_id,
                        JobCancel(
                            e.job_id,
                            u.execution_number,
                            f"replaced by execution {e.execution_number}",
                        ),
                    )
                )
            self._dirty_execs[e.key] = e
            return e
        if e.terminal:
            e.last_seq = u.seq
            self._dirty_execs[e.key] = e
            if u.status not in TERMINAL_STATES:
                if e.state in (ExecutionState.TIMED_OUT, ExecutionState.CANCELED):
                    self._cancels.append(
                        (e.device_id, JobCancel(e.job_id, e.execution_number, e.reason))
                    )
                return None
            if e.state not in (ExecutionState.TIMED_OUT, ExecutionState.CANCELED):
                return None  # the device's own final state is already recorded
            if e.ended_by_controller is not None:
                return None  # the device's late report is already recorded
            if u.status == ExecutionState.CANCELED:
                e.details = {**e.details, "device_confirmed": True}  # it stopped, as told
                return None
            e.ended_by_controller = {"state": e.state.value, "reason": e.reason, "at": e.updated_at}
            e.state = u.status
            e.reason = (
                f"{u.reason} (device report after the controller marked it "
                f"{e.ended_by_controller['state']})"
                if u.reason
                else f"reported by the device after the controller marked it "
                f"{e.ended_by_controller['state']}"
            )
            if u.details:
                e.details = {**e.details, **u.details}
            e.updated_at = now
            return e
        e.last_seq = u.seq
        e.updated_at = now
        e.reason = u.reason or e.reason
        if u.details:
            e.details = {**e.details, **u.details}
        if e.sent_at is None:
            e.sent_at = now  # the device had it from an earlier session
        if u.status == ExecutionState.IN_PROGRESS:
            if e.state != ExecutionState.IN_PROGRESS:
                e.started_at = now
            e.state = ExecutionState.IN_PROGRESS
            if interrupted and job.status == JobStatus.IN_PROGRESS:
                self._resend.append(e.key)
            elif interrupted:
                # the job ended (aborted or canceled) while this device was away
                self._finish(e, ExecutionState.CANCELED, job.reason or "job ended")
        else:
            e.state = u.status
        self._dirty_execs[e.key] = e
        if e.terminal and not self._maybe_retry(e, job):
            self._after_terminal(job)
        return e

    def device_offline(self, device_id: str) -> None:
        """A notified but not yet started execution is sent again when the device returns."""
        for e in self._pending_of(device_id):
            if e.state == ExecutionState.QUEUED and e.sent_at is not None:
                e.sent_at = None
                self._dirty_execs[e.key] = e

    # -- the clock ---------------------------------------------------------------------------
    def tick(self, online: set[str] | frozenset[str], *, timeouts: bool = True) -> TickResult:
        """Time out, finish and notify. ``online`` is the set of devices connected now.

        ``timeouts=False`` holds every timeout back for this tick: the controller uses it just
        after it reconnects, so updates the broker queued for it during the outage are applied
        before a timer that ran out meanwhile can turn a finished execution into TIMED_OUT.
        """
        now = self.clock()
        busy: set[str] = set()
        # 1. timeouts (for every job, even an aborted one whose executions still run), and
        #    which devices are busy with an execution already notified
        for job_id in sorted(self._open):
            job = self.jobs[job_id]
            still_open = False
            for e in self._by_job[job_id]:
                if e.terminal:
                    continue
                still_open = True
                if e.state == ExecutionState.IN_PROGRESS or e.sent_at is not None:
                    since = e.started_at if e.state == ExecutionState.IN_PROGRESS else e.sent_at
                    if timeouts and since is not None and now - since >= job.timeout_s:
                        self._finish(
                            e,
                            ExecutionState.TIMED_OUT,
                            "in-progress timeout "
                            f"({job.timeout_s:g}s) passed without a final status",
                        )
                        if self._maybe_retry(e, job):
                            still_open = True
                        continue
                    busy.add(e.device_id)
                elif (
                    timeouts
                    and job.job_timeout_s is not None
                    and now - job.created_at >= job.job_timeout_s
                ):
                    self._finish(
                        e,
                        ExecutionState.TIMED_OUT,
                        f"job timeout ({job.job_timeout_s:g}s) passed while QUEUED",
                    )
            self._after_terminal(job)
            if not still_open and job.status != JobStatus.IN_PROGRESS:
                self._open.discard(job_id)
        active = [j for j in self.jobs.values() if j.status == JobStatus.IN_PROGRESS]
        active.sort(key=lambda j: (j.created_at, j.job_id))
        # 2. notifications, oldest job first, one running execution per device, rate-limited
        result = TickResult()
        for key in self._resend:
            e = self.executions[key]
            job = self.jobs[e.job_id]
            if e.state == ExecutionState.IN_PROGRESS:  # the device waits for this to resume
                result.notify.append((e.device_id, self._notification(job, e, now)))
        self._resend.clear()
        for job in active:
            if job.status != JobStatus.IN_PROGRESS:
                continue
            allowance = self._allowance(job, now)
            for e in self._by_job[job.job_id]:
                if allowance is not None and allowance < 1:
                    break
                if (
                    e.state != ExecutionState.QUEUED
                    or e.sent_at is not None
                    or e.device_id in busy
                    or e.device_id not in online
                ):
                    continue
                e.sent_at = now
                e.updated_at = now
                busy.add(e.device_id)
                self._dirty_execs[e.key] = e
                result.notify.append((e.device_id, self._notification(job, e, now)))
                if allowance is not None:
                    allowance -= 1
                    self._buckets[job.job_id].tokens -= 1.0
        result.jobs = list(self._dirty_jobs.values())
        result.executions = list(self._dirty_execs.values())
        result.cancel = list(self._cancels)
        self._dirty_jobs.clear()
        self._dirty_execs.clear()
        self._cancels.clear()
        return result

    def drain(self) -> TickResult:
        """What changed since the last tick or drain (for persisting after an update).

        Cancel messages come along (publishing them does not depend on the broker's state:
        the controller's MQTT client queues them); notifications wait for the next tick.
        """
        r = TickResult(
            jobs=list(self._dirty_jobs.values()),
            executions=list(self._dirty_execs.values()),
            cancel=list(self._cancels),
        )
        self._dirty_jobs.clear()
        self._dirty_execs.clear()
        self._cancels.clear()
        return r

    def _notification(self, job: Job, e: Execution, now: float) -> JobNotification:
        return JobNotification(
            job_id=job.job_id,
            operation=job.operation,
            document=job.document,
            execution_number=e.execution_number,
            timeout_s=job.timeout_s,
            issued_at=now,
        )

    def _maybe_retry(self, e: Execution, job: Job) -> bool:
        """Queue a new attempt (``execution_number + 1``) if the job's retry config allows one.

        Only while the job is in progress; the attempt that failed is kept in ``attempts``
        and is not counted by the abort criteria (only an execution's final state is).
        """
        if job.status != JobStatus.IN_PROGRESS:
            return False
        allowed = job.retries_for(e.state)
        if allowed <= e.retries_used(e.state):
            return False
        now = self.clock()
        e.attempts.append(
            {
                "execution_number": e.execution_number,
                "state": e.state.value,
                "reason": e.reason,
                "at": now,
            }
        )
        if e.state == ExecutionState.TIMED_OUT:
            # the device may still be at it: stop that attempt before the next one starts
            self._cancels.append((e.device_id, JobCancel(e.job_id, e.execution_number, "retried")))
        e.reason = f"retry {e.retries_used(e.state)}/{allowed} after {e.state.value}: {e.reason}"
        e.execution_number += 1
        e.state = ExecutionState.QUEUED
        e.sent_at = None
        e.started_at = None
        e.updated_at = now
        self._dirty_execs[e.key] = e
        return True

    # -- internals ---------------------------------------------------------------------------
    def _pending_of(self, device_id: str) -> list[Execution]:
        return [
            e
            for j in self.jobs.values()
            if j.status == JobStatus.IN_PROGRESS
            for e in [self.executions.get((j.job_id, device_id))]
            if e is not None and not e.terminal
        ]

    def _allowance(self, job: Job, now: float) -> float | None:
        counts = self.counts(job.job_id)
        rate = job.rollout.rate(counts[ExecutionState.SUCCEEDED.value])
        if rate is None:
            return None
        cap = max(1.0, rate / 60.0)  # one second of burst
        b = self._buckets.get(job.job_id)
        if b is None:
            b = self._buckets[job.job_id] = _Bucket(tokens=1.0, last=now)
        b.tokens = min(cap, b.tokens + max(0.0, now - b.last) * rate / 60.0)
        b.last = now
        return math.floor(b.tokens + 1e-9)

    def _finish(self, e: Execution, state: ExecutionState, reason: str) -> None:
        """The controller ends an execution; a device that has it is told to stop."""
        if e.state == ExecutionState.IN_PROGRESS or e.sent_at is not None:
            self._cancels.append((e.device_id, JobCancel(e.job_id, e.execution_number, reason)))
        e.state = state
        e.reason = reason
        e.updated_at = self.clock()
        self._dirty_execs[e.key] = e

    def _after_terminal(self, job: Job) -> None:
        if job.status != JobStatus.IN_PROGRESS:
            return
        counts = self.counts(job.job_id)
        for crit in job.abort:
            if crit.tripped(counts):
                self._end(
                    job,
                    JobStatus.CANCELED,
                    f"aborted: {crit.failure_type} executions reached "
                    f"{crit.threshold_percent:g}% (after at least {crit.min_executed} executed)",
                    force=False,
                )
                return
        if all(e.terminal for e in self._by_job[job.job_id]):
            job.status = JobStatus.COMPLETED
            job.completed_at = self.clock()
            self._dirty_jobs[job.job_id] = job
            self._buckets.pop(job.job_id, None)

    def _end(self, job: Job, status: str, reason: str, *, force: bool) -> None:
        for e in self._by_job[job.job_id]:
            if e.terminal:
                continue
            if force or e.state == ExecutionState.QUEUED:
                self._finish(e, ExecutionState.CANCELED, reason)
        job.status = status
        job.reason = reason
        job.completed_at = self.clock()
        self._dirty_jobs[job.job_id] = job
        self._buckets.pop(job.job_id, None)
