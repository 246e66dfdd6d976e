"""Helpers for the device agent tests: signed packages, agent configs, a controller-side observer.

Packages are real: ``samples/models/digits_edge.onnx`` signed with a fresh Ed25519 key, with a
``warmup.npz`` of real validation inputs and their onnxruntime outputs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecloud.fleet.messages import dumps
from tests.fixtures.agents import start_agent, write_config  # noqa: F401

# The agent tests import these from here; they live in the shared factory.
from tests.fixtures.packages import (  # noqa: F401
    EDGE_ONNX,
    EDGE_VAL,
    Keys,
    ort_outputs,
    val_inputs,
)
from tests.fixtures.packages import agent_package as make_package  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


class TcpGate:
    """A TCP forwarder on loopback that a test can close and open: the device's network link.

    Closed, it refuses new connections and cuts the open ones, so the agent is offline while the
    broker and the test's observer stay up and miss nothing.
    """

    def __init__(self, upstream_port: int) -> None:
        import socket

        self.upstream = upstream_port
        self.open = True
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._srv.getsockname()[1])
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while not self._stop:
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            if not self.open:
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: Any, b: Any) -> None:
        import contextlib
        import socket

        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close_link(self) -> None:
        import contextlib
        import socket

        self.open = False
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def open_link(self) -> None:
        self.open = True

    def stop(self) -> None:
        self._stop = True
        self.close_link()
        self._srv.close()


class Observer:
    """The controller's side of the wire, for tests: records every message under the prefix."""

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str = "edgecloud",
        *,
        session: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``session`` names a persistent MQTT session (kept by the broker while we are away)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=session or f"observer-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.c.on_connect = lambda c, *_: (c.subscribe(f"{prefix}/#", qos=1), self._ready.set())
        self.c.on_message = self._on_message
        self.subscriptions = 0  # SUBACKs received: one per (re)connect
        self.c.on_subscribe = self._on_subscribe
        self.c.reconnect_delay_set(0.1, 0.5)
        if tls is not None:  # (ca, cert, key)
            self.c.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        props = None
        if session is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.c.connect(host, port, clean_start=session is None, properties=props)
        self.c.loop_start()
        assert self._ready.wait(10)
        time.sleep(0.2)

    def _on_subscribe(self, *_a: Any) -> None:
        with self._cond:
            self.subscriptions += 1
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def publish(self, topic: str, payload: Any, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else dumps(payload)
        self.c.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)

    def json_on(self, suffix: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p]

    def wait(self, pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                v = pred()
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what or pred}")
                self._cond.wait(min(left, 0.2))

    def job_states(self, job_id: str) -> list[dict[str, Any]]:
        return self.json_on(f"/jobs/{job_id}/update")

    def wait_job(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        terminal = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"}
        return self.wait(  # type: ignore[no-any-return]
            lambda: next((u for u in self.job_states(job_id) if u["status"] in terminal), None),
            timeout,
            f"job {job_id} to finish",
        )

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def send_job(obs: Observer, device: str, job_id: str, operation: str, **document: Any) -> None:
    obs.publish(
        f"edgecloud/devices/{device}/jobs/notify",
        {
            "job_id": job_id,
            "operation": operation,
            "document": document,
            "execution_number": 1,
            "timeout_s": 120,
        },
    )
