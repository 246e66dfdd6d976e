"""The device agent: one process that serves the active model and obeys the fleet.

``Agent`` wires parts that each have one job and can be read and tested alone:

- ``network.AgentLink``: the broker session (``edgecloud.mqtt.MqttConnection``: backoff with
  jitter, resubscription, retained online/offline status, slow retries after a refusal).
- ``outbox.Outbox``: the *sender* thread; the durable queue (``queue.py``) published in order,
  at least once, at most ``queue.inflight`` unacknowledged.
- *telemetry*: a heartbeat every ``telemetry.interval_s`` into the outbox with a durable seq
  (``heartbeat`` below; drift and hard-example capture hook into every answer).
- ``jobs.JobRunner`` + ``watchdog``: the *worker* thread runs jobs one at a time from a bounded
  queue, each in its own thread under a timeout, journaled so a job runs once.
- ``deploy.Installer`` over ``store.ModelStore.install``: the install transaction
  (fetch -> unpack + verify -> load -> health check -> promote -> activate, or nothing).
- ``desired.DesiredStates``: the fleet's desired state, with tenacity-paced retries.
- ``policy.apply_policy``: routing, escalation and drift settings from the fleet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import paho.mqtt.client as paho

from device_agent.capture import HardExampleStore
from device_agent.config import AgentConfig
from device_agent.deploy import Installer
from device_agent.desired import DesiredRetries, DesiredStates
from device_agent.drift import DriftMonitor
from device_agent.jobs import JobRunner
from device_agent.network import AgentLink
from device_agent.outbox import Outbox
from device_agent.policy import apply_policy
from device_agent.queue import DurableQueue
from device_agent.records import Records
from device_agent.server import LocalEndpoint
from device_agent.serving import AgentClient, InferOutcome, Metrics
from device_agent.store import ModelStore
from device_agent.telemetry import Ticker, hard_example_hook, system_stats
from device_agent.watchdog import JobOutcome, Progress, run_watched
from edgecloud.errors import (
    ConfigError,
    ConnectionFailed,
    EdgeCloudError,
    FleetError,
    PackageError,
)
from edgecloud.fleet.messages import (
    DesiredState,
    ExecutionState,
    JobCancel,
    JobNotification,
    StatusMessage,
    dumps,
)
from edgecloud.package import load_public_key

__all__ = ["Agent", "JobOutcome"]

log = logging.getLogger("device_agent")

try:
    from edgecloud import __version__ as AGENT_VERSION
except ImportError:  # pragma: no cover
    AGENT_VERSION = "0"


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
            upstream_fp16=pol.upstream_fp16,
            upstream_int8=pol.upstream_int8,
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
            self.client.on_answer.append(hard_example_hook(self.capture))
        #: Confidence/offload drift vs the manifest's reference (device_agent/drift.py).
        self.drift = DriftMonitor()
        self.client.on_answer.append(self._observe_drift)
        self.endpoint: LocalEndpoint | None = None
        self._endpoint_port = endpoint_port
        self._stop = threading.Event()
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=64)
        self._threads: list[threading.Thread] = []
        self.link: AgentLink | None = None
        self.malformed = 0
        self.last_error = ""
        self._started = time.time()
        # The identity epoch of this store: new when the store is new (a re-provisioned device
        # starts a new telemetry and reported-state sequence that the controller tells apart).
        self.epoch = self.queue.get("identity_epoch") or ""
        if not self.epoch:
            self.epoch = f"{time.time_ns():020d}-{os.urandom(4).hex()}"
            self.queue.set("identity_epoch", self.epoch)
        self._handling_desired = False
        self.outbox = Outbox(
            self.queue,
            self._publish_row,
            connected=lambda: self.connected,
            window=config.queue.inflight,
            on_refused=self._note_error,
        )
        self.records = Records(
            self.queue,
            self.topics,
            self.device_id,
            self.epoch,
            wake=self.outbox.wake,
            note_error=self._note_error,
        )
        self.installer = Installer(
            self.store,
            self.client,
            announce=self._announce,
            download_timeout_s=config.store.download_timeout_s,
            lock_timeout_s=config.job_step_timeout_s,
            retire_after_s=config.endpoint.timeout_s * 2,
        )
        self.jobs = JobRunner(
            self.queue,
            self.installer,
            report=self.records.job_update,
            run_policy=self._run_policy,
            metrics=self.metrics,
            step_timeout_s=config.job_step_timeout_s,
            stopping=self._stop.is_set,
        )
        self.desired = DesiredStates(
            self.queue,
            DesiredRetries(
                config.desired_retries, config.desired_retry_delay_s, config.desired_retry_backoff
            ),
            deploy=self._desired_deploy,
            apply_policy=self._apply_policy,
            active_version=lambda: self.active_version,
            discard_download=self.store.discard_download,
            note_error=self._note_error,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Agent:
        saved = self.queue.get("policy")
        if saved:
            with contextlib.suppress(ValueError, EdgeCloudError):
                self._apply_policy(json.loads(saved))
        self.installer.load_active(self._note_error)
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
        self.link = AgentLink(
            self.config,
            status=self._status,
            on_message=self._on_message,
            on_connect=self.outbox.restart,
            on_ready=self.outbox.wake,
            on_error=self._note_error,
        )
        self._publish_reported()  # what this start serves, whatever was reported before
        self.jobs.report_interrupted()
        self.outbox.start()
        for t in (
            Ticker(
                "agent-telemetry",
                self.config.telemetry_interval_s,
                self.heartbeat,
                stop=self._stop,
                on_error=lambda exc: self._note_error(f"telemetry: {exc}"),
            ),
            threading.Thread(target=self._worker_loop, name="agent-worker", daemon=True),
        ):
            t.start()
            self._threads.append(t)
        self.link.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cleanly: mark the device offline (retained), disconnect, close everything."""
        if self._stop.is_set():
            return
        if self.link is not None:
            self.link.stop(min(timeout, 2.0))
        self._stop.set()
        self.outbox.stop(timeout)
        for t in self._threads:
            t.join(timeout=timeout)
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
        return self.link is not None and self.link.connected

    @property
    def connects(self) -> int:
        """Connections to the broker so far (each one re-announces the device)."""
        return self.link.connects if self.link is not None else 0

    def infer(self, inputs: Mapping[str, Any]) -> InferOutcome:
        """Answer one request with the active model (and the cloud, as the policy says)."""
        return self.client.answer(inputs)

    @property
    def active_version(self) -> str:
        m = self.client.manifest
        return m.version if m is not None else ""

    # -- model loading -----------------------------------------------------------------------
    def _announce(self) -> None:
        """After an activation: the status says the new version; so does the reported state
        (unless a desired state is being handled: that handler reports once, with its outcome)."""
        if self.link is not None:
            self.link.publish_status()
        if not self._handling_desired:
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
            **self.desired.note,
        }
        self.records.reported(state, self.desired.version)

    # -- messages from the broker (the link's loop thread: enqueue only) -----------------------
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        topic, payload = msg.topic, bytes(msg.payload)
        try:
            if topic == self.topics.jobs_notify(self.device_id):
                self._accept_job(payload)
            elif topic == self.topics.jobs_cancel(self.device_id):
                self.jobs.cancel(JobCancel.parse(payload))
            elif topic == self.topics.shadow_desired(self.device_id):
                if not payload:
                    return  # a cleared retained desired state
                self._enqueue(("desired", DesiredState.parse(payload)))
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
                self.records.job_update(job_id, 1, ExecutionState.REJECTED, str(exc))
            raise
        self._enqueue(("job", job))

    def _enqueue(self, item: tuple[str, Any]) -> None:
        try:
            self._work.put_nowait(item)
        except queue.Full:
            if item[0] == "job":
                job: JobNotification = item[1]
                self.records.job_update(
                    job.job_id,
                    job.execution_number,
                    ExecutionState.REJECTED,
                    "agent busy: too many pending jobs",
                )
            else:
                self._note_error("agent busy: desired state change dropped")

    def _publish_row(self, topic: str, payload: bytes, **kw: Any) -> int:
        if self.link is None:
            raise ConnectionFailed("the agent is not started")
        return self.link.publish(topic, payload, **kw)

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

    # -- telemetry ---------------------------------------------------------------------------
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
            system=system_stats(),
        )
        if self.capture is not None:
            data["hard_examples"] = len(self.capture.list())
        data.update(escalation=self.client.escalation.stats(), drift=self.drift.report())
        return self.records.telemetry("heartbeat", data)

    def _observe_drift(self, _inputs: Mapping[str, Any], outcome: InferOutcome) -> None:
        reason = str(outcome.result.reason)
        offloaded = outcome.route != "edge" or reason in ("background", "rate_limited")
        try:
            v = self.client.metrics.variant  # the variant loaded: its own reference
            alarm = self.drift.observe(
                self.client.manifest, outcome.edge_outputs, offloaded, v["name"] if v else None
            )
            if alarm is not None:  # published at once: the fleet shows it as kind "drift"
                self.records.telemetry("drift", alarm)
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

    # -- the worker: jobs and desired states, one at a time ------------------------------------
    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            item: Any = self.desired.due()
            kind = "desired"
            if item is None:
                try:
                    kind, item = self._work.get(timeout=0.2)
                except queue.Empty:
                    continue
            try:
                if kind == "job":
                    self.jobs.handle(item)
                else:
                    self._handle_desired(item)
            except Exception as exc:  # the worker must survive anything one job does
                log.exception("job handling failed")
                self._note_error(f"{kind}: {type(exc).__name__}: {exc}")

    def _handle_desired(self, desired: DesiredState) -> None:
        """Act on the delta between desired and actual, then report what we run (once)."""
        self._handling_desired = True
        try:
            self.desired.handle(desired)
        finally:
            self._handling_desired = False
        self._publish_reported()

    def _desired_deploy(
        self, desired: DesiredState, model: Mapping[str, Any], key: str
    ) -> JobOutcome:
        progress = Progress(stopping=self._stop.is_set)
        url = str(model.get("package_url"))
        source = self.installer.source(url, key, model, progress, model_field="name")
        return run_watched(
            lambda p: self.installer.deploy(source, p), self.config.job_step_timeout_s, progress
        )

    def _run_policy(self, doc: Mapping[str, Any]) -> JobOutcome:
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

    def _apply_policy(self, doc: Mapping[str, Any]) -> list[str]:
        """Apply ``mode``/``threshold``; returns the keys this agent does not act on."""
        return apply_policy(
            doc,
            client=self.client,
            drift=self.drift,
            queue=self.queue,
            default_threshold=self.config.policy.threshold,
        )

    def _note_error(self, message: str) -> None:
        log.warning("%s", message)
        self.last_error = message


def _job_id_of(payload: bytes) -> str | None:
    try:
        d = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    jid = d.get("job_id") if isinstance(d, dict) else None
    return jid if isinstance(jid, str) else None
