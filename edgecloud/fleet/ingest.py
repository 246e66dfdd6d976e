"""What devices tell the fleet controller: statuses, reported states, telemetry, job updates.

Runs on the controller's MQTT loop thread, under the controller's lock, and only changes
memory (the registry, the job engine); the ticker persists and acts. A malformed payload is
counted and dropped with the device and the field named: one broken device never stops the
controller. Epochs tell a re-provisioned device (a new store, new sequences) from late
messages of its previous life.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import paho.mqtt.client as paho

from edgecloud.errors import FleetError
from edgecloud.fleet.jobs import JobEngine
from edgecloud.fleet.messages import (
    ExecutionUpdate,
    ReportedState,
    StatusMessage,
    TelemetryRecord,
)
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.registry import Device
from edgecloud.topics import Topics

__all__ = ["TELEMETRY_KEEP", "DeviceIngest"]

log = logging.getLogger("edgecloud.fleet")

TELEMETRY_KEEP = 10_000  # records kept in memory per device for the API


class DeviceIngest:
    """The controller's message handlers (a part of ``FleetController``, kept apart to be read
    alone); the attributes below are the controller's state they touch."""

    topics: Topics
    clock: Callable[[], float]
    active: bool
    engine: JobEngine
    packages: PackageStore
    devices: dict[str, Device]
    telemetry: dict[str, deque[dict[str, Any]]]
    stats: dict[str, int]
    listeners: list[Callable[[str, Any], None]]
    _lock: threading.RLock
    _wake: threading.Event
    _dirty_devices: set[str]
    _standby_updates: deque[tuple[str, str, ExecutionUpdate]]

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        payload = bytes(msg.payload)
        device_id = self.topics.device_of(topic)
        if device_id is None:
            return
        try:
            if topic.endswith("/status"):
                self._handle_status(device_id, StatusMessage.parse(payload))
            elif topic.endswith("/shadow/reported"):
                self._handle_reported(device_id, ReportedState.parse(payload))
            elif topic.endswith("/telemetry"):
                self._handle_telemetry(device_id, TelemetryRecord.parse(payload))
            elif topic.endswith("/update"):
                u = ExecutionUpdate.parse(payload)
                with self._lock:
                    if not self.active:  # applied when (if) this standby takes over
                        self._standby_updates.append((device_id, topic, u))
                        return
                self._handle_update(device_id, topic, u)
        except FleetError as exc:
            with self._lock:
                self.stats["malformed"] += 1
            log.warning("dropped a message from device %s on %s: %s", device_id, topic, exc)
        except Exception:  # never let one message kill the loop thread
            log.exception("failed to handle a message on %s", topic)

    def _device(self, device_id: str) -> Device:
        d = self.devices.get(device_id)
        if d is None:
            now = self.clock()
            d = self.devices[device_id] = Device(device_id, first_seen=now, last_seen=now)
        return d

    def _epoch(self, d: Device, epoch: str) -> bool:
        """Follow the device's identity epoch; False for a message of an epoch it has left.

        A device whose store was wiped (re-provisioned under the same id) starts a new epoch:
        its telemetry seq and reported version start again from 1, and what the registry knew
        about the old installation (model, reported state) no longer describes it. Messages
        of an earlier epoch still in flight are dropped rather than flipping the device back.
        """
        if not epoch or epoch == d.epoch:
            return True
        if epoch in d.past_epochs:
            self.stats["stale_epoch"] += 1
            return False
        if d.epoch:
            d.past_epochs = [*d.past_epochs, d.epoch][-8:]
            d.reprovisioned_at = self.clock()
            d.bump("reprovisioned")
            d.telemetry_seq = -1
            d.reported = {}
            d.reported_version = 0
            d.model_name = ""
            d.model_version = ""
            log.warning("device %s was re-provisioned (identity epoch %s)", d.device_id, epoch)
        d.epoch = epoch
        return True

    def _handle_status(self, device_id: str, s: StatusMessage) -> None:
        if s.device_id != device_id:
            raise FleetError(f"status names device {s.device_id!r} but came on its topic")
        with self._lock:
            d = self._device(device_id)
            if not self._epoch(d, s.epoch):
                return
            was = d.online
            d.online = s.online
            d.last_seen = max(d.last_seen, self.clock())
            if s.group:
                d.group = s.group
            if s.labels:
                d.labels = dict(s.labels)
            if s.model_version and d.reported_version == 0:
                # only for devices that never published a reported state: the reported
                # shadow, versioned by the device, is the one source of what it runs
                d.model_version = s.model_version
            if s.agent_version:
                d.agent_version = s.agent_version
            if was and not s.online:
                self.engine.device_offline(device_id)
                d.bump("disconnects")
            self._dirty_devices.add(device_id)
        self._emit("status", s)
        self._wake.set()

    def _handle_reported(self, device_id: str, r: ReportedState) -> None:
        with self._lock:
            d = self._device(device_id)
            if not self._epoch(d, r.epoch):
                return
            if r.epoch and r.version <= d.reported_version:
                # an older retained copy (after a reconnect or a controller restart) or a
                # redelivery: what the device runs is decided by its version, not by arrival
                self.stats["stale_reports"] += 1
                return
            d.reported = dict(r.state)
            d.reported_version = r.version
            d.desired_acked = max(d.desired_acked, r.desired_version)
            d.last_seen = max(d.last_seen, self.clock())
            model = r.state.get("model")
            if isinstance(model, dict):
                d.model_name = str(model.get("name") or "")
                d.model_version = str(model.get("version") or "")
            elif "model" in r.state and model is None:
                d.model_name = d.model_version = ""  # the device serves no model
            self._dirty_devices.add(device_id)
        self._emit("reported", r)

    def _handle_telemetry(self, device_id: str, t: TelemetryRecord) -> None:
        if t.device_id != device_id:
            raise FleetError(f"telemetry names device {t.device_id!r} but came on its topic")
        with self._lock:
            d = self._device(device_id)
            if not self._epoch(d, t.epoch):
                return
            d.last_seen = max(d.last_seen, self.clock())
            self._dirty_devices.add(device_id)
            if t.seq <= d.telemetry_seq:
                d.bump("telemetry_duplicates")
                return
            if d.telemetry_seq >= 0 and t.seq > d.telemetry_seq + 1:
                d.bump("telemetry_gaps", t.seq - d.telemetry_seq - 1)
            d.telemetry_seq = t.seq
            d.bump("telemetry")
            ring = self.telemetry.get(device_id)
            if ring is None:
                ring = self.telemetry[device_id] = deque(maxlen=TELEMETRY_KEEP)
            ring.append(asdict(t))
        self._emit("telemetry", t)

    def _handle_update(self, device_id: str, topic: str, u: ExecutionUpdate) -> None:
        if u.device_id != device_id or f"/jobs/{u.job_id}/update" not in topic:
            raise FleetError(
                f"job update for ({u.device_id!r}, {u.job_id!r}) came on another topic {topic}"
            )
        with self._lock:
            e = self.engine.apply_update(u)
            d = self._device(device_id)
            d.last_seen = max(d.last_seen, self.clock())
            self._dirty_devices.add(device_id)
            if e is None:
                self.stats["ignored_updates"] += 1
                self._wake.set()  # a cancel for a job the device should not resume
                return
            self.stats["updates"] += 1
            if e.terminal:
                d.bump(f"jobs_{e.state.value.lower()}")
            job = self.engine.jobs[e.job_id]
            refused_signature = (
                job.operation == "deploy"
                and e.state.value == "REJECTED"
                and "signature" in e.reason.lower()
            )
        if refused_signature:
            doc = job.document
            self.packages.mark_refused(str(doc.get("model")), str(doc.get("version")), e.reason)
        self._emit("execution", e)
        self._wake.set()

    def _emit(self, kind: str, obj: Any) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, obj)
            except Exception:
                log.exception("fleet listener failed")
