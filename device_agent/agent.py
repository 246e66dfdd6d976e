"""The device agent: one process that serves the active model and obeys the fleet.

Threads, each with one job so that none can starve another:

- *network*: paho's ``loop()`` plus reconnection with capped exponential backoff and full jitter
  (so a thousand devices coming back after a broker restart do not reconnect in lock-step);
  subscribes again and republishes the retained online status on every CONNACK.
- *sender*: publishes the durable outbox (``queue.py``) in order, at most ``queue.inflight``
  unacknowledged messages at a time; a row is deleted only on its PUBACK. After a reconnect it
  starts again from the oldest unacknowledged row, so delivery is at-least-once and in order.
- *telemetry*: a heartbeat every ``telemetry.interval_s`` into the outbox with a durable ``seq``.
- *worker*: runs jobs and desired-state changes one at a time from a bounded queue. Each runs
  in its own thread under a watchdog: a step that hangs past its timeout is abandoned (and told
  to stop at its next check) and the job is reported FAILED, so one stuck download never blocks
  the next job.

Jobs are journaled in the queue's SQLite file before any work starts, so a job delivered twice
(QoS 1) runs once, a job that finished before a restart is reported again rather than redone,
and one interrupted by a restart (killed mid-download, say) runs again on start and resumes its
download from the ``.part`` file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.capture import HardExampleStore
from device_agent.config import AgentConfig
from device_agent.drift import DriftMonitor
from device_agent.queue import DurableQueue
from device_agent.server import LocalEndpoint
from device_agent.serving import AgentClient, InferOutcome, Metrics, load_model
from device_agent.store import DiskSpaceError, ModelStore, health_check
from edgecloud.errors import (
    ConfigError,
    EdgeCloudError,
    FleetError,
    PackageError,
    StoreError,
)
from edgecloud.fleet.messages import (
    POLICY_MODES,
    TERMINAL_STATES,
    DesiredState,
    ExecutionState,
    ExecutionUpdate,
    JobCancel,
    JobNotification,
    ReportedState,
    StatusMessage,
    TelemetryRecord,
    dumps,
)
from edgecloud.package import ModelPackage, load_public_key
from edgecloud.runtime.base import Backend

__all__ = ["Agent", "JobOutcome"]

log = logging.getLogger("device_agent")

try:
    from edgecloud import __version__ as AGENT_VERSION
except ImportError:  # pragma: no cover
    AGENT_VERSION = "0"

_MODES = POLICY_MODES


@dataclass(frozen=True)
class JobOutcome:
    status: ExecutionState
    reason: str = ""
    details: Mapping[str, Any] | None = None


class _Rejected(EdgeCloudError):
    """The job itself is unacceptable (malformed, unsigned, tampered, no room): REJECTED."""


class _Cancelled(EdgeCloudError):
    """The watchdog abandoned this job; stop before touching the store."""


class Agent:
    """Construct with a validated config, then ``start()``; ``stop()`` (or use as a context
    manager). ``agent.client`` is the in-process inference client; ``agent.endpoint`` the local
    V2 endpoint (None when disabled)."""

    def __init__(self, config: AgentConfig, *, endpoint_port: int | None = None) -> None:
        self.config = config
        self.device_id = config.device.id
        self.topics = config.topics
        root = config.store.path
        try:
            key = load_public_key(config.store.public_key)
        except (PackageError, OSError, ValueError) as exc:
            raise ConfigError(
                f"store.public_key: cannot load {config.store.public_key}: {exc}"
            ) from exc
        self.store = ModelStore(root, key, min_free_bytes=config.store.min_free_bytes)
        q = config.queue
        self.queue = DurableQueue(
            root / "agent.db",
            max_rows=q.max_rows,
            max_bytes=q.max_bytes,
            hard_cap_rows=q.hard_cap_rows,
        )
        self.metrics = Metrics()
        pol = config.policy
        #: The in-process client applications on the device call (a ``HybridClient``).
        self.client = AgentClient(
            mode=pol.mode,
            threshold=pol.threshold,
            regions=[r.as_client_region() for r in config.regions],
            metrics=self.metrics,
            deadline=pol.deadline_s,
            max_concurrency=pol.max_concurrency,
        )
        self.capture: HardExampleStore | None = None
        if config.capture.enabled:
            c = config.capture
            self.capture = HardExampleStore(
                root / "capture.db",
                threshold=c.threshold,
                sample_rate=c.sample_rate,
                max_count=c.max_count,
                max_bytes=c.max_bytes,
            )
            self.client.on_answer.append(self._capture)
        #: Confidence/offload drift vs the tune-time reference (device_agent/drift.py).
        self.drift = DriftMonitor()
        self.client.on_answer.append(self._observe_drift)
        self.endpoint: LocalEndpoint | None = None
        self._endpoint_port = endpoint_port
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=64)
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}
        self._acked_early: dict[int, float] = {}
        self._cursor = 0
        self._epoch = 0  # connections so far; the sender restarts from the oldest row on change
        self._threads: list[threading.Thread] = []
        self._mqtt: Any = None
        self.malformed = 0
        self.last_error = ""
        self.connects = 0
        self._refused = False
        self._closing = False
        self._stop_network = threading.Event()
        self._started = time.time()
        # One installation at a time, also against a job the watchdog abandoned mid-way.
        self._install = threading.Lock()
        # A failed desired state waiting for its next attempt: (state, time.monotonic() due).
        self._desired_retry: tuple[DesiredState, float] | None = None
        # The identity epoch of this store: new when the store is new (a re-provisioned device
        # starts a new telemetry and reported-state sequence that the controller tells apart).
        self.epoch = self.queue.get("identity_epoch") or ""
        if not self.epoch:
            self.epoch = f"{time.time_ns():020d}-{os.urandom(4).hex()}"
            self.queue.set("identity_epoch", self.epoch)
        # The desired state being acted on and what it left to say in the reported state
        # (error, retry, policy_ignored): kept across restarts, like the failure journal.
        self._desired_version = 0
        self._desired_note: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            saved_note = json.loads(self.queue.get("desired_report") or "{}")
            self._desired_version = int(saved_note.get("desired_version", 0))
            self._desired_note = dict(saved_note.get("note") or {})
        # Job executions: the one running now (key, its cancel event) and those canceled by
        # the controller (key -> reason) so that a queued or resumed copy does not start.
        self._jobs_lock = threading.Lock()
        self._running_job: tuple[str, threading.Event] | None = None
        self._canceled: dict[str, str] = {}
        self._broker_lost_at: float | None = None
        self._handling_desired = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Agent:
        saved = self.queue.get("policy")
        if saved:
            with contextlib.suppress(ValueError, EdgeCloudError):
                self._apply_policy(json.loads(saved))
        self._load_active()
        if self.config.endpoint.enabled:
            ep = self.config.endpoint
            port = ep.port if self._endpoint_port is None else self._endpoint_port
            try:
                self.endpoint = LocalEndpoint(
                    self.client,
                    host=ep.host,
                    port=port,
                    socket_path=ep.socket,
                    max_body_bytes=ep.max_body_bytes,
                    timeout_s=ep.timeout_s,
                    metrics_text=self.metrics_text,
                    agent_version=AGENT_VERSION,
                ).start()
            except OSError as exc:
                self.client.close()
                self.queue.close()
                where = ep.socket or f"{ep.host}:{port}"
                raise ConfigError(
                    f"endpoint: cannot listen on {where}: {exc.strerror or exc}"
                ) from exc
        self._mqtt = self._make_mqtt()
        self._publish_reported()  # what this start serves, whatever was reported before
        for key, note in self.queue.jobs_with_status(ExecutionState.IN_PROGRESS.value):
            # Not resumed on our own: the controller may have ended it meanwhile (timed out,
            # canceled, retried). Ask, and resume only when it sends the job again.
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
        for name, target in (
            ("agent-network", self._network_loop),
            ("agent-sender", self._sender_loop),
            ("agent-telemetry", self._telemetry_loop),
            ("agent-worker", self._worker_loop),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cleanly: mark the device offline (retained), disconnect, close everything."""
        if self._stop.is_set():
            return
        self._closing = True  # the network thread must not reconnect from here on
        if self._connected.is_set() and self._mqtt is not None and self._threads:
            with contextlib.suppress(Exception):
                info = self._mqtt.publish(
                    self.topics.status(self.device_id), self._status(False), qos=1, retain=True
                )
                info.wait_for_publish(timeout=1.0)
            with contextlib.suppress(Exception):
                self._mqtt.disconnect()  # written by the network thread, which then ends
                self._stop_network.wait(min(timeout, 2.0))
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=timeout)
        if self._mqtt is not None:
            # paho closes its sockets (and its wake-up socketpair) only in loop_forever/
            # loop_stop, which this agent does not use: its own thread drives ``loop()``.
            with contextlib.suppress(Exception):
                self._mqtt._reset_sockets()
        if self.endpoint is not None:
            self.endpoint.close()
        self.client.close()
        if self.capture is not None:
            self.capture.close()
        self.queue.close()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_forever(self) -> None:
        """Run until SIGTERM/SIGINT (the CLI's entry point)."""
        import signal

        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        log.info("agent %s running", self.device_id)
        try:
            while not done.wait(0.5):
                pass
        finally:
            self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def infer(self, inputs: Mapping[str, Any]) -> InferOutcome:
        """Answer one request with the active model (and the cloud, as the policy says)."""
        return self.client.answer(inputs)

    @property
    def active_version(self) -> str:
        m = self.client.manifest
        return m.version if m is not None else ""

    # -- model loading -----------------------------------------------------------------------
    def _load_active(self) -> None:
        """Serve what the pointer names; fall back to the previous slot if it is damaged."""
        try:
            p = self.store.pointer()
        except StoreError as exc:
            self._note_error(str(exc))
            return
        if p is None:
            return
        for slot in (p.slot, p.previous):
            if slot is None:
                continue
            try:
                pkg = self.store.verify_slot(slot)
                backend = load_model(pkg)
                health_check(backend, pkg)
            except EdgeCloudError as exc:
                self._note_error(f"slot {slot} cannot be served: {exc}")
                continue
            if slot != p.slot:
                self.store.set_active(slot, pkg)
            self.client.swap_model(backend, pkg.manifest)
            log.info("serving %s %s from slot %s", pkg.manifest.name, pkg.manifest.version, slot)
            return

    def _activate(self, slot: str, pkg: ModelPackage, backend: Backend) -> None:
        self.store.set_active(slot, pkg)
        old = self.client.swap_model(backend, pkg.manifest)
        if old is not None:
            threading.Thread(
                target=self.client.retire,
                args=(old, self.config.endpoint.timeout_s * 2),
                name="agent-retire",
                daemon=True,
            ).start()
        self._publish_status()
        if not self._handling_desired:  # that handler reports once, with its outcome
            self._publish_reported()

    def _publish_reported(self) -> None:
        """Queue the reported shadow: what runs now and how it routes, with a new version.

        Called after every change of either (deploy, rollback, policy; by job or by desired
        state) and at start. The version comes from a durable counter, so it grows across
        restarts and the controller can tell a late retained copy from the current state.
        """
        m = self.client.manifest
        state: dict[str, Any] = {
            "model": {"name": m.name, "version": m.version} if m else None,
            "policy": {"mode": self.client.mode.value, "threshold": self.client.threshold},
            **self._desired_note,
        }
        desired_version = self._desired_version
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
        self._wake.set()

    # -- MQTT --------------------------------------------------------------------------------
    def _make_mqtt(self) -> Any:
        from edgecloud.mqtt import make_client, parse_broker_url

        b = self.config.broker
        settings = parse_broker_url(
            b.url,
            username=b.username,
            password=b.password,
            ca=b.ca,
            certfile=b.cert,
            keyfile=b.key,
            keepalive=b.keepalive,
        )
        c = make_client(settings, self.device_id)  # MQTT 5, callback API 2, TLS, credentials
        c.will_set(self.topics.status(self.device_id), self._status(False), qos=1, retain=True)
        # The durable queue is the real buffer: paho only holds what is in flight.
        c.max_inflight_messages_set(self.config.queue.inflight)
        c.max_queued_messages_set(self.config.queue.inflight * 2)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = _nodelay
        # Only the network thread may write to the socket: paho's publish() called from another
        # thread writes directly when no loop thread of its own runs, and two writers can
        # reorder packets. With a write-interest hook registered, publish() only queues the
        # packet and wakes ``loop()``, which writes it, in order.
        c.on_socket_register_write = _no_op
        return c

    def _network_loop(self) -> None:
        try:
            self._network()
        finally:
            self._stop_network.set()

    def _network(self) -> None:
        import paho.mqtt.client as mqtt

        b = self.config.broker
        delay = b.reconnect_min_s
        first = True
        while not self._stop.is_set() and not self._closing:
            try:
                if first:
                    self._mqtt.connect(b.host, b.port, keepalive=b.keepalive)
                    first = False
                else:
                    self._mqtt.reconnect()
            except (OSError, ValueError) as exc:
                log.debug("broker %s unreachable: %s", b.url, exc)
                self._stop.wait(random.uniform(0, delay))
                delay = min(delay * 2, b.reconnect_max_s)
                continue
            while not self._stop.is_set():
                rc = self._mqtt.loop(timeout=0.1)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self._connected.is_set():
                    delay = b.reconnect_min_s
            self._connected.clear()
            if self._closing:
                return
            if self._refused:
                # Credentials or ACL refused: retrying fast will not help, but an operator may
                # fix the broker side, so keep trying at the slowest pace.
                delay = b.reconnect_max_s
                self._refused = False
            if not self._stop.is_set():
                self._stop.wait(random.uniform(0, delay))
                delay = min(delay * 2, b.reconnect_max_s)

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            from edgecloud.mqtt import reason_code_error

            self._refused = True
            self._note_error(str(reason_code_error(reason, f"connection of {self.device_id}")))
            return
        self.connects += 1
        if self._broker_lost_at is not None:
            log.warning(
                "reconnected to %s after %.1fs",
                self.config.broker.url,
                time.monotonic() - self._broker_lost_at,
            )
            self._broker_lost_at = None
        log.info("connected to %s (connection %d)", self.config.broker.url, self.connects)
        client.subscribe(
            [
                (self.topics.jobs_notify(self.device_id), 1),
                (self.topics.jobs_cancel(self.device_id), 1),
                (self.topics.shadow_desired(self.device_id), 1),
            ]
        )
        client.publish(self.topics.status(self.device_id), self._status(True), qos=1, retain=True)
        with self._lock:
            self._inflight.clear()
            self._acked_early.clear()
            self._cursor = 0
            self._epoch += 1

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        # "Connected" means jobs can reach us: only once the broker granted the subscriptions.
        failed = [r for r in reasons if getattr(r, "is_failure", False)]
        log.debug("subscriptions granted: %s", reasons)
        if failed:
            self._note_error(f"broker refused the job/shadow subscriptions: {failed}")
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._closing:
            log.info("disconnected from broker: %s", reason)
            return
        if was or self._broker_lost_at is None:
            # at the default verbosity: an operator must see that the device lost its broker
            log.warning(
                "lost the broker %s (%s); buffering to the durable queue and reconnecting",
                self.config.broker.url,
                reason,
            )
        if self._broker_lost_at is None:
            self._broker_lost_at = time.monotonic()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        if reason is not None and getattr(reason, "is_failure", False):
            self._note_error(f"broker refused a publish: {reason}")
        with self._lock:
            row = self._inflight.pop(mid, None)
            if row is None:
                # Either the PUBACK beat the sender recording the mid (a race of microseconds)
                # or it is for a message we do not track (status, a pre-reconnect resend).
                # Remember it only briefly: paho reuses mids after 65535 publishes.
                now = time.monotonic()
                self._acked_early[mid] = now
                if len(self._acked_early) > 1000:
                    self._acked_early = {
                        m: t for m, t in self._acked_early.items() if now - t < 5.0
                    }
                return
        self.queue.ack(row)
        self._wake.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        topic = msg.topic
        try:
            if topic == self.topics.jobs_notify(self.device_id):
                self._accept_job(msg.payload)
            elif topic == self.topics.jobs_cancel(self.device_id):
                self._cancel_job(JobCancel.parse(msg.payload))
            elif topic == self.topics.shadow_desired(self.device_id):
                if not msg.payload:
                    return  # a cleared retained desired state
                desired = DesiredState.parse(msg.payload)
                self._enqueue(("desired", desired))
        except FleetError as exc:
            self.malformed += 1
            self._note_error(f"malformed message on {topic}: {exc}")

    def _accept_job(self, payload: bytes) -> None:
        try:
            job = JobNotification.parse(payload)
        except FleetError as exc:
            # Reject it on its own topic when the job id is readable, so the controller knows.
            job_id = _job_id_of(payload)
            if job_id is not None:
                self._report(job_id, 1, ExecutionState.REJECTED, str(exc))
            raise
        self._enqueue(("job", job))

    def _cancel_job(self, c: JobCancel) -> None:
        """The controller ended this execution: do not start, resume or finish it.

        A running one is stopped at its next step boundary (never between the swap and the
        pointer write: the swap is one step); one waiting after a restart is closed here.
        Either way the device reports CANCELED, or, if it already finished, reports its
        final state again so the controller records what the device really did.
        """
        key = f"{c.job_id}#{c.execution_number}"
        reason = c.reason or "canceled by the controller"
        with self._jobs_lock:
            self._canceled[key] = reason
            if len(self._canceled) > 1000:
                self._canceled.pop(next(iter(self._canceled)))
            running = self._running_job
            if running is not None and running[0] == key:
                log.warning("job %s canceled by the controller while running: %s", key, reason)
                running[1].set()
                return
            prior = self.queue.job_get(key)
            if prior is not None and prior[0] in {s.value for s in TERMINAL_STATES}:
                res = json.loads(prior[2] or "{}")
                self._report(
                    c.job_id,
                    c.execution_number,
                    ExecutionState(prior[0]),
                    res.get("reason", ""),
                    {**res.get("details", {}), "repeated": True},
                )
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
                    self.store.discard_download(_download_key(job, url))

    def _enqueue(self, item: tuple[str, Any]) -> None:
        try:
            self._work.put_nowait(item)
        except queue.Full:
            if item[0] == "job":
                job: JobNotification = item[1]
                self._report(
                    job.job_id,
                    job.execution_number,
                    ExecutionState.REJECTED,
                    "agent busy: too many pending jobs",
                )
            else:
                self._note_error("agent busy: desired state change dropped")

    # -- outbox sender -----------------------------------------------------------------------
    def _sender_loop(self) -> None:
        window = self.config.queue.inflight
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            if not self._connected.is_set():
                continue
            with self._lock:
                room = window - len(self._inflight)
                cursor = self._cursor
                epoch = self._epoch
            if room <= 0:
                continue
            for item in self.queue.peek(after_id=cursor, limit=room):
                if not self._connected.is_set():
                    break
                info = self._mqtt.publish(item.topic, item.payload, qos=1, retain=item.retain)
                log.debug("outbox row %d -> mid %s rc %s", item.id, info.mid, info.rc)
                if info.rc != 0:
                    break
                with self._lock:
                    if self._epoch != epoch:
                        break  # reconnected meanwhile: start over from the oldest row
                    self._cursor = max(self._cursor, item.id)
                    early = self._acked_early.pop(info.mid, None)
                    if early is not None and time.monotonic() - early < 5.0:
                        acked = True
                    else:
                        self._inflight[info.mid] = item.id
                        acked = False
                if acked:
                    self.queue.ack(item.id)

    def _report(
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
        self._wake.set()

    def _status(self, online: bool) -> bytes:
        d = self.config.device
        return dumps(
            StatusMessage(
                device_id=self.device_id,
                online=online,
                ts=time.time(),
                group=d.group,
                model_version=self.active_version,
                agent_version=AGENT_VERSION,
                labels=dict(d.labels),
                epoch=self.epoch,
            )
        )

    def _publish_status(self) -> None:
        if self._connected.is_set() and self._mqtt is not None:
            self._mqtt.publish(
                self.topics.status(self.device_id), self._status(True), qos=1, retain=True
            )

    # -- telemetry ---------------------------------------------------------------------------
    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self._stop.wait(max(0.0, next_at - time.monotonic())):
                return
            next_at += interval
            try:
                self.heartbeat()
            except EdgeCloudError as exc:
                self._note_error(f"telemetry: {exc}")

    def heartbeat(self) -> int:
        """Enqueue one telemetry record now; returns its seq."""
        data = self.metrics.snapshot()
        m = self.client.manifest
        data.update(
            model=m.name if m else "",
            model_version=m.version if m else "",
            queue=self.queue.stats(),
            dropped=self.queue.dropped(),
            malformed=self.malformed,
            last_error=self.last_error,
            uptime_s=round(time.time() - self._started, 1),
            connects=self.connects,
            system=_system_stats(),
        )
        if self.capture is not None:
            data["hard_examples"] = len(self.capture.list())
        data.update(escalation=self.client.escalation.stats(), drift=self.drift.report())
        return self._telemetry("heartbeat", data)

    def _telemetry(self, kind: str, data: dict[str, Any]) -> int:
        topic = self.topics.telemetry(self.device_id)

        def build(seq: int) -> bytes:
            return dumps(TelemetryRecord(self.device_id, seq, time.time(), kind, data, self.epoch))

        seq = self.queue.put_with_seq("telemetry", "telemetry", topic, build)
        self._wake.set()
        return seq

    def _observe_drift(self, _inputs: Mapping[str, Any], outcome: InferOutcome) -> None:
        reason = str(outcome.result.reason)
        offloaded = outcome.route != "edge" or reason in ("background", "rate_limited")
        try:
            alarm = self.drift.observe(self.client.manifest, outcome.edge_outputs, offloaded)
            if alarm is not None:  # published at once: the fleet shows it as kind "drift"
                self._telemetry("drift", alarm)
        except Exception as exc:  # drift must never fail a request
            log.warning("drift monitor failed: %s", exc)

    def metrics_text(self) -> str:
        q = self.queue.stats()
        return self.metrics.prometheus(
            {
                "edgecloud_agent_connected": 1.0 if self.connected else 0.0,
                "edgecloud_agent_queue_rows": float(q["rows"]),
                "edgecloud_agent_queue_bytes": float(q["bytes"]),
                "edgecloud_agent_malformed_messages_total": float(self.malformed),
            }
        )

    def _capture(self, inputs: Mapping[str, Any], outcome: InferOutcome) -> None:
        if self.capture is None:
            return
        try:
            cloud = outcome.outputs if outcome.route == "cloud" else None
            self.capture.offer(
                inputs,
                outcome.edge_outputs or {},
                confidence=outcome.edge_confidence,
                model=outcome.model,
                version=outcome.version,
                route=outcome.route,
                cloud=cloud,
            )
        except Exception as exc:  # capture must never fail a request
            log.warning("hard-example capture failed: %s", exc)

    # -- jobs --------------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            retry = self._desired_retry
            item: Any
            if retry is not None and time.monotonic() >= retry[1]:
                self._desired_retry = None
                kind, item = "desired", retry[0]
            else:
                try:
                    kind, item = self._work.get(timeout=0.2)
                except queue.Empty:
                    continue
            try:
                if kind == "job":
                    self._handle_job(item)
                else:
                    self._handle_desired(item)
            except Exception as exc:  # the worker must survive anything one job does
                log.exception("job handling failed")
                self._note_error(f"{kind}: {type(exc).__name__}: {exc}")

    def _handle_job(self, job: JobNotification) -> None:
        key = f"{job.job_id}#{job.execution_number}"
        stop = threading.Event()
        with self._jobs_lock:
            prior = self.queue.job_get(key)
            if prior is not None and prior[0] in {s.value for s in TERMINAL_STATES}:
                # Finished before (a QoS 1 redelivery, or a controller that missed our
                # report): report the same outcome again, do not redo the work.
                res = json.loads(prior[2] or "{}")
                self._report(
                    job.job_id,
                    job.execution_number,
                    ExecutionState(prior[0]),
                    res.get("reason", ""),
                    {**res.get("details", {}), "repeated": True},
                )
                return
            if key in self._canceled:
                stop.set()  # canceled while it waited in the work queue
            self._running_job = (key, stop)
            note = dumps(job).decode()
            self.queue.job_put(key, job.job_id, job.execution_number, "IN_PROGRESS", note)
        try:
            self._report(job.job_id, job.execution_number, ExecutionState.IN_PROGRESS)
            timeout = min(job.timeout_s, self.config.job_step_timeout_s)
            outcome = self._run_watched(
                lambda cancel, step: self._execute(job, key, cancel, step),
                timeout,
                stop=stop,
            )
            if key in self._canceled and outcome.status != ExecutionState.SUCCEEDED:
                outcome = JobOutcome(
                    ExecutionState.CANCELED,
                    f"canceled by the controller: {self._canceled.get(key, '')}".rstrip(": "),
                )
        finally:
            with self._jobs_lock:
                self._running_job = None
        if job.operation in ("deploy", "rollback"):
            self.metrics.deployment(outcome.status.value.lower())
        url = job.document.get("package_url")
        if job.operation == "deploy" and isinstance(url, str) and _download_done(outcome):
            # A transient failure keeps the partial download: the controller may retry this
            # job (a new execution number, the same download) and it resumes from there.
            self.store.discard_download(_download_key(job, url))
        result = json.dumps({"reason": outcome.reason, "details": dict(outcome.details or {})})
        self.queue.job_put(
            key, job.job_id, job.execution_number, outcome.status.value, note, result
        )
        self.queue.prune_jobs()
        self._report(
            job.job_id,
            job.execution_number,
            outcome.status,
            outcome.reason,
            outcome.details,
        )

    def _run_watched(
        self,
        fn: Callable[[threading.Event, list[str]], JobOutcome],
        timeout: float,
        *,
        stop: threading.Event | None = None,
    ) -> JobOutcome:
        """Run ``fn`` in a thread; past ``timeout`` abandon it and report FAILED.

        ``stop`` set from outside (the controller canceled the job) stops it at its next check.
        """
        cancel = stop if stop is not None else threading.Event()
        step = ["start"]
        box: list[JobOutcome] = []

        def run() -> None:
            try:
                box.append(fn(cancel, step))
            except _Cancelled:
                pass
            except _Rejected as exc:
                box.append(JobOutcome(ExecutionState.REJECTED, str(exc)))
            except (PackageError, DiskSpaceError, FleetError) as exc:
                box.append(JobOutcome(ExecutionState.REJECTED, f"{step[0]}: {exc}"))
            except EdgeCloudError as exc:
                box.append(JobOutcome(ExecutionState.FAILED, f"{step[0]}: {exc}"))
            except Exception as exc:
                log.exception("job step %s crashed", step[0])
                box.append(
                    JobOutcome(ExecutionState.FAILED, f"{step[0]}: {type(exc).__name__}: {exc}")
                )

        t = threading.Thread(target=run, name="agent-job", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive() or not box:
            cancel.set()
            if t.is_alive():
                return JobOutcome(
                    ExecutionState.FAILED,
                    f"step '{step[0]}' did not finish within {timeout:g}s; abandoned",
                )
            return JobOutcome(ExecutionState.FAILED, f"step '{step[0]}' was cancelled")
        return box[0]

    def _execute(
        self, job: JobNotification, key: str, cancel: threading.Event, step: list[str]
    ) -> JobOutcome:
        doc = job.document
        if job.operation == "policy":
            step[0] = "policy"
            ignored = self._apply_policy(doc)
            self._publish_reported()
            return JobOutcome(
                ExecutionState.SUCCEEDED,
                "",
                {
                    "mode": self.client.mode.value,
                    "threshold": self.client.threshold,
                    "ignored": ignored,
                },
            )
        if job.operation == "rollback":
            return self._rollback(doc.get("version"), cancel, step)
        url = doc.get("package_url")
        if not isinstance(url, str) or not url:
            raise _Rejected("deploy document: 'package_url' must be a non-empty string")
        for f in ("sha256", "version", "model"):
            if f in doc and not isinstance(doc[f], str):
                raise _Rejected(f"deploy document: '{f}' must be a string, got {doc[f]!r}")
        size = doc.get("size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _Rejected(f"deploy document: 'size' must be a byte count, got {size!r}")
            self._check(cancel, step, "download")
            self.store.check_space(size)  # refuse before the first byte, not halfway
        return self._deploy(
            url,
            doc.get("sha256"),
            doc.get("version"),
            doc.get("model"),
            _download_key(job, url),
            cancel,
            step,
            deadline=time.monotonic() + min(job.timeout_s, self.config.job_step_timeout_s),
        )

    def _check(self, cancel: threading.Event, step: list[str], name: str) -> None:
        if cancel.is_set() or self._stop.is_set():
            raise _Cancelled(name)
        step[0] = name

    def _deploy(
        self,
        url: str,
        sha256: str | None,
        version: str | None,
        model: str | None,
        key: str,
        cancel: threading.Event,
        step: list[str],
        *,
        deadline: float | None = None,
    ) -> JobOutcome:
        m = self.client.manifest
        if m is not None and version and m.version == version and (not model or m.name == model):
            return JobOutcome(ExecutionState.SUCCEEDED, "already active", {"version": version})
        self._check(cancel, step, "download")
        archive = self.store.fetch(
            url,
            key,
            sha256=sha256,
            timeout=self.config.store.download_timeout_s,
            cancelled=cancel.is_set,
            # a package server that goes away (a controller restart) is waited for, keeping
            # the .part, until shortly before the job's in-progress timeout
            deadline=None if deadline is None else deadline - 1.0,
        )
        self._check(cancel, step, "verify")
        if not self._install.acquire(timeout=self.config.job_step_timeout_s):
            raise StoreError("another installation is still running")
        try:
            self._check(cancel, step, "verify")
            # Verified, loaded and health-checked in staging: the idle slot (the rollback
            # target) is replaced only by a package that passed all of it.
            staged = self.store.unpack(archive, key)
            try:
                man = staged.manifest
                if version and man.version != version:
                    raise _Rejected(
                        f"verify: package is version {man.version}, the job says {version}"
                    )
                if model and man.name != model:
                    raise _Rejected(f"verify: package is model {man.name}, the job says {model}")
                self._check(cancel, step, "load")
                backend = load_model(staged)
                try:
                    self._check(cancel, step, "health_check")
                    figures = health_check(backend, staged)
                    self._check(cancel, step, "activate")
                    slot = self.store.idle_slot()
                    pkg = self.store.promote(staged, slot)
                    self._activate(slot, pkg, backend)
                except BaseException:
                    backend.close()
                    raise
            finally:
                self.store.discard(staged)
        finally:
            self._install.release()
        self.store.cleanup_downloads()
        return JobOutcome(
            ExecutionState.SUCCEEDED,
            "",
            {"model": man.name, "version": man.version, "slot": slot, "health": figures},
        )

    def _rollback(self, version: Any, cancel: threading.Event, step: list[str]) -> JobOutcome:
        self._check(cancel, step, "rollback")
        p = self.store.pointer()
        if p is None or p.previous is None:
            raise StoreError("there is no previous version on this device")  # step: rollback
        pkg = self.store.verify_slot(p.previous)
        if version is not None and pkg.manifest.version != str(version):
            raise _Rejected(
                f"rollback: the previous version is {pkg.manifest.version}, the job asks for "
                f"{version}"
            )
        backend = load_model(pkg)
        try:
            self._check(cancel, step, "health_check")
            health_check(backend, pkg)
            self._check(cancel, step, "activate")
            self._activate(p.previous, pkg, backend)
        except BaseException:
            backend.close()
            raise
        return JobOutcome(
            ExecutionState.SUCCEEDED,
            "",
            {"version": pkg.manifest.version, "slot": p.previous, "from": p.version},
        )

    def _apply_policy(self, doc: Mapping[str, Any]) -> list[str]:
        """Apply ``mode``/``threshold``; returns the keys this agent does not act on."""
        mode = doc.get("mode", self.client.mode.value)
        threshold = doc.get("threshold", self.client.threshold)
        if threshold is None:
            threshold = self.config.policy.threshold
        if mode not in _MODES:
            raise _Rejected(f"policy: 'mode' must be one of {list(_MODES)}, got {mode!r}")
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0.0 <= float(threshold) <= 1.0
        ):
            raise _Rejected(f"policy: 'threshold' must be a number in [0, 1], got {threshold!r}")
        esc = {k: doc[k] for k in (*_ESCALATION_KEYS, *_DRIFT_KEYS) if k in doc}
        try:  # checked whole before anything changes
            drift = self.drift.checked(*(esc.get(k) for k in _DRIFT_KEYS))
            self.client.escalation.configure(
                **{_ESCALATION_KEYS[k]: v for k, v in esc.items() if k in _ESCALATION_KEYS}
            )
        except ConfigError as exc:
            raise _Rejected(f"policy: {exc}") from None
        self.drift.apply(*drift)
        self.client.set_policy(
            mode=str(mode), threshold=None if threshold is None else float(threshold)
        )
        # Survives a restart: the fleet's policy wins over the config file's until changed.
        e, d = self.client.escalation, self.drift
        live = {  # the effective settings, not just this document's keys
            "escalate": e.mode,
            "audit_rate": e.audit_rate,
            "escalation_rate_limit": e.limiter.rate if e.limiter is not None else 0,
            "drift_window": d.window,
            "drift_max_distance": d.max_distance,
            "drift_max_offload_shift": d.max_offload_shift,
        }
        self.queue.set("policy", json.dumps({"mode": mode, "threshold": threshold, **live}))
        return sorted(set(doc) - {"mode", "threshold", *_ESCALATION_KEYS, *_DRIFT_KEYS})

    def _handle_desired(self, desired: DesiredState) -> None:
        """Act on the delta between desired and actual, then report what we run.

        A retained desired state comes again on every reconnect. A model version that was
        reached (or a malformed document) is not acted on again until the controller bumps the
        state's version; one whose deployment failed is tried again, like an AWS IoT device
        would: ``jobs.desired_retries`` more times, after ``desired_retry_delay_s`` growing by
        ``desired_retry_backoff``, on its own or when the state comes again once the delay has
        passed. Meanwhile the reported state carries ``error`` and ``retry``.
        """
        self._handling_desired = True
        try:
            self._act_on_desired(desired)
        finally:
            self._handling_desired = False
        self._publish_reported()

    def _act_on_desired(self, desired: DesiredState) -> None:
        acted = self.queue.get("desired_version")
        self._desired_version = desired.version
        failure = self._desired_failure(desired.version)
        if self._desired_retry is not None and self._desired_retry[0].version != desired.version:
            self._desired_retry = None  # a newer desired state supersedes the pending retry
        error = ""
        ignored: list[str] = []
        retry: dict[str, Any] | None = None
        model = desired.state.get("model")
        policy = desired.state.get("policy")
        try:
            if policy is not None:
                if not isinstance(policy, Mapping):
                    raise _Rejected("desired state: 'policy' must be an object")
                ignored = self._apply_policy(policy)
            if model is not None:
                if not isinstance(model, Mapping):
                    raise _Rejected("desired state: 'model' must be an object")
                want = model.get("version")
                if want == self.active_version:
                    failure = None
                elif failure is not None:
                    error, retry = self._desired_retry_due(desired, failure)
                    if retry is None:  # due now
                        failure, error, retry = self._desired_deploy(desired, model, failure)
                elif acted is None or int(acted) < desired.version:
                    failure, error, retry = self._desired_deploy(desired, model, None)
        except (_Rejected, EdgeCloudError) as exc:
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
        self._desired_note = note
        self.queue.set(
            "desired_report", json.dumps({"desired_version": desired.version, "note": note})
        )

    def _desired_failure(self, version: int) -> dict[str, Any] | None:
        """The journaled failure of desired state ``version`` (survives a restart), if any."""
        raw = self.queue.get("desired_failure")
        try:
            d = json.loads(raw) if raw else None
        except ValueError:
            return None
        return d if isinstance(d, dict) and d.get("version") == version else None

    def _desired_retry_due(
        self, desired: DesiredState, failure: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any] | None]:
        """(error, retry info) while a failed desired state waits; retry None when due now."""
        error = str(failure.get("error", ""))
        attempts = int(failure.get("attempts", 1))
        total = self.config.desired_retries + 1
        if attempts >= total:
            return error, {"attempts": attempts, "max_attempts": total, "gave_up": True}
        wait = float(failure.get("next_at", 0.0)) - time.time()
        if wait <= 0:
            return error, None
        self._desired_retry = (desired, time.monotonic() + wait)
        return error, {"attempts": attempts, "max_attempts": total, "next_in_s": round(wait, 3)}

    def _desired_deploy(
        self,
        desired: DesiredState,
        model: Mapping[str, Any],
        failure: Mapping[str, Any] | None,
    ) -> tuple[dict[str, Any] | None, str, dict[str, Any] | None]:
        """One attempt at the desired model; returns (failure record, error, retry info)."""
        want = model.get("version")
        url = model.get("package_url")
        if not isinstance(url, str) or not isinstance(want, str):
            raise _Rejected("desired state: model needs string 'version' and 'package_url'")
        key = f"shadow-{desired.version}:{url}"
        outcome = self._run_watched(
            lambda cancel, step: self._deploy(
                url,
                model.get("sha256"),
                want,
                model.get("name"),
                key,
                cancel,
                step,
            ),
            self.config.job_step_timeout_s,
        )
        self.store.discard_download(key)
        if outcome.status == ExecutionState.SUCCEEDED:
            self._desired_retry = None
            return None, "", None
        error = f"{outcome.status.value}: {outcome.reason}"
        attempts = int(failure.get("attempts", 0)) + 1 if failure else 1
        total = self.config.desired_retries + 1
        record: dict[str, Any] = {"version": desired.version, "attempts": attempts, "error": error}
        if attempts >= total:
            retry: dict[str, Any] = {"attempts": attempts, "max_attempts": total, "gave_up": True}
        else:
            c = self.config
            delay = c.desired_retry_delay_s * c.desired_retry_backoff ** (attempts - 1)
            record["next_at"] = time.time() + delay
            self._desired_retry = (desired, time.monotonic() + delay)
            retry = {"attempts": attempts, "max_attempts": total, "next_in_s": round(delay, 3)}
        self.queue.set("desired_failure", json.dumps(record))
        return record, error, retry

    def _note_error(self, message: str) -> None:
        log.warning("%s", message)
        self.last_error = message


def _download_key(job: JobNotification, url: str) -> str:
    """One download per (job, package), shared by the job's retries so a retry resumes it."""
    return f"{job.job_id}:{url}"


def _download_done(outcome: JobOutcome) -> bool:
    """Whether a deploy's partial download can go: kept only after a transient failure."""
    return outcome.status != ExecutionState.FAILED or "download" not in outcome.reason


#: Fleet policy keys for the escalation controls -> ``Escalation.configure`` keywords.
_ESCALATION_KEYS = {
    "escalate": "escalate",
    "audit_rate": "audit_rate",
    "escalation_rate_limit": "rate_limit",
}


#: Fleet policy keys for the drift monitor, in ``DriftMonitor.checked``'s order.
_DRIFT_KEYS = ("drift_window", "drift_max_distance", "drift_max_offload_shift")


def _job_id_of(payload: bytes) -> str | None:
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    jid = d.get("job_id") if isinstance(d, dict) else None
    return jid if isinstance(jid, str) else None


def _no_op(*_args: Any) -> None:
    return None


def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    from edgecloud.mqtt import set_tcp_nodelay

    set_tcp_nodelay(sock)


def _system_stats() -> dict[str, Any]:
    """CPU and memory via psutil when installed, else /proc (a device may have neither)."""
    try:
        import psutil

        proc = psutil.Process()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem_percent": psutil.virtual_memory().percent,
            "rss_bytes": proc.memory_info().rss,
        }
    except ImportError:
        pass
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        out["load1"] = float(Path("/proc/loadavg").read_text().split()[0])
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_bytes"] = int(line.split()[1]) * 1024
    out["pid"] = os.getpid()
    return out
