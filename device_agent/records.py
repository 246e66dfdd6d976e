"""What the device tells the fleet, queued in the durable outbox with durable sequence numbers.

Job updates, the reported shadow and telemetry each take their ``seq``/``version`` from a
counter in the outbox's SQLite file, in the same transaction as the row, so the numbers grow
across restarts and the controller tells a late or repeated message from a new one; every record
carries the store's identity epoch (a re-provisioned device starts new sequences).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from device_agent.queue import DurableQueue
from edgecloud.errors import ConfigError
from edgecloud.fleet.messages import (
    ExecutionState,
    ExecutionUpdate,
    ReportedState,
    TelemetryRecord,
    dumps,
)
from edgecloud.topics import Topics

__all__ = ["Records"]


class Records:
    """Queues records for ``device_id``; ``wake()`` tells the outbox there is something new."""

    def __init__(
        self,
        queue: DurableQueue,
        topics: Topics,
        device_id: str,
        epoch: str,
        *,
        wake: Callable[[], None],
        note_error: Callable[[str], None],
    ) -> None:
        self.queue = queue
        self.topics = topics
        self.device_id = device_id
        self.epoch = epoch
        self._wake = wake
        self._note_error = note_error

    def job_update(
        self,
        job_id: str,
        execution_number: int,
        status: ExecutionState,
        reason: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            topic = self.topics.job_update(self.device_id, job_id)
        except ConfigError as exc:
            self._note_error(f"cannot report job {job_id!r}: {exc}")
            return

        def build(seq: int) -> bytes:
            return dumps(
                ExecutionUpdate(
                    job_id=job_id,
                    device_id=self.device_id,
                    status=status,
                    seq=seq,
                    ts=time.time(),
                    reason=reason,
                    details=dict(details or {}),
                    execution_number=execution_number,
                )
            )

        self.queue.put_with_seq("job", "job", topic, build)
        self._wake()

    def reported(self, state: dict[str, Any], desired_version: int) -> None:
        """The reported shadow (retained), versioned by a durable counter."""
        topic = self.topics.shadow_reported(self.device_id)

        def build(seq: int) -> bytes:
            return dumps(
                ReportedState(
                    version=seq,
                    state=state,
                    ts=time.time(),
                    epoch=self.epoch,
                    desired_version=desired_version,
                )
            )

        self.queue.put_with_seq("reported", "state", topic, build, retain=True)
        self._wake()

    def telemetry(self, kind: str, data: dict[str, Any]) -> int:
        """One telemetry record (``heartbeat``, ``drift``); returns its seq."""
        topic = self.topics.telemetry(self.device_id)

        def build(seq: int) -> bytes:
            return dumps(TelemetryRecord(self.device_id, seq, time.time(), kind, data, self.epoch))

        seq = self.queue.put_with_seq("telemetry", "telemetry", topic, build)
        self._wake()
        return seq
