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

This module holds the lifecycle, the ticker and the commands; its parts live beside it:
``ingest.py`` (what devices send), ``ha.py`` (the lease), ``views.py`` (what the API shows),
``errors.py`` (``NotFound``, ``NotActive``, ``UnknownTarget``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgecloud.errors import ConfigError, ConnectionFailed, FleetError, TransportError
from edgecloud.fleet.errors import NotActive, NotFound, UnknownTarget
from edgecloud.fleet.ha import LEASE_NAME, LeaseHolder
from edgecloud.fleet.ingest import TELEMETRY_KEEP, DeviceIngest
from edgecloud.fleet.jobs import (
    AbortCriterion,
    Job,
    JobEngine,
    RolloutConfig,
    TickResult,
    parse_duration,
)
from edgecloud.fleet.messages import (
    DesiredState,
    ExecutionUpdate,
    dumps,
    validate_policy,
)
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.registry import Device, Shadow, merge_patch
from edgecloud.fleet.store import FleetStore, ShadowConflict
from edgecloud.fleet.views import ControllerViews
from edgecloud.mqtt import (
    Backoff,
    BrokerSettings,
    MqttConnection,
    RefusalPolicy,
    SelectorLoop,
    broker_settings,
)
from edgecloud.topics import Topics, check_segment

__all__ = [
    "TELEMETRY_KEEP",
    "FleetController",
    "NotActive",
    "NotFound",
    "UnknownTarget",
]

log = logging.getLogger("edgecloud.fleet")

RECONNECT_GRACE_S = 3.0  # after (re)connecting, queued updates land before timeouts fire


class FleetController(DeviceIngest, LeaseHolder, ControllerViews):
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


def _hostname() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "controller"
