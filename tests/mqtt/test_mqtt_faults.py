"""Faults: broker restart mid-run, a worker process killed, 1,100 connections in one process."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.cloud.mqtt_worker import MqttWorker, echo_handler
from edgecloud.errors import ConnectionFailed, TransportError
from edgecloud.mqtt import (
    Backoff,
    MqttConnection,
    SelectorLoop,
    parse_broker_url,
    publish_properties,
    user_properties,
)
from edgecloud.topics import Topics
from edgecloud.transport.mqtt import MqttTransport
from edgecloud.transport.v2 import InferRequest, InferResponse

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]
X = InferRequest(model="m", inputs={"x": np.arange(4, dtype=np.float32)})


def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def test_broker_restart_fail_fast_then_recover(mosquitto: Any) -> None:
    gate = threading.Event()

    def slow_echo(req: InferRequest) -> InferResponse:
        if req.model == "slow":
            gate.wait(10)
        return echo_handler(req)

    w = MqttWorker(slow_echo, broker=mosquitto.url, region="eu").start()
    t = MqttTransport(mosquitto.url, region="eu", device_id="dev-r")
    try:
        assert t.infer(X, timeout=5).outputs["x"].tolist() == [0, 1, 2, 3]
        # a request in flight when the broker goes away fails fast, not after its 10 s timeout
        errors: list[BaseException] = []

        def in_flight() -> None:
            try:
                t.infer(InferRequest(model="slow", inputs=X.inputs), timeout=10)
            except TransportError as exc:
                errors.append(exc)

        th = threading.Thread(target=in_flight)
        th.start()
        time.sleep(0.2)
        start = time.monotonic()
        mosquitto.stop()
        th.join(5)
        assert errors, "the in-flight request did not fail"
        assert isinstance(errors[0], ConnectionFailed)
        assert time.monotonic() - start < 2.0
        assert errors[0].region == "eu"
        # during the outage: fail fast
        start = time.monotonic()
        with pytest.raises(ConnectionFailed):
            t.infer(X, timeout=5)
        assert time.monotonic() - start < 0.2
        assert t.ready(timeout=0.1) is False
        gate.set()
        time.sleep(0.5)  # let both sides back off a little
        mosquitto.start()
        # both sides reconnect (backoff capped) and resubscribe; later requests succeed
        assert _wait(lambda: t.connection.connected and w.connected, 15)
        assert _wait(lambda: _try(t), 5)
        assert t.infer(X, timeout=5).outputs["x"].tolist() == [0, 1, 2, 3]
    finally:
        gate.set()
        t.close()
        w.stop()


def _try(t: MqttTransport) -> bool:
    try:
        t.infer(X, timeout=1)
        return True
    except TransportError:
        return False


def _spawn_worker(url: str, region: str, *source: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgecloud",
            "cloud",
            "mqtt-workers",
            "--mqtt",
            url,
            "--region",
            region,
            *(source or ("--echo",)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else line
    return proc


class _Requester:
    """Sends raw requests and records which worker answered (the ``worker`` user property)."""

    def __init__(self, url: str, device: str) -> None:
        self.topics = Topics()
        self.device = device
        self.answers: dict[bytes, str] = {}
        self.conn = MqttConnection(
            parse_broker_url(url), client_id=f"req-{uuid.uuid4().hex[:6]}", on_message=self._on
        ).start(5)
        self.conn.subscribe(self.topics.infer_reply(device), 1)

    def _on(self, msg: Any) -> None:
        corr = bytes(msg.properties.CorrelationData)
        self.answers[corr] = user_properties(msg.properties).get("worker", "?")

    def send(self, region: str) -> bytes:
        props = publish_properties()
        props.ResponseTopic = self.topics.infer_reply(self.device)
        corr = uuid.uuid4().bytes
        props.CorrelationData = corr
        props.UserProperty = [("model", "m")]
        body = b'{"inputs":[{"name":"x","datatype":"INT32","shape":[1],"data":[1]}]}'
        self.conn.publish(self.topics.infer_request(self.device, region), body, properties=props)
        return corr


def test_killed_worker_share_taken_by_the_others(mosquitto: Any) -> None:
    procs = [_spawn_worker(mosquitto.url, "kill") for _ in range(3)]
    req = _Requester(mosquitto.url, "dev-k")
    try:
        sent = [req.send("kill") for _ in range(60)]
        assert _wait(lambda: all(c in req.answers for c in sent), 10)
        before = Counter(req.answers[c] for c in sent)
        assert len(before) == 3, before  # the share group spreads the load over all three
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(5)
        time.sleep(0.3)
        sent2 = [req.send("kill") for _ in range(60)]
        assert _wait(lambda: all(c in req.answers for c in sent2), 10), (
            f"{sum(c in req.answers for c in sent2)}/60 answered after the kill"
        )
        after = Counter(req.answers[c] for c in sent2)
        assert len(after) == 2, after
        assert set(after) < set(before)
    finally:
        req.conn.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(5)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()


@pytest.mark.slow
def test_selector_loop_drives_1100_clients_past_fd_1024(mosquitto: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    n = 1100
    loop = SelectorLoop(name="test-1100")
    got: Counter[str] = Counter()
    lock = threading.Lock()

    def on_message(msg: Any) -> None:
        with lock:
            got[msg.topic] += 1

    settings = parse_broker_url(mosquitto.url)
    conns: list[MqttConnection] = []
    try:
        for i in range(n):
            c = MqttConnection(
                settings,
                client_id=f"agent-{i}",
                on_message=on_message,
                subscriptions=[(f"fleet/agent-{i}/cmd", 1)],
                loop=loop,
                backoff=Backoff(0.05, 1.0),
            )
            conns.append(c.start(wait=False))
        assert _wait(lambda: all(c.connected for c in conns), 60), (
            f"{sum(c.connected for c in conns)}/{n} connected"
        )
        fds = [c.client.socket().fileno() for c in conns]  # type: ignore[union-attr]
        assert max(fds) > 1024  # select() could not have handled these
        assert loop.clients == n
        time.sleep(0.5)  # last SUBACKs
        pub = conns[0]
        for i in range(n):
            pub.publish(f"fleet/agent-{i}/cmd", b"go", qos=1)
        assert _wait(lambda: sum(got.values()) >= n, 30), f"{sum(got.values())}/{n} delivered"
        assert set(got) == {f"fleet/agent-{i}/cmd" for i in range(n)}
        # a broker restart: every client comes back on its own, with jittered backoff
        mosquitto.restart()
        assert _wait(lambda: all(c.connected for c in conns), 60), (
            f"{sum(c.connected for c in conns)}/{n} reconnected"
        )
    finally:
        for c in conns:
            c.close()
        _wait(lambda: loop.clients == 0, 10)
        loop.stop()


def test_forked_child_gets_its_own_loop_and_connection(mosquitto: Any) -> None:
    w = MqttWorker(echo_handler, broker=mosquitto.url, region="fork").start()
    t = MqttTransport(mosquitto.url, region="fork", device_id="dev-f")
    try:
        assert t.infer(X, timeout=5).outputs["x"].tolist() == [0, 1, 2, 3]
        pid = os.fork()
        if pid == 0:  # child: a new transport must work without the parent's loop thread
            code = 1
            try:
                with MqttTransport(mosquitto.url, region="fork", device_id="dev-f") as tc:
                    ok = tc.infer(X, timeout=5).outputs["x"].tolist() == [0, 1, 2, 3]
                    code = 0 if ok and tc.connection is not t.connection else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert t.infer(X, timeout=5).outputs["x"].tolist() == [0, 1, 2, 3]  # parent unharmed
    finally:
        t.close()
        w.stop()


def test_standalone_worker_process_serves_a_model_repository(
    mosquitto: Any, tmp_path: Path
) -> None:
    import shutil

    (tmp_path / "digits_cloud" / "1").mkdir(parents=True)
    shutil.copy(ROOT / "samples/models/digits_cloud.onnx", tmp_path / "digits_cloud/1/model.onnx")
    proc = _spawn_worker(
        mosquitto.url, "solo", "--repository", str(tmp_path), "--mqtt-workers", "2"
    )
    d = np.load(ROOT / "samples/data/cloud_val.npz")
    try:
        with MqttTransport(mosquitto.url, region="solo", device_id="dev-s") as t:
            r = t.infer(InferRequest("digits_cloud", {"input": d["input"][:32]}), timeout=10)
        assert (r.outputs["logits"].argmax(1) == d["labels"][:32]).mean() >= 0.9
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0  # SIGTERM stops it cleanly
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
