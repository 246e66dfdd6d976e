"""Secured brokers: password file + ACL, and TLS with client certificates (CN = device id)."""

from __future__ import annotations

import getpass
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.cloud.mqtt_worker import MqttWorker, echo_handler
from edgecloud.errors import AuthError, ConnectionFailed
from edgecloud.mqtt import MqttConnection, parse_broker_url, publish_properties
from edgecloud.topics import Topics
from edgecloud.transport.mqtt import MqttTransport
from edgecloud.transport.v2 import InferRequest
from tests.fixtures.broker import (
    MosquittoBroker,
    auth_broker,
    dynsec_broker,
    free_port,
    make_tls_files,
    tls_broker,
)

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]
USERS = {"worker": "w-secret", "dev-a": "a-secret", "dev-b": "b-secret"}
X = InferRequest(model="m", inputs={"x": np.arange(4, dtype=np.float32)})


@pytest.fixture(scope="module")
def secured() -> Iterator[MosquittoBroker]:
    with auth_broker(USERS, Topics().mosquitto_acl()) as b:
        yield b


@pytest.fixture(scope="module")
def secured_worker(secured: MosquittoBroker) -> Iterator[MqttWorker]:
    w = MqttWorker(
        echo_handler,
        broker=parse_broker_url(secured.url, username="worker", password=USERS["worker"]),
        region="eu",
    ).start()
    yield w
    w.stop()


def _conn(broker: MosquittoBroker, user: str, password: str) -> MqttConnection:
    return MqttConnection(
        parse_broker_url(broker.url, username=user, password=password),
        client_id=f"{user}-{uuid.uuid4().hex[:6]}",
    )


def test_device_with_credentials_gets_answers(
    secured: MosquittoBroker, secured_worker: MqttWorker
) -> None:
    with MqttTransport(
        secured.url, region="eu", device_id="dev-a", username="dev-a", password=USERS["dev-a"]
    ) as t:
        r = t.infer(X, timeout=5)
    np.testing.assert_array_equal(r.outputs["x"], X.inputs["x"])


def test_bad_password_stops_with_auth_error_naming_the_code(secured: MosquittoBroker) -> None:
    conn = _conn(secured, "dev-a", "wrong")
    start = time.monotonic()
    # Mosquitto 2.0 answers 0x87 Not authorized (newer versions 0x86 Bad User Name or Password)
    with pytest.raises(
        AuthError, match=r"CONNACK|refused by the broker: reason code 0x8[67]"
    ) as exc:
        conn.start(5)
    assert exc.value.status in (0x86, 0x87)
    assert ("Not authorized" in str(exc.value)) or ("Bad User Name" in str(exc.value))
    assert time.monotonic() - start < 3
    # paho alone would retry forever; we stop for good
    time.sleep(1.0)
    assert conn.fatal is exc.value
    assert not conn.connected
    conn.close()
    # and the transport surfaces the same AuthError at once, on every call
    with MqttTransport(
        secured.url, region="eu", device_id="dev-a", username="dev-a", password="wrong"
    ) as t:
        with pytest.raises(AuthError, match=r"0x8[67]"):
            t.infer(X, timeout=5)
        start = time.monotonic()
        with pytest.raises(AuthError):
            t.infer(X, timeout=5)
        assert time.monotonic() - start < 0.2
        assert t.ready(timeout=0.1) is False


def test_device_cannot_publish_to_another_devices_request_topic(secured: MosquittoBroker) -> None:
    conn = _conn(secured, "dev-a", USERS["dev-a"]).start(5)
    acks: list[Any] = []
    done = threading.Event()
    try:
        props = publish_properties()
        props.ResponseTopic = Topics().infer_reply("dev-a")
        props.CorrelationData = b"c"

        def on_ack(rc: Any) -> None:
            acks.append(rc)
            done.set()

        conn.publish(
            Topics().infer_request("dev-b", "eu"), b"{}", qos=1, properties=props, on_ack=on_ack
        )
        assert done.wait(3)
        assert acks[0].value == 0x87
        # own topic is allowed
        done.clear()
        conn.publish(
            Topics().infer_request("dev-a", "eu"), b"{}", qos=1, properties=props, on_ack=on_ack
        )
        assert done.wait(3)
        assert acks[1].value == 0
    finally:
        conn.close()


