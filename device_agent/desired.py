"""The desired state (the fleet's shadow): act on the delta, retry a failed model, report.

A retained desired state comes again on every reconnect. A model version that was reached (or
a malformed document) is not acted on again until the controller bumps the state's version;
one whose deployment failed is tried again, like an AWS IoT device would:
``jobs.desired_retries`` more times, after ``desired_retry_delay_s`` growing by
``desired_retry_backoff`` (tenacity's exponential wait and attempt stop), on its own or when
the state comes again once the delay has passed. Meanwhile the reported state carries
``error`` and ``retry``. The failure journal lives in the outbox's SQLite file, so it survives
a restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from tenacity import RetryCallState, Retrying, stop_after_attempt, wait_exponential

from device_agent.queue import DurableQueue
from device_agent.watchdog import JobOutcome, Rejected
from edgecloud.errors import EdgeCloudError
from edgecloud.fleet.messages import DesiredState, ExecutionState

__all__ = ["DesiredRetries", "DesiredStates"]

log = logging.getLogger("device_agent")


class DesiredRetries:
    """How often and when a failed desired model is tried again (tenacity's policies)."""

    def __init__(self, retries: int, delay_s: float, backoff: float) -> None:
        self.total = retries + 1
        self._stop = stop_after_attempt(self.total)
        self._wait = wait_exponential(multiplier=delay_s, exp_base=backoff)
        self._retrying = Retrying()

    def _state(self, attempts: int) -> RetryCallState:
        state = RetryCallState(self._retrying, None, (), {})
        state.attempt_number = attempts
        return state

    def gave_up(self, attempts: int) -> bool:
        """After ``attempts`` failed attempts, whether there is no further one."""
        return bool(self._stop(self._state(attempts)))

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts."""
        return float(self._wait(self._state(attempts)))


#: One attempt at a desired model: ``deploy(desired, model, key) -> JobOutcome``.
Deploy = Callable[[DesiredState, Mapping[str, Any], str], JobOutcome]


class DesiredStates:
    """Acts on desired states one at a time (the agent's worker thread calls ``handle``)."""

    def __init__(
        self,
        queue: DurableQueue,
        retries: DesiredRetries,
        *,
        deploy: Deploy,
        apply_policy: Callable[[Mapping[str, Any]], list[str]],
        active_version: Callable[[], str],
        discard_download: Callable[[str], None],
        note_error: Callable[[str], None],
    ) -> None:
        self.queue = queue
        self.retries = retries
        self._deploy = deploy
        self._apply_policy = apply_policy
        self._active_version = active_version
        self._discard_download = discard_download
        self._note_error = note_error
        #: A failed desired state waiting for its next attempt: (state, time.monotonic() due).
        self.pending: tuple[DesiredState, float] | None = None
        #: The desired state being acted on and what it left to say in the reported state
        #: (error, retry, policy_ignored): kept across restarts, like the failure journal.
        self.version = 0
        self.note: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            saved = json.loads(self.queue.get("desired_report") or "{}")
            self.version = int(saved.get("desired_version", 0))
            self.note = dict(saved.get("note") or {})

    def due(self) -> DesiredState | None:
        """The pending retry, if its time has come (taken: the caller handles it now)."""
        p = self.pending
        if p is not None and time.monotonic() >= p[1]:
            self.pending = None
            return p[0]
        return None

    def handle(self, desired: DesiredState) -> None:
        acted = self.queue.get("desired_version")
        self.version = desired.version
        failure = self._failure(desired.version)
        if self.pending is not None and self.pending[0].version != desired.version:
            self.pending = None  # a newer desired state supersedes the pending retry
        error = ""
        ignored: list[str] = []
        retry: dict[str, Any] | None = None
        model = desired.state.get("model")
        policy = desired.state.get("policy")
        try:
            if policy is not None:
                if not isinstance(policy, Mapping):
                    raise Rejected("desired state: 'policy' must be an object")
                ignored = self._apply_policy(policy)
            if model is not None:
                if not isinstance(model, Mapping):
                    raise Rejected("desired state: 'model' must be an object")
                want = model.get("version")
                if want == self._active_version():
                    failure = None
                elif failure is not None:
                    error, retry = self._retry_due(desired, failure)
                    if retry is None:  # due now
                        failure, error, retry = self._attempt(desired, model, failure)
                elif acted is None or int(acted) < desired.version:
                    failure, error, retry = self._attempt(desired, model, None)
        except EdgeCloudError as exc:
            error = str(exc)
        if failure is None:
            self.queue.set("desired_failure", "")
        if error:
            self._note_error(f"desired state {desired.version}: {error}")
        self.queue.set("desired_version", str(desired.version))
        note: dict[str, Any] = {}
        if error:
            note["error"] = error
        if retry is not None:
            note["retry"] = retry
        if ignored:
            note["policy_ignored"] = ignored
        self.note = note
        self.queue.set(
            "desired_report", json.dumps({"desired_version": desired.version, "note": note})
        )

    def _failure(self, version: int) -> dict[str, Any] | None:
        """The journaled failure of desired state ``version`` (survives a restart), if any."""
        raw = self.queue.get("desired_failure")
        try:
            d = json.loads(raw) if raw else None
        except ValueError:
            return None
        return d if isinstance(d, dict) and d.get("version") == version else None

    def _retry_due(
        self, desired: DesiredState, failure: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any] | None]:
        """(error, retry info) while a failed desired state waits; retry None when due now."""
        error = str(failure.get("error", ""))
        attempts = int(failure.get("attempts", 1))
        total = self.retries.total
        if self.retries.gave_up(attempts):
            return error, {"attempts": attempts, "max_attempts": total, "gave_up": True}
        wait = float(failure.get("next_at", 0.0)) - time.time()
        if wait <= 0:
            return error, None
        self.pending = (desired, time.monotonic() + wait)
        return error, {"attempts": attempts, "max_attempts": total, "next_in_s": round(wait, 3)}

    def _attempt(
        self,
        desired: DesiredState,
        model: Mapping[str, Any],
        failure: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any] | None, str, dict[str, Any] | None]:
        """One attempt at the desired model; returns (failure record, error, retry info)."""
        want = model.get("version")
        url = model.get("package_url")
        if not isinstance(url, str) or not isinstance(want, str):
            raise Rejected("desired state: model needs string 'version' and 'package_url'")
        key = f"shadow-{desired.version}:{url}"
        outcome = self._deploy(desired, model, key)
        self._discard_download(key)
        if outcome.status == ExecutionState.SUCCEEDED:
            self.pending = None
            return None, "", None
        error = f"{outcome.status.value}: {outcome.reason}"
        attempts = int(failure.get("attempts", 0)) + 1 if failure else 1
        total = self.retries.total
        record: dict[str, Any] = {"version": desired.version, "attempts": attempts, "error": error}
        if self.retries.gave_up(attempts):
            retry: dict[str, Any] = {"attempts": attempts, "max_attempts": total, "gave_up": True}
        else:
            delay = self.retries.delay(attempts)
            record["next_at"] = time.time() + delay
            self.pending = (desired, time.monotonic() + delay)
            retry = {"attempts": attempts, "max_attempts": total, "next_in_s": round(delay, 3)}
        self.queue.set("desired_failure", json.dumps(record))
        return record, error, retry
