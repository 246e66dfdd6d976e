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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edgecloud.errors import FleetError
from edgecloud.fleet.job_model import (
    _JOB_ID,
    FAILURE_TYPES,
    AbortCriterion,
    Execution,
    Job,
    JobStatus,
    RolloutConfig,
    TickResult,
    parse_duration,
    parse_rate,
    parse_retry,
)
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
    "TickResult",
    "parse_duration",
    "parse_rate",
    "parse_retry",
]


@dataclass
class _Bucket:
    tokens: float
    last: float


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
