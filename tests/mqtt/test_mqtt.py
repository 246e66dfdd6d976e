"""MQTT transport and workers against a real Mosquitto: protocol, codec paths, bad input, bounds."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.cloud.core import ServingCore
from edgecloud.cloud.mqtt_worker import MqttWorker, echo_handler, start_mqtt_workers
from edgecloud.errors import (
    ConfigError,
    ConnectionFailed,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from edgecloud.mqtt import (
    Backoff,
    MqttConnection,
    parse_broker_url,
    publish_properties,
    reason_code_error,
    user_properties,
)
from edgecloud.topics import Topics
from edgecloud.transport.mqtt import MqttTransport
from edgecloud.transport.v2 import HEADER_LENGTH, InferRequest, encode_request
from tests.fixtures.broker import MosquittoBroker, free_port

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    (root / "digits_cloud" / "1").mkdir(parents=True)
    shutil.copy(ROOT / "samples/models/digits_cloud.onnx", root / "digits_cloud/1/model.onnx")
    return root


@pytest.fixture(scope="module")
def region(broker: MosquittoBroker, repo: Path) -> Iterator[str]:
    """Region 'eu': a ServingCore on the digits CNN behind two MQTT workers."""
    core = ServingCore(repo, max_batch_size=8, max_queue_delay_ms=1.0)
    pool = start_mqtt_workers(core, broker=broker.url, region="eu", workers=2)
    yield "eu"
    pool.stop()
    core.close()


@pytest.fixture
def echo_worker(broker: MosquittoBroker) -> Iterator[MqttWorker]:
    """An echo worker in its own region (fresh per test so stats start at zero)."""
    w = MqttWorker(echo_handler, broker=broker.url, region=f"echo-{uuid.uuid4().hex[:6]}").start()
    yield w
    w.stop()


class Raw:
    """A bare MQTT 5 client for crafting requests the SDK would never send."""

    def __init__(self, broker: MosquittoBroker, device: str) -> None:
        self.topics = Topics()
        self.device = device
        self.replies: list[tuple[bytes, dict[str, str], bytes | None]] = []
        self.got = threading.Event()
        self.conn = MqttConnection(
            parse_broker_url(broker.url), client_id=f"raw-{device}", on_message=self._on
        ).start(5)
        self.conn.subscribe(self.topics.infer_reply(device), 1)

    def _on(self, msg: Any) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        self.replies.append((bytes(msg.payload), user_properties(msg.properties), corr))
        self.got.set()

    def send(
        self,
        region: str,
        payload: bytes,
        *,
        response_topic: str | None = "own",
        corr: bytes | None = None,
        user: list[tuple[str, str]] | None = None,
    ) -> bytes:
        props = publish_properties()
        if response_topic == "own":
            response_topic = self.topics.infer_reply(self.device)
        if response_topic:
            props.ResponseTopic = response_topic
        corr = corr or uuid.uuid4().bytes
        props.CorrelationData = corr
        props.UserProperty = user if user is not None else [("model", "m")]
        self.conn.publish(self.topics.infer_request(self.device, region), payload, properties=props)
        return corr

    def wait(self, n: int, timeout: float = 3.0) -> list[tuple[bytes, dict[str, str], Any]]:
        deadline = time.monotonic() + timeout
        while len(self.replies) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.replies

    def close(self) -> None:
        self.conn.close()


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(ROOT / "samples/data/cloud_val.npz")
    return d["input"][:n], d["labels"][:n]


# -- happy paths ------------------------------------------------------------------------------
def test_cloud_model_answers_over_mqtt(broker: MosquittoBroker, region: str) -> None:
    x, y = _digits(64)
    with MqttTransport(broker.url, region=region, device_id="dev-1", model="digits_cloud") as t:
        assert t.ready(timeout=5) is True
        r = t.infer(InferRequest(model="digits_edge", inputs={"input": x}), timeout=10)
    assert r.model == "digits_cloud"
    assert r.outputs["logits"].shape == (64, 10)
    assert (r.outputs["logits"].argmax(1) == y).mean() >= 0.95


def test_concurrent_requests_share_one_connection(broker: MosquittoBroker, region: str) -> None:
    x, y = _digits(40)
    t1 = MqttTransport(broker.url, region=region, device_id="dev-2", model="digits_cloud")
    t2 = MqttTransport(broker.url, region=region, device_id="dev-2", model="digits_cloud")
    try:
        assert t1.connection is t2.connection  # process-wide cache: one connection per device
        out: dict[int, int] = {}

        def one(i: int) -> None:
            t = t1 if i % 2 else t2
            r = t.infer(InferRequest(model="x", inputs={"input": x[i : i + 1]}), timeout=10)
            out[i] = int(r.outputs["logits"].argmax())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(15)
        assert len(out) == 40
        assert np.mean([out[i] == y[i] for i in range(40)]) >= 0.9
        assert t1._session.pending == {}
    finally:
        t1.close()
        assert t2.connection.connected  # still used by t2
        t2.close()
    assert not t2.connection.connected


def test_binary_and_json_payloads_round_trip(
    broker: MosquittoBroker, echo_worker: MqttWorker
) -> None:
    small = np.arange(16, dtype=np.float32).reshape(2, 8)
    big = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)  # 64 KiB
    ints = np.arange(6, dtype=np.int64).reshape(3, 2)
    with MqttTransport(broker.url, region=echo_worker.region, device_id="dev-3") as t:
        r = t.infer(InferRequest(model="m", inputs={"a": small, "b": big, "c": ints}), timeout=5)
    np.testing.assert_array_equal(r.outputs["a"], small)
    np.testing.assert_array_equal(r.outputs["b"], big)
    np.testing.assert_array_equal(r.outputs["c"], ints)
    assert r.outputs["c"].dtype == np.int64
    body, hl = encode_request(InferRequest(model="m", inputs={"b": big}), binary=16384)
    assert hl is not None
    assert len(body) < big.nbytes + 500


def test_tcp_nodelay_on_client_and_worker_sockets(
    broker: MosquittoBroker, echo_worker: MqttWorker
) -> None:
    with MqttTransport(broker.url, region=echo_worker.region, device_id="dev-4") as t:
        assert t.ready(timeout=5)
        for client in (t.connection.client, echo_worker.conn.client):
            sock = client.socket()
            assert sock is not None
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_shipped_broker_configs_disable_nagle() -> None:
    confs = sorted((ROOT / "samples/mosquitto").glob("*.conf"))
    assert {c.name for c in confs} >= {"plain.conf", "auth_acl.conf", "mtls.conf"}
    for c in confs:
        lines = [ln.strip() for ln in c.read_text().splitlines()]
        assert "set_tcp_nodelay true" in lines, c
    fixture_conf = MosquittoBroker().config.read_text().splitlines()
    assert "set_tcp_nodelay true" in fixture_conf


def test_shipped_plain_config_starts(tmp_path: Path) -> None:
    port = free_port()
    text = (ROOT / "samples/mosquitto/plain.conf").read_text()
    text = text.replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
    b = MosquittoBroker(port=port, workdir=tmp_path)
    b.config.write_text(text)
    with b:
        with MqttTransport(b.url, region="r", device_id="dev-5") as t:
            assert t.ready(timeout=5)


# -- bad input: the worker answers with a V2 error where it can, never dies ---------------------
def test_unknown_model_and_wrong_shape_get_v2_errors(broker: MosquittoBroker, region: str) -> None:
    x, _ = _digits(2)
    with MqttTransport(broker.url, region=region, device_id="dev-6") as t:
        with pytest.raises(RemoteError, match="not in this repository") as e404:
            t.infer(InferRequest(model="nope", inputs={"input": x}), timeout=5)
        assert e404.value.status == 404
        with pytest.raises(RemoteError, match=r"input 'input'.*shape") as e400:
            t.infer(
                InferRequest(model="digits_cloud", inputs={"input": np.zeros((1, 64), np.float32)}),
                timeout=5,
            )
        assert e400.value.status == 400
        r = t.infer(InferRequest(model="digits_cloud", inputs={"input": x}), timeout=5)
        assert r.outputs["logits"].shape == (2, 10)


def test_malformed_payloads_answered_or_dropped_worker_survives(
    broker: MosquittoBroker, echo_worker: MqttWorker
) -> None:
    raw = Raw(broker, "dev-7")
    reg = echo_worker.region
    try:
        c1 = raw.send(reg, b"\x00\xffnot json")
        c2 = raw.send(
            reg, b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [3], "data": [1]}]}'
        )
        c3 = raw.send(reg, b'{"inputs": []}', user=[])  # no model property
        c4 = raw.send(reg, b'{"inputs": []}', user=[("model", "m"), (HEADER_LENGTH, "abc")])
        raw.send(reg, b'{"inputs": []}', response_topic=None)  # cannot be answered: dropped
        raw.send(reg, b'{"inputs": []}', response_topic=Topics().infer_reply("dev-other"))
        replies = raw.wait(4)
        time.sleep(0.3)
        by_corr = {bytes(c): (body, props) for body, props, c in replies}
        assert len(replies) == 4
        for corr, needle in (
            (c1, "not valid JSON"),
            (c2, "do not fill shape"),
            (c3, "no 'model' user property"),
            (c4, "non-negative decimal integer"),
        ):
            body, props = by_corr[corr]
            assert props["status"] == "400"
            assert needle in body.decode(), body
        assert echo_worker.stats["dropped_no_response_topic"] == 1
        assert echo_worker.stats["dropped_foreign_response_topic"] == 1
        # still alive and answering
        with MqttTransport(broker.url, region=reg, device_id="dev-7b") as t:
            r = t.infer(InferRequest(model="m", inputs={"a": np.ones(3, np.float32)}), timeout=5)
        assert r.outputs["a"].tolist() == [1.0, 1.0, 1.0]
    finally:
        raw.close()


def test_duplicates_and_late_requests_are_dropped(
    broker: MosquittoBroker, echo_worker: MqttWorker
) -> None:
    raw = Raw(broker, "dev-8")
    reg = echo_worker.region
    body = b'{"inputs": [{"name": "a", "datatype": "INT32", "shape": [1], "data": [7]}]}'
    try:
        corr = raw.send(reg, body)
        raw.send(reg, body, corr=corr)  # a QoS 1 redelivery carries the same correlation id
        past = str(int(time.time() * 1000) - 1000)
        raw.send(reg, body, user=[("model", "m"), ("deadline-ms", past)])
        raw.wait(1)
        time.sleep(0.5)
        assert len(raw.replies) == 1
        assert raw.replies[0][1]["status"] == "200"
        assert echo_worker.stats["duplicates"] == 1
        assert echo_worker.stats["expired"] == 1
    finally:
        raw.close()


def test_full_worker_queue_answers_503(broker: MosquittoBroker) -> None:
    release = threading.Event()

    def slow(req: InferRequest) -> Any:
        release.wait(5)
        return echo_handler(req)

    w = MqttWorker(slow, broker=broker.url, region="slow", queue_size=1).start()
    raw = Raw(broker, "dev-9")
    body = b'{"inputs": [{"name": "a", "datatype": "INT32", "shape": [1], "data": [7]}]}'
    try:
        for _ in range(6):
            raw.send("slow", body)
        raw.wait(3)
        statuses = [p["status"] for _, p, _ in raw.replies]
        assert "503" in statuses
        release.set()
        raw.wait(6)
        assert sorted(set(p["status"] for _, p, _ in raw.replies)) == ["200", "503"]
        assert len(raw.replies) == 6
    finally:
        release.set()
        raw.close()
        w.stop()


# -- timeouts, bounds and configuration --------------------------------------------------------
def test_no_worker_subscribed_fails_fast_on_puback_0x10(broker: MosquittoBroker) -> None:
    """The broker says at once that nobody subscribed (PUBACK 0x10): no wait for the deadline."""
    with MqttTransport(broker.url, region="nobody", device_id="dev-10") as t:
        start = time.monotonic()
        with pytest.raises(RemoteError, match="0x10") as info:
            t.infer(InferRequest(model="m", inputs={"a": np.ones(1, np.float32)}), timeout=5.0)
        assert time.monotonic() - start < 2.0
        assert info.value.status == 503
        assert info.value.region == "nobody"
        assert t._session.pending == {}


def _silent_subscriber(broker: MosquittoBroker, region: str) -> MqttConnection:
    """Subscribed to a region's requests (so no PUBACK 0x10) but never answering."""
    conn = MqttConnection(parse_broker_url(broker.url), client_id=f"silent-{region}").start(5)
    conn.subscribe(f"edgecloud/devices/+/infer/{region}/request", 1)
    return conn


