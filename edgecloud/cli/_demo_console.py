"""The demo's fleet console: a real controller, and the demo's device reporting to it.

``edgecloud demo`` answers its digits through one client on this machine, the device. When
Mosquitto is installed, the demo also runs ``edgecloud fleet serve`` (its own process, so it
takes no CPU time from the demo's requests) with a broker of its own on loopback, and the
device publishes what a device agent publishes: a retained
online status (with an offline last will), its reported state, and a heartbeat every second
with the agent's telemetry (``device_agent.serving.Metrics``: requests, routes, latency,
confidence, each region's attempts, failures, breaker and latency). Opening the console while
the demo runs shows the device and its routing change phase by phase: edge only, cloud only,
hybrid, the near region stopped, both stopped.

Nothing here may fail the demo: the caller treats any error as "no console" and goes on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from edgecloud.fleet.messages import ReportedState, StatusMessage, TelemetryRecord, dumps
from edgecloud.topics import Topics

__all__ = ["DemoConsole"]


class DemoConsole:
    """Reports one demo device to the controller at ``controller_url`` (``fleet serve``)."""

    def __init__(
        self,
        broker_url: str,
        controller_url: str,
        *,
        device_id: str = "demo-device",
        group: str = "demo",
        interval_s: float = 1.0,
    ) -> None:
        self.device_id = device_id
        self.group = group
        self.interval_s = interval_s
        self.topics = Topics("edgecloud")
        self.broker_url = broker_url
        self.controller_url = controller_url.rstrip("/")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mqtt: Any = None
        self._client: Any = None
        self._seq = 0
        self._model = ("", "")

    @property
    def url(self) -> str:
        return f"{self.controller_url}/console/"

    @property
    def sent(self) -> int:
        """Heartbeats published so far."""
        return self._seq

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the controller answers and holds its broker (``EdgeCloudError`` if not)."""
        import httpx

        from edgecloud.errors import EdgeCloudError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = httpx.get(f"{self.controller_url}/api/health", timeout=1.0)
                if r.status_code == 200 and r.json().get("connected"):
                    return
            time.sleep(0.1)
        raise EdgeCloudError(f"the fleet controller at {self.controller_url} was not ready")

    def attach(self, client: Any, model: str, version: str) -> None:
        """Start reporting for ``client`` (an ``AgentClient``: its metrics are the telemetry)."""
        from edgecloud.mqtt import MqttConnection, parse_broker_url

        self._client = client
        self._model = (model, version)
        self._mqtt = MqttConnection(
            parse_broker_url(self.broker_url, keepalive=10),
            client_id=self.device_id,
            will=(self.topics.status(self.device_id), self._status(False), 1, True),
        ).start(timeout=10.0)
        self._publish(self.topics.status(self.device_id), self._status(True), retain=True)
        reported = ReportedState(
            version=1,
            state={
                "model": {"name": model, "version": version},
                "policy": {"mode": str(client.mode.value), "threshold": client.threshold},
            },
            ts=time.time(),
        )
        self._publish(self.topics.shadow_reported(self.device_id), dumps(reported), retain=True)
        self._thread = threading.Thread(target=self._loop, name="demo-telemetry", daemon=True)
        self._thread.start()

    def _status(self, online: bool) -> bytes:
        from edgecloud import __version__

        return dumps(
            StatusMessage(
                device_id=self.device_id,
                online=online,
                ts=time.time(),
                group=self.group,
                model_version=self._model[1],
                agent_version=f"{__version__} (demo)",
                labels={"site": "this machine"},
            )
        )

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self._mqtt is not None:
            self._mqtt.publish(topic, payload, qos=1, retain=retain, queue_when_down=True)

    def heartbeat(self) -> None:
        """One telemetry record now, in the agent's format."""
        if self._client is None:
            return
        data = self._client.metrics.snapshot()
        data.update(model=self._model[0], model_version=self._model[1])
        rec = TelemetryRecord(self.device_id, self._seq, time.time(), "heartbeat", data)
        self._seq += 1
        self._publish(self.topics.telemetry(self.device_id), dumps(rec))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):  # a heartbeat must never fail the demo
                self.heartbeat()

    def wait_seen(self, records: int, timeout: float = 5.0) -> bool:
        """True once the controller has ``records`` heartbeats from the device."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = httpx.get(f"{self.controller_url}/api/devices/{self.device_id}", timeout=1.0)
                if r.status_code == 200 and r.json()["counters"].get("telemetry", 0) >= records:
                    return True
            time.sleep(0.1)
        return False

    def snapshot(self) -> dict[str, Any]:
        """What the console shows now, through the same API calls it makes (for the report)."""
        import httpx

        with httpx.Client(base_url=self.controller_url, timeout=5.0) as c:
            devices = c.get("/api/devices").json()
            routing = c.get("/api/routing", params={"window": 120}).json()
        return {"url": self.url, "devices": devices, "routing": routing["groups"]}

    def close(self) -> None:
        """Stop reporting; the device says it goes offline (its will would say it anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._mqtt is not None:
            acked = threading.Event()
            with contextlib.suppress(Exception):
                self._mqtt.publish(
                    self.topics.status(self.device_id),
                    self._status(False),
                    retain=True,
                    on_ack=lambda _rc: acked.set(),
                )
                acked.wait(2)
            self._mqtt.close(wait=2.0)
