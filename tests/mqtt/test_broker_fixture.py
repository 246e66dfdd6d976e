"""The broker fixture itself: a real Mosquitto that paho can use, and that restarts on its port."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.fixtures.broker import MosquittoBroker


def _roundtrip(broker: MosquittoBroker) -> bytes:
    got = threading.Event()
    box: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        box.append(msg.payload)
        got.set()

    c.on_message = on_message
    c.connect(broker.host, broker.port, keepalive=10)
    c.subscribe("t/x", qos=1)
    c.loop_start()
    try:
        c.publish("t/x", b"hello", qos=1).wait_for_publish(5)
        assert got.wait(5)
    finally:
        c.loop_stop()
        c.disconnect()
    return box[0]


def test_broker_roundtrip_and_restart(mosquitto: MosquittoBroker) -> None:
    assert _roundtrip(mosquitto) == b"hello"
    port = mosquitto.port
    mosquitto.restart()
    assert mosquitto.port == port
    assert _roundtrip(mosquitto) == b"hello"
