"""High availability: which of several controllers sharing one database is active.

The one holding the store's lease row is *active*; the others are standbys that keep their
registry current, buffer job updates and refuse writes. A standby tries to take the lease every
``lease_s / 3``; when it does, it loads jobs, executions and shadows from the database, applies
the buffered job updates (idempotent by seq) and notifies again what was notified but not
started. An active controller that cannot renew for ``lease_s / 2`` stops acting before another
may take over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from edgecloud.errors import FleetError
from edgecloud.fleet.jobs import JobEngine
from edgecloud.fleet.messages import ExecutionUpdate
from edgecloud.fleet.registry import Device, Shadow
from edgecloud.fleet.store import FleetStore

__all__ = ["LEASE_NAME", "LeaseHolder"]

log = logging.getLogger("edgecloud.fleet")

LEASE_NAME = "fleet-controller"


class LeaseHolder:
    """The controller's lease logic (a part of ``FleetController``, kept apart to be read
    alone); the attributes below are the controller's state it touches."""

    lease_s: float | None
    instance_id: str
    active: bool
    clock: Callable[[], float]
    store: FleetStore
    engine: JobEngine
    devices: dict[str, Device]
    shadows: dict[str, Shadow]
    _lock: threading.RLock
    _wake: threading.Event
    _lease_tried: float
    _lease_renewed: float
    _connected_at: float
    _desired_synced: bool
    _dirty_devices: set[str]
    _standby_updates: deque[tuple[str, str, ExecutionUpdate]]

    def _handle_update(self, device_id: str, topic: str, u: ExecutionUpdate) -> None:
        raise NotImplementedError  # DeviceIngest's

    def _lease_tick(self) -> bool:
        """Take or renew the lease when due; True when this controller may act now."""
        assert self.lease_s is not None
        now = time.monotonic()
        if now - self._lease_tried >= self.lease_s / 3:
            self._lease_tried = now
            try:
                held = self.store.acquire_lease(LEASE_NAME, self.instance_id, self.lease_s)
            except FleetError as exc:
                log.warning("fleet controller %s: %s", self.instance_id, exc)
                held = None
            if held:
                self._lease_renewed = now
                if not self.active:
                    self._take_over()
            elif held is False and self.active:
                log.error("fleet controller %s lost the lease; now a standby", self.instance_id)
                with self._lock:
                    self.active = False
        # act only while the lease is surely ours: renewed less than half a lease ago
        return self.active and now - self._lease_renewed < self.lease_s / 2

    def _take_over(self) -> None:
        """Become active: the database's jobs and shadows, then what arrived meanwhile."""
        jobs, executions = self.store.load_jobs(), self.store.load_executions()
        shadows = self.store.load_shadows()
        stored = {d.device_id: d for d in self.store.load_devices()}
        with self._lock:
            self.engine = JobEngine(self.clock)
            self.engine.load(jobs, executions)
            self.shadows = {s.device_id: s for s in shadows}
            for device_id, d in stored.items():
                mine = self.devices.get(device_id)
                if mine is None:
                    d.online = False
                    self.devices[device_id] = d
                else:
                    mine.desired_acked = max(mine.desired_acked, d.desired_acked)
                    mine.counters = {**d.counters, **mine.counters}
            self.active = True
            # notified but not started: the notification may have died with the last active
            for e in self.engine.executions.values():
                if e.state.value == "QUEUED" and e.sent_at is not None:
                    e.sent_at = None
            buffered = list(self._standby_updates)
            self._standby_updates.clear()
            self._connected_at = time.monotonic()  # timeouts wait for queued updates again
            self._desired_synced = False
            self._dirty_devices.update(self.devices)
        log.warning(
            "fleet controller %s took the lease: active now (%d jobs, %d buffered updates)",
            self.instance_id,
            len(jobs),
            len(buffered),
        )
        for device_id, topic, u in buffered:
            try:
                self._handle_update(device_id, topic, u)
            except FleetError as exc:
                log.warning("dropped a buffered update from %s: %s", device_id, exc)
        self._wake.set()
