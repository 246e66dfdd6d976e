"""Fleet jobs on a device: journal, run once under the watchdog, cancel, report.

Jobs are journaled in the outbox's SQLite file before any work starts, so a job delivered twice
(QoS 1) runs once, a job that finished before a restart is reported again rather than redone,
and one interrupted by a restart (killed mid-download, say) is reported IN_PROGRESS and resumed
only when the controller sends it again (from its ``.part`` file). A cancel from the controller
stops a running job at its next step boundary (never between the swap and the pointer write:
activation is one step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from device_agent.deploy import Installer, check_deploy_document, job_deadline
from device_agent.queue import DurableQueue
from device_agent.serving import Metrics
from device_agent.watchdog import JobOutcome, Progress, run_watched
from edgecloud.errors import FleetError
from edgecloud.fleet.messages import (
    TERMINAL_STATES,
    ExecutionState,
    JobCancel,
    JobNotification,
    dumps,
)

__all__ = ["JobRunner", "download_key"]

log = logging.getLogger("device_agent")

_TERMINAL = {s.value for s in TERMINAL_STATES}

#: ``report(job_id, execution_number, status, reason="", details=None)``: queue an update.
Report = Callable[..., None]


def download_key(job: JobNotification, url: str) -> str:
    """One download per (job, package), shared by the job's retries so a retry resumes it."""
    return f"{job.job_id}:{url}"


def _download_done(outcome: JobOutcome) -> bool:
    """Whether a deploy's partial download can go: kept only after a transient failure."""
    return outcome.status != ExecutionState.FAILED or "download" not in outcome.reason


class JobRunner:
    """Runs one job at a time (the agent's worker thread calls ``handle``)."""

    def __init__(
        self,
        queue: DurableQueue,
        installer: Installer,
        *,
        report: Report,
        run_policy: Callable[[Mapping[str, Any]], JobOutcome],
        metrics: Metrics,
        step_timeout_s: float,
        stopping: Callable[[], bool],
    ) -> None:
        self.queue = queue
        self.installer = installer
        self._report = report
        self._run_policy = run_policy
        self.metrics = metrics
        self.step_timeout_s = step_timeout_s
        self._stopping = stopping
        self._lock = threading.Lock()
        # The execution running now (key, its cancel event) and those canceled by the
        # controller (key -> reason) so that a queued or resumed copy does not start.
        self._running: tuple[str, threading.Event] | None = None
        self._canceled: dict[str, str] = {}

    def report_interrupted(self) -> None:
        """At start: jobs a restart interrupted. Ask the controller rather than resume alone."""
        for key, note in self.queue.jobs_with_status(ExecutionState.IN_PROGRESS.value):
            with contextlib.suppress(FleetError):
                job = JobNotification.parse(note)
                log.warning("job %s was interrupted by a restart; asking the controller", key)
                self._report(
                    job.job_id,
                    job.execution_number,
                    ExecutionState.IN_PROGRESS,
                    "interrupted by a restart; waiting for the controller to resume or cancel it",
                    {"interrupted": True},
                )

    def _repeat(self, job_id: str, execution_number: int, prior: tuple[str, str, str]) -> None:
        res = json.loads(prior[2] or "{}")
        self._report(
            job_id,
            execution_number,
            ExecutionState(prior[0]),
            res.get("reason", ""),
            {**res.get("details", {}), "repeated": True},
        )

    def cancel(self, c: JobCancel) -> None:
        """The controller ended this execution: do not start, resume or finish it.

        Either way the device reports CANCELED, or, if it already finished, reports its final
        state again so the controller records what the device really did.
        """
        key = f"{c.job_id}#{c.execution_number}"
        reason = c.reason or "canceled by the controller"
        with self._lock:
            self._canceled[key] = reason
            if len(self._canceled) > 1000:
                self._canceled.pop(next(iter(self._canceled)))
            running = self._running
            if running is not None and running[0] == key:
                log.warning("job %s canceled by the controller while running: %s", key, reason)
                running[1].set()
                return
            prior = self.queue.job_get(key)
            if prior is not None and prior[0] in _TERMINAL:
                self._repeat(c.job_id, c.execution_number, prior)
                return
            note = prior[1] if prior is not None else "{}"
            result = json.dumps({"reason": f"canceled by the controller: {reason}", "details": {}})
            self.queue.job_put(key, c.job_id, c.execution_number, "CANCELED", note, result)
        log.warning("job %s canceled by the controller: %s", key, reason)
        self._report(
            c.job_id,
            c.execution_number,
            ExecutionState.CANCELED,
            f"canceled by the controller: {reason}",
        )
        with contextlib.suppress(json.JSONDecodeError, FleetError):
            if prior is not None:
                job = JobNotification.parse(prior[1])
                url = job.document.get("package_url")
                if job.operation == "deploy" and isinstance(url, str):
                    self.installer.store.discard_download(download_key(job, url))

    def handle(self, job: JobNotification) -> None:
        key = f"{job.job_id}#{job.execution_number}"
        stop = threading.Event()
        with self._lock:
            prior = self.queue.job_get(key)
            if prior is not None and prior[0] in _TERMINAL:
                # Finished before (a QoS 1 redelivery, or a controller that missed our
                # report): report the same outcome again, do not redo the work.
                self._repeat(job.job_id, job.execution_number, prior)
                return
            if key in self._canceled:
                stop.set()  # canceled while it waited in the work queue
            self._running = (key, stop)
            note = dumps(job).decode()
            self.queue.job_put(key, job.job_id, job.execution_number, "IN_PROGRESS", note)
        try:
            self._report(job.job_id, job.execution_number, ExecutionState.IN_PROGRESS)
            timeout = min(job.timeout_s, self.step_timeout_s)
            progress = Progress(stop, self._stopping)
            outcome = run_watched(lambda p: self._execute(job, p), timeout, progress)
            if key in self._canceled and outcome.status != ExecutionState.SUCCEEDED:
                outcome = JobOutcome(
                    ExecutionState.CANCELED,
                    f"canceled by the controller: {self._canceled.get(key, '')}".rstrip(": "),
                )
        finally:
            with self._lock:
                self._running = None
        if job.operation in ("deploy", "rollback"):
            self.metrics.deployment(outcome.status.value.lower())
        url = job.document.get("package_url")
        if job.operation == "deploy" and isinstance(url, str) and _download_done(outcome):
            # A transient failure keeps the partial download: the controller may retry this
            # job (a new execution number, the same download) and it resumes from there.
            self.installer.store.discard_download(download_key(job, url))
        result = json.dumps({"reason": outcome.reason, "details": dict(outcome.details or {})})
        self.queue.job_put(
            key, job.job_id, job.execution_number, outcome.status.value, note, result
        )
        self.queue.prune_jobs()
        self._report(
            job.job_id, job.execution_number, outcome.status, outcome.reason, outcome.details
        )

    def _execute(self, job: JobNotification, progress: Progress) -> JobOutcome:
        doc = job.document
        if job.operation == "policy":
            progress.enter("policy")
            return self._run_policy(doc)
        if job.operation == "rollback":
            return self.installer.rollback(doc.get("version"), progress)
        url = check_deploy_document(doc)
        size = doc.get("size")
        deadline = job_deadline(job.timeout_s, self.step_timeout_s)
        source = self.installer.source(
            url, download_key(job, url), doc, progress, deadline=deadline
        )
        return self.installer.deploy(source, progress, size=size)
