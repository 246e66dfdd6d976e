"""The fleet controller: registry, shadows and jobs over MQTT, packages and an API over HTTP.

One ``edgecloud.mqtt.MqttConnection`` (MQTT 5, TCP_NODELAY, a persistent session so job updates
published while the controller restarts are delivered when it is back; its own loop thread)
subscribes to every device's status, reported state, job updates and telemetry; it reconnects
with backoff and stops for good when the broker refuses its credentials. Messages are handled
on the connection's loop thread under one lock
and only change memory; a single ticker thread persists what changed to the ``FleetStore``,
runs the job engine (timeouts, abort criteria, rollout rate) and publishes job notifications.
So a slow disk delays persistence, never the broker connection, and every decision about jobs
is taken in one place.

A malformed payload from a device is counted and logged with the device and the field, and
dropped: one broken device never stops the controller.

High availability (``lease_s``): several controllers share one database, and the one holding
the store's lease row is *active*; the others are standbys. A standby is connected to the
broker (its own client id and session) and keeps its registry current from statuses, reported
states and telemetry, buffers job updates, answers reads, and refuses writes (``NotActive``,
HTTP 503). It tries to take the lease every ``lease_s / 3``; when the active one dies the lease
expires after at most ``lease_s`` and a standby takes over: it loads jobs, executions and
shadows from the database, applies the buffered job updates (idempotent by seq), notifies
again what was notified but not started (the notification may have died with the active one),
and runs the jobs from there. An active controller that cannot renew its lease for
``lease_s / 2`` stops running jobs before another may take over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edgecloud.errors import ConfigError, ConnectionFailed, FleetError, TransportError
from edgecloud.fleet.jobs import (
    AbortCriterion,
    Execution,
    Job,
    JobEngine,
    RolloutConfig,
    TickResult,
    parse_duration,
)
from edgecloud.fleet.messages import (
    DesiredState,
    ExecutionUpdate,
    ReportedState,
    StatusMessage,
    TelemetryRecord,
    dumps,
    validate_policy,
)
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.registry import Device, Shadow, compute_delta, merge_patch
from edgecloud.fleet.store import FleetStore, ShadowConflict
from edgecloud.mqtt import (
    Backoff,
    BrokerSettings,
    MqttConnection,
    RefusalPolicy,
    SelectorLoop,
    broker_settings,
)
from edgecloud.topics import Topics, check_segment

__all__ = ["FleetController", "NotActive", "NotFound", "UnknownTarget"]

log = logging.getLogger("edgecloud.fleet")

TELEMETRY_KEEP = 10_000  # records kept in memory per device for the API
RECONNECT_GRACE_S = 3.0  # after (re)connecting, queued updates land before timeouts fire


class NotFound(FleetError):
    """A device, job or package the caller named does not exist."""


class NotActive(FleetError):
    """This controller is a standby: writes go to the active one (HTTP 503)."""


LEASE_NAME = "fleet-controller"


class UnknownTarget(FleetError):
    """A job or policy names a target that is neither a known device nor a group (bad input)."""


class FleetController:
    """Tracks devices and runs jobs. ``start()`` connects; ``close()`` stops everything.

    ``public_base_url`` is how devices reach the package server (``http://host:port``); the
    HTTP side (``edgecloud.fleet.server``) sets it when it starts unless it was given.
    """

    def __init__(
        self,
        broker: BrokerSettings | str,
        store: FleetStore,
        packages: PackageStore,
        *,
        prefix: str = "edgecloud",
        client_id: str = "edgecloud-fleet-controller",
        public_base_url: str = "",
        tick_interval: float = 0.2,
        clock: Callable[[], float] = time.time,
        lease_s: float | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.topics = Topics(prefix)
        if lease_s is not None and (not lease_s > 0 or lease_s != lease_s):
            raise ConfigError(f"lease must be a positive number of seconds, got {lease_s!r}")
        self.lease_s = lease_s
        self.instance_id = instance_id or f"{_hostname()}-{uuid.uuid4().hex[:8]}"
        # without a lease this controller is the only one, so always active
        self.active = lease_s is None
        self._lease_renewed = 0.0  # time.monotonic() of the last successful renewal
        self._lease_tried = 0.0
        self._standby_updates: deque[tuple[str, str, ExecutionUpdate]] = deque(maxlen=100_000)
        if lease_s is not None:
            client_id = f"{client_id}-{check_segment(self.instance_id, 'instance id')}"
        self.store = store
        self.packages = packages
        self.public_base_url = public_base_url.rstrip("/")
        self.tick_interval = tick_interval
        self.clock = clock
        self._lock = threading.RLock()
        self.engine = JobEngine(clock)
        self.engine.load(store.load_jobs(), store.load_executions())
        self.devices: dict[str, Device] = {d.device_id: d for d in store.load_devices()}
        for d in self.devices.values():
            d.online = False  # the retained status after connecting says who is online
        self.shadows: dict[str, Shadow] = {s.device_id: s for s in store.load_shadows()}
        self.telemetry: dict[str, deque[dict[str, Any]]] = {}
        # messages dropped as malformed, job updates applied, and updates ignored (QoS 1
        # redeliveries, late reports for finished executions, unknown jobs)
        self.stats: dict[str, int] = {
            "malformed": 0,
            "updates": 0,
            "ignored_updates": 0,
            "stale_reports": 0,  # reported states older than one already applied
            "stale_epoch": 0,  # messages from an identity epoch the device has left
        }
        self.listeners: list[Callable[[str, Any], None]] = []
        self._dirty_devices: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._ticker: threading.Thread | None = None
        self._settings = broker_settings(broker)
        self._client_id = client_id
        self._loop: SelectorLoop | None = None
        self._conn: MqttConnection | None = None
        self._connected_at = 0.0
        self._desired_synced = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> FleetController:
        t = self.topics
        self._loop = SelectorLoop(name="edgecloud-fleet-mqtt", connect_workers=1)
        self._conn = MqttConnection(
            self._settings,
            client_id=self._client_id,
            on_message=self._on_message,
            on_state=self._on_state,
            subscriptions=[
                (t.all_status(), 1),
                (t.all_reported(), 1),
                (t.all_job_updates(), 1),
                (t.all_telemetry(), 1),
            ],
            backoff=Backoff(base=1.0, cap=5.0),
            refusal=RefusalPolicy.STOP,  # refused credentials: retrying cannot help
            session_expiry=3600,
            # a controller fans out to the whole fleet: room for a deploy's notifications
            max_queued=100_000,
            loop=self._loop,
        )
        conn = self._conn.start(wait=False)
        if not conn.wait_first_attempt(timeout) or not conn.connected:
            err: TransportError | None = conn.fatal or conn.last_error
            self._close_link()
            if err is not None and conn.fatal is None:
                err = ConnectionFailed(
                    f"fleet controller: cannot reach broker {self._settings.url}: {err}"
                )
            raise err or ConnectionFailed(
                f"fleet controller: no CONNACK from {self._settings.url} in {timeout}s"
            )
        self._ticker = threading.Thread(target=self._tick_loop, name="fleet-ticker", daemon=True)
        self._ticker.start()
        return self

    def _close_link(self) -> None:
        if self._conn is not None:
            self._conn.close(wait=2.0)
        if self._loop is not None:
            self._loop.stop()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self.active:
            with contextlib.suppress(Exception):
                self._flush()
        if self.lease_s is not None and self.active:
            with contextlib.suppress(Exception):
                self.store.release_lease(LEASE_NAME, self.instance_id)
        self._close_link()
        self.store.close()

    def __enter__(self) -> FleetController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- MQTT callbacks (the connection's loop thread) ------------------------------------------
    def _on_state(self, up: bool, err: TransportError | None) -> None:
        if up:
            self._connected_at = time.monotonic()
            self._desired_synced = False
            self._connected.set()
            self._wake.set()
            log.info("fleet controller connected to %s", self._settings.url)
            return
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            log.warning("fleet controller lost the broker (%s); reconnecting", err)
        elif err is not None and self._conn is not None and self._conn.fatal is err:
            log.error("%s", err)

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

    # -- the ticker --------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_interval)
            self._wake.clear()
            try:
                self.tick()
            except Exception:
                log.exception("fleet tick failed")

    def tick(self) -> None:
        """Run the job engine once, persist what changed and publish notifications."""
        if self.lease_s is not None and not self._lease_tick():
            return
        with self._lock:
            online = frozenset(d.device_id for d in self.devices.values() if d.online)
            resync: list[Shadow] = []
            if self.connected:
                settled = time.monotonic() - self._connected_at >= RECONNECT_GRACE_S
                result = self.engine.tick(online, timeouts=settled)
                if settled and not self._desired_synced:
                    resync = self._desired_to_resend()
                    self._desired_synced = True
            else:  # notifications would only queue up in paho; keep them QUEUED instead
                result = self.engine.drain()
            devices = [self.devices[i] for i in self._dirty_devices if i in self.devices]
            self._dirty_devices.clear()
        self._commit(result)
        self.store.save_devices(devices)
        for sh in resync:
            payload = dumps(DesiredState(version=sh.version, state=sh.desired, ts=sh.updated_at))
            self._publish(self.topics.shadow_desired(sh.device_id), payload, retain=True)

    # -- high availability -------------------------------------------------------------------
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

    def _require_active(self) -> None:
        if not self.active:
            raise NotActive(
                f"fleet controller {self.instance_id} is a standby; send this to the active one"
            )

    def _desired_to_resend(self) -> list[Shadow]:
        """Desired states the broker may not hold: newer than what their device acted on.

        A controller killed right after storing a desired state may never have handed it to
        the broker; after every (re)connection, once the retained reported states are in, the
        controller publishes again each desired state its device has not acknowledged.
        """
        out = []
        for sh in self.shadows.values():
            d = self.devices.get(sh.device_id)
            if sh.version > 0 and (d is None or d.desired_acked < sh.version):
                out.append(sh)
        return out

    def _commit(self, result: TickResult) -> None:
        """Persist what the engine changed, then tell devices (cancels first, then jobs)."""
        self.store.save_jobs(result.jobs)
        self.store.save_executions(result.executions)
        for device_id, cancel in result.cancel:
            self._publish(self.topics.jobs_cancel(device_id), dumps(cancel), retain=False)
        for device_id, note in result.notify:
            self._publish(self.topics.jobs_notify(device_id), dumps(note), retain=False)

    def _flush(self) -> None:
        with self._lock:
            result = self.engine.drain()
            devices = [self.devices[i] for i in self._dirty_devices if i in self.devices]
            self._dirty_devices.clear()
        self._commit(result)
        self.store.save_devices(devices)

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        conn = self._conn
        if conn is None:
            log.warning("publish to %s dropped: the controller is not started", topic)
            return
        try:  # while the broker is away paho keeps QoS 1 messages for the persistent session
            conn.publish(topic, payload, qos=1, retain=retain, queue_when_down=True)
        except TransportError as exc:
            log.warning("publish to %s failed: %s", topic, exc)

    # -- the API (any thread) ------------------------------------------------------------------
    def resolve_targets(self, targets: Iterable[str]) -> tuple[list[str], list[str]]:
        """Each target is a group name or a device id -> (device ids, groups used)."""
        devices: list[str] = []
        groups: list[str] = []
        with self._lock:
            by_group: dict[str, list[str]] = {}
            for d in sorted(self.devices.values(), key=lambda d: d.device_id):
                if d.group:
                    by_group.setdefault(d.group, []).append(d.device_id)
            for t in targets:
                if t in by_group:
                    groups.append(t)
                    devices.extend(by_group[t])
                elif t in self.devices:
                    devices.append(t)
                else:
                    known = ", ".join(sorted(by_group)) or "none"
                    raise UnknownTarget(
                        f"target {t!r} is neither a known device nor a group (groups: {known})"
                    )
        return list(dict.fromkeys(devices)), groups

    def create_job(
        self,
        operation: str,
        document: dict[str, Any],
        targets: Iterable[str],
        *,
        job_id: str | None = None,
        rollout: RolloutConfig | None = None,
        abort: Iterable[AbortCriterion] = (),
        timeout_s: float | str = 600.0,
        job_timeout_s: float | str | None = None,
        retry: dict[str, int] | str | None = None,
    ) -> Job:
        """Create a job after checking everything it will send (``FleetError`` names the
        field): the policy of a policy job, the durations, the retry configuration."""
        from edgecloud.fleet.jobs import parse_retry

        self._require_active()
        if operation == "policy":
            document = validate_policy(document, "policy")
            if not document:
                raise FleetError("policy: give at least one key to set")
        timeout = parse_duration(timeout_s, "timeout_s")
        job_timeout = (
            None if job_timeout_s is None else parse_duration(job_timeout_s, "job_timeout_s")
        )
        retries = parse_retry(retry)
        devices, groups = self.resolve_targets(targets)
        jid = job_id or f"{operation}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with self._lock:
            job = self.engine.create(
                jid,
                operation,
                document,
                devices,
                groups=groups,
                rollout=rollout,
                abort=abort,
                timeout_s=timeout,
                job_timeout_s=job_timeout,
                retry=retries,
            )
            result = self.engine.drain()
        self._commit(result)
        log.info("job %s (%s) created for %d devices", jid, operation, len(devices))
        self._wake.set()
        return job

    def deploy(
        self,
        package: Path | tuple[str, str],
        targets: Iterable[str],
        *,
        expected_sha256: str | None = None,
        **job_kwargs: Any,
    ) -> Job:
        """Start a deploy job whose document points at the package's download.

        ``package`` is a package directory (verified and stored first) or the (name, version)
        of a package already in the store (uploaded with ``POST /api/packages``). The job
        carries the archive hash recorded when it was stored; ``expected_sha256`` (what the
        upload returned) must match it, so a store changed after the upload is noticed here.
        """
        if not self.public_base_url:
            raise ConfigError("the controller has no public_base_url for package downloads")
        self._require_active()
        self.resolve_targets(targets)  # a bad target is refused before anything is stored
        if isinstance(package, tuple):
            try:
                pkg = self.packages.get(*package)
            except FleetError as exc:
                raise NotFound(str(exc)) from exc
            if expected_sha256 and expected_sha256.lower() != pkg.sha256:
                raise FleetError(
                    f"package {pkg.name} {pkg.version}: the store records sha256 {pkg.sha256}, "
                    f"the request expects {expected_sha256}"
                )
        else:
            pkg = self.packages.add(Path(package))
        document = {
            "package_url": self.public_base_url + pkg.url_path(),
            "sha256": pkg.sha256,
            "size": pkg.size,
            "model": pkg.name,
            "version": pkg.version,
        }
        return self.create_job("deploy", document, targets, **job_kwargs)

    def rollback(self, targets: Iterable[str], version: str | None = None, **kw: Any) -> Job:
        return self.create_job("rollback", {"version": version} if version else {}, targets, **kw)

    def cancel(self, job_id: str, *, force: bool = False) -> Job:
        self._require_active()
        with self._lock:
            try:
                job = self.engine.cancel(job_id, force=force)
            except FleetError as exc:
                if job_id not in self.engine.jobs:
                    raise NotFound(str(exc)) from exc
                raise
            result = self.engine.drain()
        self._commit(result)
        self._wake.set()
        return job

    def job_view(self, job_id: str, *, executions: bool = True) -> dict[str, Any]:
        with self._lock:
            if job_id not in self.engine.jobs:
                raise NotFound(f"no job {job_id!r}")
            job = self.engine.jobs[job_id]
            out = job.to_dict()
            out["counts"] = self.engine.counts(job_id)
            out["total"] = len(job.targets)
            out["outcome"] = _job_outcome(job.status, out["counts"], out["total"])
            if executions:
                out["executions"] = [e.to_dict() for e in self.engine.executions_of(job_id)]
        return out

    def jobs_view(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = sorted(self.engine.jobs, key=lambda j: self.engine.jobs[j].created_at)
            return [self.job_view(j, executions=False) for j in ids]

    def devices_view(self) -> list[dict[str, Any]]:
        with self._lock:
            last = self._last_finished()
            return [
                self._device_dict(d, last)
                for d in sorted(self.devices.values(), key=lambda d: d.device_id)
            ]

    def device_view(self, device_id: str) -> dict[str, Any]:
        with self._lock:
            d = self.devices.get(device_id)
            if d is None:
                raise NotFound(f"no device {device_id!r}")
            out = self._device_dict(d, self._last_finished())
            out["shadow"] = self.shadow_view(device_id)
        return out

    def _device_dict(self, d: Device, last: dict[str, Execution]) -> dict[str, Any]:
        out = d.to_dict()
        out.pop("reported", None)
        out.pop("past_epochs", None)
        pending = [e for e in self.engine._pending_of(d.device_id)]
        out["pending_jobs"] = [e.job_id for e in pending]
        out["last_failure"] = self._failure_of(d, last.get(d.device_id))
        return out

    def _last_finished(self) -> dict[str, Execution]:
        """Each device's most recently finished execution (any job)."""
        last: dict[str, Execution] = {}
        for e in self.engine.executions.values():
            if e.terminal:
                cur = last.get(e.device_id)
                if cur is None or e.updated_at >= cur.updated_at:
                    last[e.device_id] = e
        return last

    @staticmethod
    def _failure_of(d: Device, e: Execution | None) -> dict[str, Any] | None:
        """Why a device counts as failing: its last execution did not succeed, or its
        reported state carries a desired-state error. None when it is healthy."""
        if e is not None and e.state.value != "SUCCEEDED":
            return {"job_id": e.job_id, "state": e.state.value, "reason": e.reason}
        if d.reported.get("error"):
            return {"job_id": None, "state": "DESIRED_ERROR", "reason": str(d.reported["error"])}
        return None

    def summary_view(self) -> dict[str, Any]:
        """Fleet health at a glance (``fleet summary``, ``GET /api/summary``).

        Versions in use and online/offline come from the registry (the devices' reported
        shadows and statuses). A device is *failing* when its last finished job execution did
        not succeed or its reported state carries a desired-state error. Offload and degraded
        rates add up each device's latest heartbeat (counts since that agent started).
        """
        with self._lock:
            devices = list(self.devices.values())
            last_exec = self._last_finished()
            versions: dict[str, int] = {}
            failing: list[dict[str, Any]] = []
            requests = cloud = degraded = 0
            for d in sorted(devices, key=lambda d: d.device_id):
                key = f"{d.model_name} {d.model_version}".strip() or "(none)"
                versions[key] = versions.get(key, 0) + 1
                failure = self._failure_of(d, last_exec.get(d.device_id))
                if failure is not None:
                    failing.append({"device_id": d.device_id, **failure})
                ring = self.telemetry.get(d.device_id)
                if ring:
                    data = ring[-1].get("data") or {}
                    requests += int(data.get("requests") or 0)
                    cloud += int(data.get("cloud") or 0)
                    degraded += int(data.get("degraded") or 0)
            online = sum(d.online for d in devices)
            return {
                "devices": len(devices),
                "online": online,
                "offline": len(devices) - online,
                "reprovisioned": sum(d.reprovisioned_at is not None for d in devices),
                "versions": dict(sorted(versions.items())),
                "failing": failing,
                "requests": requests,
                "offload_rate": round(cloud / requests, 4) if requests else None,
                "degraded_rate": round(degraded / requests, 4) if requests else None,
                "jobs_in_progress": sum(
                    j.status == "IN_PROGRESS" for j in self.engine.jobs.values()
                ),
            }

    def telemetry_view(self, device_id: str, after: int = -1) -> list[dict[str, Any]]:
        with self._lock:
            if device_id not in self.devices:
                raise NotFound(f"no device {device_id!r}")
            return [r for r in self.telemetry.get(device_id, ()) if r["seq"] > after]

    def shadow_view(self, device_id: str) -> dict[str, Any]:
        with self._lock:
            d = self.devices.get(device_id)
            s = self.shadows.get(device_id) or Shadow(device_id)
            reported = d.reported if d else {}
            return {
                "device_id": device_id,
                "version": s.version,
                "desired": s.desired,
                "reported": reported,
                "reported_version": d.reported_version if d else 0,
                "delta": compute_delta(s.desired, reported),
            }

    def update_shadow(
        self, device_id: str, patch: dict[str, Any], expected_version: int | None
    ) -> dict[str, Any]:
        """Merge ``patch`` into the desired state; refused when ``expected_version`` is stale.

        ``expected_version=None`` means "whatever is current" (last writer wins) and is meant
        for commands that set one key, such as ``fleet policy set``.
        """
        self._require_active()
        if isinstance(patch.get("policy"), dict):
            validate_policy(patch["policy"], "desired.policy")
        elif patch.get("policy") is not None:
            raise FleetError("desired.policy must be an object (or null to remove it)")
        with self._lock:
            if device_id not in self.devices:
                raise NotFound(f"no device {device_id!r}")
            cur = self.shadows.get(device_id) or Shadow(device_id)
            base = cur.version if expected_version is None else expected_version
            if base != cur.version:
                raise ShadowConflict(device_id, base, cur.version)
            new = Shadow(
                device_id,
                version=cur.version + 1,
                desired=merge_patch(cur.desired, patch),
                updated_at=self.clock(),
            )
            self.store.save_shadow(new, expected_version=cur.version)  # CAS in the database too
            self.shadows[device_id] = new
        payload = dumps(DesiredState(version=new.version, state=new.desired, ts=new.updated_at))
        self._publish(self.topics.shadow_desired(device_id), payload, retain=True)
        return self.shadow_view(device_id)

    def set_policy(self, targets: Iterable[str], policy: dict[str, Any]) -> list[dict[str, Any]]:
        policy = validate_policy(policy, "policy")
        if not policy:
            raise FleetError("policy: give at least one key to set")
        devices, _ = self.resolve_targets(targets)
        return [self.update_shadow(d, {"policy": policy}, None) for d in devices]

    def metrics_text(self) -> str:
        """Prometheus text exposition of the registry and jobs (no client library needed)."""
        with self._lock:
            online = sum(d.online for d in self.devices.values())
            lines = [
                "# HELP edgecloud_fleet_devices Devices known to the controller.",
                "# TYPE edgecloud_fleet_devices gauge",
                f'edgecloud_fleet_devices{{online="true"}} {online}',
                f'edgecloud_fleet_devices{{online="false"}} {len(self.devices) - online}',
                "# HELP edgecloud_fleet_jobs Jobs by status.",
                "# TYPE edgecloud_fleet_jobs gauge",
            ]
            by_status: dict[str, int] = {}
            for j in self.engine.jobs.values():
                by_status[j.status] = by_status.get(j.status, 0) + 1
            for status in ("IN_PROGRESS", "COMPLETED", "CANCELED"):
                lines.append(
                    f'edgecloud_fleet_jobs{{status="{status}"}} {by_status.get(status, 0)}'
                )
            lines += [
                "# HELP edgecloud_fleet_executions Job executions by state (all jobs).",
                "# TYPE edgecloud_fleet_executions gauge",
            ]
            by_state: dict[str, int] = {}
            for e in self.engine.executions.values():
                by_state[e.state.value] = by_state.get(e.state.value, 0) + 1
            for state in sorted(by_state):
                lines.append(f'edgecloud_fleet_executions{{state="{state}"}} {by_state[state]}')
            lines += [
                "# HELP edgecloud_fleet_messages_total Device messages by outcome.",
                "# TYPE edgecloud_fleet_messages_total counter",
            ]
            for k in sorted(self.stats):
                lines.append(f'edgecloud_fleet_messages_total{{outcome="{k}"}} {self.stats[k]}')
            telemetry = sum(d.counters.get("telemetry", 0) for d in self.devices.values())
            dups = sum(d.counters.get("telemetry_duplicates", 0) for d in self.devices.values())
            gaps = sum(d.counters.get("telemetry_gaps", 0) for d in self.devices.values())
            lines += [
                "# HELP edgecloud_fleet_telemetry_records_total Telemetry records by outcome.",
                "# TYPE edgecloud_fleet_telemetry_records_total counter",
                f'edgecloud_fleet_telemetry_records_total{{outcome="accepted"}} {telemetry}',
                f'edgecloud_fleet_telemetry_records_total{{outcome="duplicate"}} {dups}',
                f'edgecloud_fleet_telemetry_records_total{{outcome="missing"}} {gaps}',
                "# HELP edgecloud_fleet_broker_connected Whether the controller has the broker.",
                "# TYPE edgecloud_fleet_broker_connected gauge",
                f"edgecloud_fleet_broker_connected {int(self.connected)}",
            ]
        return "\n".join(lines) + "\n"

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll ``predicate`` under the lock (for tests and the benchmark)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate():
                    return True
            time.sleep(0.02)
        with self._lock:
            return predicate()

    def execution(self, job_id: str, device_id: str) -> Execution | None:
        with self._lock:
            return self.engine.executions.get((job_id, device_id))

    def job_done(self, job_id: str) -> bool:
        with self._lock:
            job = self.engine.jobs.get(job_id)
            return job is not None and job.status != "IN_PROGRESS"


def _job_outcome(status: str, counts: dict[str, int], total: int) -> str:
    """One word for a job's end: what its devices did, not only whether it ended.

    ``IN_PROGRESS``; ``SUCCEEDED`` (every device); ``ALL_FAILED`` (no device succeeded, all
    ended); ``PARTIAL`` (some did); ``CANCELED`` (canceled or aborted before every device ran).
    """
    ok = counts.get("SUCCEEDED", 0)
    ended = sum(n for s, n in counts.items() if s not in ("QUEUED", "IN_PROGRESS"))
    if status == "IN_PROGRESS":
        return "IN_PROGRESS"
    if ok == total:
        return "SUCCEEDED"
    if ok == 0 and ended == total and counts.get("CANCELED", 0) < total:
        return "ALL_FAILED"
    if status == "CANCELED" and ok == 0:
        return "CANCELED"
    return "PARTIAL"


def _hostname() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "controller"
