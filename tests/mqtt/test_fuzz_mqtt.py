"""Hostile input against the region's MQTT workers, over a real Mosquitto, and per-sender dedup.

The seeded mix of ``tests/fixtures/hostile.py`` goes out as MQTT 5 requests with hostile
properties too (bad header lengths and deadlines, a deadline in seconds, no model, device ids
that break the naming rule, oversized payloads, too many rows). Every request that names its
sender's own reply topic gets exactly one reply, never a 5xx, every error a V2 error body; the
ones that cannot be answered safely (no reply topic, someone else's) get none. Afterwards a
valid request is answered as before and the worker process's memory is within 50 MiB.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.cloud.mqtt_worker import MqttWorker, _SeenIds, echo_handler
from edgecloud.mqtt import (
    MqttConnection,
    parse_broker_url,
    publish_properties,
    user_properties,
)
from edgecloud.topics import Topics
from edgecloud.transport.mqtt import MqttTransport
from edgecloud.transport.v2 import HEADER_LENGTH, InferRequest
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.hostile import hostile_v2_body, rss_mib
from tests.fixtures.servers import make_repository
from tests.fixtures.wait import poll_until

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("EDGECLOUD_FUZZ_SEED", "11"))
MODEL = "digits_cloud"


class RawDevice:
    """A bare MQTT 5 client publishing as device ``device`` and collecting its replies."""

    def __init__(self, broker: MosquittoBroker, device: str, *, reply_topic: str | None = None):
        self.topics = Topics()
        self.device = device
        self.reply_topic = reply_topic or f"edgecloud/devices/{device}/infer/reply"
        self.replies: dict[bytes, list[tuple[bytes, dict[str, str], int]]] = {}
        self.lock = threading.Lock()
        self.conn = MqttConnection(
            parse_broker_url(broker.url),
            client_id=f"raw-{uuid.uuid4().hex[:8]}",
            on_message=self._on,
        ).start(5)
        self.conn.subscribe(self.reply_topic, 1)

    def _on(self, msg: Any) -> None:
        corr = bytes(getattr(msg.properties, "CorrelationData", b"") or b"")
        with self.lock:
            self.replies.setdefault(corr, []).append(
                (bytes(msg.payload), user_properties(msg.properties), int(msg.qos))
            )

    def send(
        self,
        region: str,
        payload: bytes,
        *,
        user: list[tuple[str, str]] | None = None,
        corr: bytes | None = None,
        response_topic: str | None = "own",
        qos: int = 1,
        topic: str | None = None,
    ) -> bytes:
        props = publish_properties()
        if response_topic == "own":
            response_topic = self.reply_topic
        if response_topic:
            props.ResponseTopic = response_topic
        corr = corr or uuid.uuid4().bytes
        props.CorrelationData = corr
        props.UserProperty = user if user is not None else [("model", MODEL)]
        self.conn.publish(
            topic or f"edgecloud/devices/{self.device}/infer/{region}/request",
            payload,
            qos=qos,
            properties=props,
        )
        return corr

    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.replies.values())

    def close(self) -> None:
        self.conn.close()


def _now_ms(offset_s: float = 10.0) -> str:
    return str(int((time.time() + offset_s) * 1000))


def _hostile_properties(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    base = [("model", MODEL), ("deadline-ms", _now_ms())]
    choices = [
        ("hl-superscript", [*base, (HEADER_LENGTH, "²")]),
        ("hl-5000-digits", [*base, (HEADER_LENGTH, "9" * 5000)]),
        ("hl-negative", [*base, (HEADER_LENGTH, "-1")]),
        ("deadline-words", [("model", MODEL), ("deadline-ms", "soon")]),
        ("deadline-seconds", [("model", MODEL), ("deadline-ms", str(int(time.time()) + 30))]),
        ("deadline-negative", [("model", MODEL), ("deadline-ms", "-5")]),
        ("deadline-5000-digits", [("model", MODEL), ("deadline-ms", "9" * 5000)]),
        ("threshold-words", [*base, ("binary-threshold", "big")]),
        ("no-model", [("deadline-ms", _now_ms())]),
        ("model-unknown", [("model", "nope"), ("deadline-ms", _now_ms())]),
        ("model-weird", [("model", "../../etc"), ("deadline-ms", _now_ms())]),
    ]
    return rng.choice(choices)


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


@pytest.fixture(scope="module")
def worker_proc(
    broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[str]]:
    repo = make_repository(
        tmp_path_factory.mktemp("mqfuzz"), {MODEL: ROOT / "samples/models/digits_cloud.onnx"}
    )
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "edgecloud", "cloud", "mqtt-workers", "--mqtt", broker.url),
            *("--region", "fz", "--repository", str(repo), "--max-request-bytes", str(1 << 20)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.terminate()
    try:
        proc.wait(15)
    finally:
        proc.stdout.close()


def _x() -> np.ndarray:
    return np.load(ROOT / "samples/data/cloud_val.npz")["input"][:2].astype(np.float32)


@pytest.mark.slow
def test_mqtt_workers_survive_a_seeded_hostile_mix(
    broker: MosquittoBroker, worker_proc: subprocess.Popen[str]
) -> None:
    x = _x()
    with MqttTransport(broker.url, region="fz", device_id="dev-ok") as t:
        for _ in range(20):
            t.infer(InferRequest(MODEL, {"input": x}), timeout=10)
        before_answer = t.infer(InferRequest(MODEL, {"input": x}), timeout=10).outputs["logits"]
    before = rss_mib(worker_proc.pid)
    rng = random.Random(SEED + 3)
    dev = RawDevice(broker, "dev-fz")
    bad_id = RawDevice(broker, "bad id!", reply_topic="edgecloud/devices/bad id!/infer/reply")
    answered: dict[bytes, str] = {}  # corr -> kind, for requests that must get one reply
    silent: list[bytes] = []
    try:
        for i in range(1500):
            r = rng.random()
            if r < 0.7:
                kind, body, _ = hostile_v2_body(rng, "input", [1, 8, 8])
                corr = dev.send("fz", body, user=[("model", MODEL), ("deadline-ms", _now_ms())])
            elif r < 0.85:
                kind, props = _hostile_properties(rng)
                _, body, _ = hostile_v2_body(rng, "input", [1, 8, 8])
                corr = dev.send("fz", body, user=props)
            elif r < 0.9:
                kind = "oversized"
                corr = dev.send("fz", b'{"inputs":[' + b" " * (1 << 20) + b"]}")
            elif r < 0.93:
                kind = "bad-device-id"
                corr = bad_id.send("fz", b'{"inputs": []}')
            elif r < 0.96:
                kind = "qos0"
                corr = dev.send("fz", b'{"inputs": []}', qos=0)
            elif r < 0.98:
                silent.append(dev.send("fz", b"{}", response_topic=None))
                continue
            else:
                silent.append(
                    dev.send("fz", b"{}", response_topic="edgecloud/devices/x/infer/reply")
                )
                continue
            answered[corr] = f"#{i} {kind}"
            if i % 100 == 99:  # keep the worker's queue from overflowing (that is a 503 test)
                poll_until(lambda: dev.count() + bad_id.count() >= len(answered) - 50, 30)
        assert poll_until(lambda: dev.count() + bad_id.count() >= len(answered), 60), (
            f"{len(answered) - dev.count() - bad_id.count()} requests unanswered"
        )
        time.sleep(0.5)
        replies = {**dev.replies, **bad_id.replies}
        statuses: dict[str, int] = {}
        for corr, kind in answered.items():
            got = replies.get(corr, [])
            assert len(got) == 1, f"seed {SEED} {kind}: {len(got)} replies"
            payload, props, qos = got[0]
            status = int(props["status"])
            statuses[props["status"]] = statuses.get(props["status"], 0) + 1
            assert status < 500, f"seed {SEED} {kind}: {status} {payload[:200]!r}"
            if "qos0" in kind:
                assert qos == 0, kind  # the reply has the request's QoS
            if status != 200:
                err = json.loads(payload)
                assert isinstance(err["error"], str), kind
        for corr in silent:
            assert corr not in replies
        print(f"mqtt worker: {len(answered)} answered {statuses}, {len(silent)} dropped")
        assert statuses.get("413", 0) > 10, statuses
        assert statuses.get("200", 0) > 50, statuses
    finally:
        dev.close()
        bad_id.close()
    assert worker_proc.poll() is None
    with MqttTransport(broker.url, region="fz", device_id="dev-ok") as t:
        after_answer = t.infer(InferRequest(MODEL, {"input": x}), timeout=10).outputs["logits"]
    np.testing.assert_array_equal(after_answer, before_answer)
    print(f"mqtt worker: RSS {before:.0f} -> {rss_mib(worker_proc.pid):.0f} MiB")
    assert poll_until(lambda: rss_mib(worker_proc.pid) - before < 50, 5), (
        before,
        rss_mib(worker_proc.pid),
    )


# -- deduplication is per sender and lives only as long as the request's deadline ---------------
@pytest.fixture
def echo(broker: MosquittoBroker) -> Iterator[MqttWorker]:
    w = MqttWorker(echo_handler, broker=broker.url, region=f"dd-{uuid.uuid4().hex[:6]}").start()
    yield w
    w.stop()


BODY = b'{"inputs": [{"name": "a", "datatype": "INT32", "shape": [1], "data": [7]}]}'


def test_two_devices_with_the_same_correlation_data_are_both_answered(
    broker: MosquittoBroker, echo: MqttWorker
) -> None:
    devices = [RawDevice(broker, f"dev-same-{i}") for i in range(3)]
    try:
        corr = b"\x00" * 16
        for d in devices:
            for n in range(3):  # a restarted counter: distinct requests, same bytes each time
                d.send(echo.region, BODY, corr=bytes([n]) + corr[1:])
        assert poll_until(lambda: all(d.count() == 3 for d in devices), 10), [
            d.count() for d in devices
        ]
        assert echo.stats["duplicates"] == 0
        # a true redelivery (same sender, same id, deadline not passed) is still dropped
        devices[0].send(echo.region, BODY, corr=b"redelivered")
        devices[0].send(echo.region, BODY, corr=b"redelivered")
        assert poll_until(lambda: echo.stats["duplicates"] == 1, 5)
    finally:
        for d in devices:
            d.close()


def test_reused_id_after_its_deadline_expired_is_answered(
    broker: MosquittoBroker, echo: MqttWorker
) -> None:
    d = RawDevice(broker, "dev-restart")
    try:
        corr = b"counter-0000001"
        user = [("model", "m"), ("deadline-ms", _now_ms(0.3))]
        d.send(echo.region, BODY, corr=corr, user=user)
        assert poll_until(lambda: d.count() == 1, 5)
        time.sleep(0.3 + echo.clock_skew_ms / 1000 + 0.3)  # the first request's deadline is over
        d.send(echo.region, BODY, corr=corr, user=[("model", "m"), ("deadline-ms", _now_ms(5))])
        assert poll_until(lambda: d.count() == 2, 5), d.replies
        assert echo.stats["duplicates"] == 0
    finally:
        d.close()


def test_binary_data_output_is_honoured_over_mqtt(
    broker: MosquittoBroker, echo: MqttWorker
) -> None:
    d = RawDevice(broker, "dev-bin")
    try:
        body = json.dumps(
            {
                "inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        corr = d.send(echo.region, body, user=[("model", "m")])
        assert poll_until(lambda: d.count() == 1, 5)
        payload, props, _ = d.replies[corr][0]
        assert props["status"] == "200"
        hl = int(props[HEADER_LENGTH])
        assert np.frombuffer(payload[hl:], "<f4").tolist() == [1.5, 2.5]
    finally:
        d.close()


def test_seen_ids_expire_at_the_deadline_and_stay_bounded() -> None:
    now = [100.0]
    seen = _SeenIds(4, clock=lambda: now[0])
    assert not seen.seen("a", b"1", 1.0)
    assert seen.seen("a", b"1", 1.0)
    assert not seen.seen("b", b"1", 1.0)  # another sender, same bytes
    now[0] += 1.5
    assert not seen.seen("a", b"1", 1.0)  # expired: a new request
    for i in range(10):
        seen.seen("c", bytes([i]), 60.0)
    assert len(seen) <= 4
