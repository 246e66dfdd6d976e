"""Run one job step by step under a timeout, so one stuck download never blocks the next job.

A job runs in its own thread; ``run_watched`` waits for it at most ``timeout`` seconds, then
abandons it (its ``Progress`` is cancelled, so it stops at its next step boundary) and reports
FAILED naming the step it was in. Errors become outcomes here, in one place: a refused package
(bad signature, tampered, no room, malformed job) is REJECTED, anything else FAILED.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from device_agent.store import DiskSpaceError
from edgecloud.errors import EdgeCloudError, FleetError, PackageError
from edgecloud.fleet.messages import ExecutionState

__all__ = ["Cancelled", "JobOutcome", "Progress", "Rejected", "run_watched"]

log = logging.getLogger("device_agent")


@dataclass(frozen=True)
class JobOutcome:
    status: ExecutionState
    reason: str = ""
    details: Mapping[str, Any] | None = None


class Rejected(EdgeCloudError):
    """The job itself is unacceptable (malformed, unsigned, tampered, no room): REJECTED."""


class Cancelled(EdgeCloudError):
    """The watchdog abandoned this job (or the agent stops): stop before touching the store."""


class Progress:
    """Which step a job is in, and whether it must stop: what the watchdog reads and sets.

    ``enter(step)`` is called at each step boundary; it raises ``Cancelled`` once the job was
    abandoned, canceled by the controller, or the agent is stopping.
    """

    def __init__(
        self, cancel: threading.Event | None = None, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        self.cancel = cancel if cancel is not None else threading.Event()
        self.step = "start"
        self._stopping = stopping

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set() or self._stopping()

    def enter(self, step: str) -> None:
        if self.cancelled:
            raise Cancelled(step)
        self.step = step


def run_watched(
    fn: Callable[[Progress], JobOutcome], timeout: float, progress: Progress
) -> JobOutcome:
    """Run ``fn(progress)`` in a thread; past ``timeout`` abandon it and report FAILED."""
    box: list[JobOutcome] = []

    def run() -> None:
        try:
            box.append(fn(progress))
        except Cancelled:
            pass
        except Rejected as exc:
            box.append(JobOutcome(ExecutionState.REJECTED, str(exc)))
        except (PackageError, DiskSpaceError, FleetError) as exc:
            box.append(JobOutcome(ExecutionState.REJECTED, f"{progress.step}: {exc}"))
        except EdgeCloudError as exc:
            box.append(JobOutcome(ExecutionState.FAILED, f"{progress.step}: {exc}"))
        except Exception as exc:
            log.exception("job step %s crashed", progress.step)
            box.append(
                JobOutcome(ExecutionState.FAILED, f"{progress.step}: {type(exc).__name__}: {exc}")
            )

    t = threading.Thread(target=run, name="agent-job", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive() or not box:
        progress.cancel.set()
        if t.is_alive():
            return JobOutcome(
                ExecutionState.FAILED,
                f"step '{progress.step}' did not finish within {timeout:g}s; abandoned",
            )
        return JobOutcome(ExecutionState.FAILED, f"step '{progress.step}' was cancelled")
    return box[0]