def test_transport_turns_puback_refusal_into_auth_error(secured: MosquittoBroker) -> None:
    """dev-a's credentials but dev-b's identity in the SDK: the broker refuses, loudly."""
    with MqttTransport(
        secured.url, region="eu", device_id="dev-b", username="dev-a", password=USERS["dev-a"]
    ) as t:
        start = time.monotonic()
        with pytest.raises(AuthError, match=r"publish to .*dev-b.* 0x87 Not authorized"):
            t.infer(X, timeout=3)
        assert time.monotonic() - start < 1.0  # refused, not timed out


def test_acl_file_broker_never_delivers_another_devices_replies(
    secured: MosquittoBroker, secured_worker: MqttWorker
) -> None:
    """Mosquitto's acl_file grants every SUBSCRIBE (SUBACK 0x00) and filters at delivery."""
    spy_got: list[bytes] = []
    spy = MqttConnection(
        parse_broker_url(secured.url, username="dev-a", password=USERS["dev-a"]),
        client_id="spy",
        on_message=lambda m: spy_got.append(m.payload),
    ).start(5)
    try:
        spy.subscribe(Topics().infer_reply("dev-b"), 1)
        spy.subscribe(f"{Topics().prefix}/devices/+/infer/reply", 1)
        with MqttTransport(
            secured.url, region="eu", device_id="dev-b", username="dev-b", password=USERS["dev-b"]
        ) as tb:
            tb.infer(X, timeout=5)
        time.sleep(0.3)
        assert spy_got == []
    finally:
        spy.close()


def _device_acls(dev: str) -> list[dict[str, Any]]:
    t = Topics()
    return [
        {"acltype": "publishClientSend", "topic": t.infer_request(dev, "eu"), "allow": True},
        {"acltype": "subscribeLiteral", "topic": t.infer_reply(dev), "allow": True},
        {"acltype": "publishClientReceive", "topic": t.infer_reply(dev), "allow": True},
    ]


@pytest.fixture(scope="module")
def dynsec() -> Iterator[MosquittoBroker]:
    everything = [
        {"acltype": kind, "topic": "#", "allow": True}
        for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")
    ]
    with dynsec_broker(
        {
            "worker": ("w-secret", everything),
            "dev-a": ("a-secret", _device_acls("dev-a")),
            "dev-b": ("b-secret", _device_acls("dev-b")),
        }
    ) as b:
        yield b


def test_subscription_to_another_devices_replies_is_refused_suback_0x87(
    dynsec: MosquittoBroker,
) -> None:
    conn = _conn(dynsec, "dev-a", "a-secret").start(5)
    try:
        conn.subscribe(Topics().infer_reply("dev-a"), 1)  # own replies: granted
        with pytest.raises(AuthError, match=re.escape("0x87 Not authorized")) as exc:
            conn.subscribe(Topics().infer_reply("dev-b"), 1)
        assert exc.value.status == 0x87
    finally:
        conn.close()
    w = MqttWorker(
        echo_handler,
        broker=parse_broker_url(dynsec.url, username="worker", password="w-secret"),
        region="eu",
    ).start()
    try:
        with MqttTransport(
            dynsec.url, region="eu", device_id="dev-a", username="dev-a", password="a-secret"
        ) as ta:
            np.testing.assert_array_equal(ta.infer(X, timeout=5).outputs["x"], X.inputs["x"])
        # the SDK configured as dev-b with dev-a's credentials: refused at SUBACK, named
        with MqttTransport(
            dynsec.url, region="eu", device_id="dev-b", username="dev-a", password="a-secret"
        ) as tb:
            with pytest.raises(AuthError, match=r"may not read its reply topic.*0x87"):
                tb.infer(X, timeout=3)
    finally:
        w.stop()


def test_shipped_auth_config_is_valid(tmp_path: Path) -> None:
    from tests.fixtures.broker import write_password_file

    port = free_port()
    pw = write_password_file(tmp_path / "passwd", {"dev-a": "pw"})
    acl = tmp_path / "acl"
    acl.write_text(Topics().mosquitto_acl())
    text = (ROOT / "samples/mosquitto/auth_acl.conf").read_text()
    text = text.replace("listener 1883", f"listener {port} 127.0.0.1")
    text = text.replace("/etc/mosquitto/edgecloud.passwd", str(pw))
    text = text.replace("/etc/mosquitto/edgecloud.acl", str(acl))
    text = text.replace("persistence true", "persistence false")
    text = f"user {getpass.getuser()}\n{text}"  # root would drop to 'mosquitto'
    b = MosquittoBroker(port=port, workdir=tmp_path)
    b.config.write_text(text)
    with b:
        c = _conn(b, "dev-a", "pw").start(5)
        c.close()
        with pytest.raises(AuthError):
            _conn(b, "dev-a", "nope").start(5)