def test_no_reply_times_out_and_cleans_pending(broker: MosquittoBroker) -> None:
    silent = _silent_subscriber(broker, "silent10")
    try:
        with MqttTransport(broker.url, region="silent10", device_id="dev-10") as t:
            start = time.monotonic()
            with pytest.raises(TransportTimeout):
                t.infer(InferRequest(model="m", inputs={"a": np.ones(1, np.float32)}), timeout=0.3)
            assert 0.25 < time.monotonic() - start < 2.0
            assert t._session.pending == {}
    finally:
        silent.close()


def test_pending_map_is_bounded(broker: MosquittoBroker) -> None:
    silent = _silent_subscriber(broker, "silent11")
    t = MqttTransport(broker.url, region="silent11", device_id="dev-11", max_pending=2)
    try:
        errors: list[BaseException] = []

        def call() -> None:
            try:
                t.infer(InferRequest(model="m", inputs={"a": np.ones(1, np.float32)}), timeout=1.0)
            except TransportError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for th in threads:
            th.start()
            time.sleep(0.05)
        for th in threads:
            th.join(5)
        kinds = sorted(type(e).__name__ for e in errors)
        assert kinds.count("TransportTimeout") == 2
        assert any("max_pending=2" in str(e) for e in errors)
    finally:
        t.close()
        silent.close()


def test_broker_down_at_start_fails_fast_with_connection_failed() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with MqttTransport(url, region="eu", device_id="dev-12", connect_timeout=1.0) as t:
        start = time.monotonic()
        with pytest.raises(ConnectionFailed, match=r"127\.0\.0\.1"):
            t.infer(InferRequest(model="m", inputs={"a": np.ones(1, np.float32)}), timeout=5)
        assert time.monotonic() - start < 1.5
        assert t.ready(timeout=0.1) is False


@pytest.mark.parametrize(
    ("url", "kwargs", "needle"),
    [
        ("http://127.0.0.1:1", {}, "mqtt:// or mqtts://"),
        ("mqtt://", {}, "no host"),
        ("mqtt://h:99999", {}, "invalid"),
        ("mqtts://h", {"ca": "/nonexistent/ca.crt"}, "ca file"),
        ("mqtts://h", {"certfile": "/x.crt"}, "both certfile and keyfile"),
    ],
)
def test_bad_configuration_is_a_config_error(url: str, kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_broker_url(url, **kwargs)


def test_transport_rejects_bad_arguments(broker: MosquittoBroker) -> None:
    with pytest.raises(ConfigError, match="device id"):
        MqttTransport(broker.url, region="eu", device_id="a/b")
    with pytest.raises(ConfigError, match="qos"):
        MqttTransport(broker.url, region="eu", device_id="d", qos=2)


def test_url_parsing_and_reason_codes() -> None:
    s = parse_broker_url("mqtts://u%40x:p%3Aw@broker.example")
    assert (s.host, s.port, s.tls, s.username, s.password) == (
        "broker.example",
        8883,
        True,
        "u@x",
        "p:w",
    )
    assert parse_broker_url("mqtt://h").port == 1883
    err = reason_code_error(0x87, "publish to 't'")
    assert type(err).__name__ == "AuthError"
    assert "0x87 Not authorized" in str(err)
    assert reason_code_error(0x97, "publish").status == 0x97  # quota exceeded: not an auth error
    b = Backoff(base=0.1, cap=2.0)
    delays = [b.delay(n) for n in range(12)]
    assert all(0.1 <= d <= 2.0 for d in delays)
    assert max(delays[8:]) > 0.2  # grows