# -- mutual TLS ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls() -> Iterator[tuple[MosquittoBroker, Any]]:
    broker, files = tls_broker(["worker", "dev-a", "dev-b"], acl=Topics().mosquitto_acl())
    with broker:
        yield broker, files


def test_mtls_round_trip_with_cn_as_username(mtls: tuple[MosquittoBroker, Any]) -> None:
    broker, files = mtls
    assert broker.url.startswith("mqtts://")
    wcert, wkey = files.clients["worker"]
    w = MqttWorker(
        echo_handler,
        broker=parse_broker_url(broker.url, ca=files.ca, certfile=wcert, keyfile=wkey),
        region="eu",
    ).start()
    try:
        cert, key = files.clients["dev-a"]
        with MqttTransport(
            broker.url, region="eu", device_id="dev-a", ca=files.ca, certfile=cert, keyfile=key
        ) as t:
            r = t.infer(X, timeout=5)
            np.testing.assert_array_equal(r.outputs["x"], X.inputs["x"])
        # dev-a's certificate cannot act as dev-b: the ACL keys on the certificate's CN
        with MqttTransport(
            broker.url, region="eu", device_id="dev-b", ca=files.ca, certfile=cert, keyfile=key
        ) as t:
            with pytest.raises(AuthError, match="0x87"):
                t.infer(X, timeout=3)
    finally:
        w.stop()


def test_mtls_without_client_certificate_is_refused(mtls: tuple[MosquittoBroker, Any]) -> None:
    broker, files = mtls
    with MqttTransport(
        broker.url, region="eu", device_id="dev-a", ca=files.ca, connect_timeout=2.0
    ) as t:
        with pytest.raises(ConnectionFailed):
            t.infer(X, timeout=2)
    # a CA file that is not a certificate is a configuration error naming TLS
    from edgecloud.errors import ConfigError

    with pytest.raises(ConfigError, match="TLS"):
        MqttTransport(broker.url, region="eu", device_id="dev-z", ca=ROOT / "pyproject.toml")


def test_mtls_server_from_unknown_ca_is_refused(
    mtls: tuple[MosquittoBroker, Any], tmp_path: Path
) -> None:
    broker, files = mtls
    other = make_tls_files(tmp_path / "other-pki", ["dev-a"])
    cert, key = files.clients["dev-a"]
    with MqttTransport(
        broker.url,
        region="eu",
        device_id="dev-a",
        ca=other.ca,
        certfile=cert,
        keyfile=key,
        connect_timeout=2.0,
    ) as t:
        with pytest.raises(ConnectionFailed, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            t.infer(X, timeout=2)


def test_shipped_mtls_config_is_valid(tmp_path: Path, mtls: tuple[MosquittoBroker, Any]) -> None:
    _, files = mtls
    port = free_port()
    acl = tmp_path / "acl"
    acl.write_text(Topics().mosquitto_acl())
    text = (ROOT / "samples/mosquitto/mtls.conf").read_text()
    text = text.replace("listener 8883", f"listener {port} 127.0.0.1")
    text = text.replace("/etc/mosquitto/certs/ca.crt", str(files.ca))
    text = text.replace("/etc/mosquitto/certs/server.crt", str(files.server_cert))
    text = text.replace("/etc/mosquitto/certs/server.key", str(files.server_key))
    text = text.replace("/etc/mosquitto/edgecloud.acl", str(acl))
    text = text.replace("persistence true", "persistence false")
    text = f"user {getpass.getuser()}\n{text}"
    b = MosquittoBroker(port=port, workdir=tmp_path, tls=True)
    b.config.write_text(text)
    cert, key = files.clients["dev-a"]
    with (
        b,
        MqttTransport(
            b.url, region="eu", device_id="dev-a", ca=files.ca, certfile=cert, keyfile=key
        ) as t,
    ):
        assert t.ready(timeout=5) is True
