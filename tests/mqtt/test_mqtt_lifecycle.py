"""The one MQTT connection lifecycle (edgecloud.mqtt): refusal policy, bounded backoff,
early PUBACKs, and reconnecting to a real Mosquitto that is killed and restarted."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edgecloud.errors import AuthError, ConfigError, ConnectionFailed, TransportError
from edgecloud.mqtt import (
    AckMap,
    Backoff,
    BrokerSettings,
    MqttConnection,
    RefusalPolicy,
    SelectorLoop,
    broker_settings,
    parse_broker_url,
)
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.fixtures.wait import poll_until as wait_until


def _puback(code: int) -> ReasonCode:
    return ReasonCode(PacketTypes.PUBACK, identifier=code)


# -- backoff ------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0.001, 5.0),
    factor=st.floats(1.0, 100.0),
    attempt=st.integers(0, 10_000),
)
def test_backoff_stays_within_base_and_cap(base: float, factor: float, attempt: int) -> None:
    b = Backoff(base=base, cap=base * factor)
    d = b.delay(attempt)
    assert base <= d <= b.cap + 1e-9


def test_backoff_grows_to_its_cap_and_rejects_nonsense() -> None:
    b = Backoff(base=0.01, cap=1.0)
    early = max(b.delay(0) for _ in range(50))
    late = [b.delay(30) for _ in range(200)]
    assert early <= 0.01 + 1e-12  # the first retry waits the base
    assert max(late) > 0.5  # jittered up to the cap later on
    with pytest.raises(ValueError, match="base <= cap"):
        Backoff(base=2.0, cap=1.0)


# -- the early-PUBACK map -----------------------------------------------------------------------
def test_ack_map_pairs_acks_with_publishers_in_either_order() -> None:
    acks: AckMap[ReasonCode] = AckMap(max_early=4, max_age_s=5.0)
    got: list[int] = []
    assert acks.expect(1, lambda rc: got.append(rc.value)) is None  # registered first
    cb = acks.arrived(1, _puback(0))
    assert cb is not None
    cb(_puback(0))
    assert got == [0]
    # the PUBACK first (a fast loopback broker): the publisher gets it when it registers
    assert acks.arrived(2, _puback(0x10)) is None
    early = acks.expect(2, lambda rc: got.append(rc.value))
    assert early is not None
    assert early.value == 0x10  # success codes are kept too, not only refusals
    # bounded: the oldest early acks go first
    for mid in range(10, 20):
        acks.arrived(mid, _puback(0))
    assert acks.expect(10, lambda rc: None) is None
    assert acks.expect(19, lambda rc: None) is not None
    acks.clear()
    assert len(acks) == 0


def test_ack_map_never_pairs_a_stale_early_ack() -> None:
    acks: AckMap[ReasonCode] = AckMap(max_age_s=0.05)
    acks.arrived(7, _puback(0))
    time.sleep(0.1)  # paho reuses message ids: an old ack must not complete a new message
    assert acks.expect(7, lambda rc: None) is None
    assert len(acks) == 1


# -- settings -----------------------------------------------------------------------------------
def test_broker_settings_travel_as_one_object() -> None:
    s = parse_broker_url("mqtt://u:p@h:1884", keepalive=7, connect_timeout=2.0)
    assert (s.host, s.port, s.username, s.password, s.keepalive) == ("h", 1884, "u", "p", 7)
    assert broker_settings(s) is s
    assert broker_settings("mqtt://h") == BrokerSettings(host="h", port=1883)
    with pytest.raises(ConfigError, match="unknown MQTT broker option"):
        parse_broker_url("mqtt://h", user="x")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="URL or BrokerSettings"):
        broker_settings(42)  # type: ignore[arg-type]


# -- refusal policy against a real broker -------------------------------------------------------
@pytest.fixture
def closed_broker() -> Any:
    with MosquittoBroker(allow_anonymous=False) as b:
        yield b


def _refusals(events: list[tuple[bool, TransportError | None]]) -> int:
    return sum(1 for up, err in events if not up and isinstance(err, AuthError))


def test_refused_connack_stops_for_good_by_default(closed_broker: MosquittoBroker) -> None:
    events: list[tuple[bool, TransportError | None]] = []
    conn = MqttConnection(
        parse_broker_url(closed_broker.url),
        client_id="refused-stop",
        on_state=lambda up, err: events.append((up, err)),
        backoff=Backoff(base=0.05, cap=0.1),
    )
    try:
        with pytest.raises(AuthError, match=r"0x8[67]"):
            conn.start(timeout=5)
        assert conn.fatal is not None
        assert conn.closing
        time.sleep(0.5)  # five backoff caps: a retrying connection would have been refused again
        assert _refusals(events) == 1
        with pytest.raises(AuthError):
            conn.publish("t", b"x")  # fails fast with the refusal, not "down"
    finally:
        conn.close(wait=2.0)


def test_refused_connack_retries_at_the_cap_with_retry_slowly(
    closed_broker: MosquittoBroker,
) -> None:
    events: list[tuple[bool, TransportError | None]] = []
    lock = threading.Lock()

    def on_state(up: bool, err: TransportError | None) -> None:
        with lock:
            events.append((up, err))

    cap = 0.3
    conn = MqttConnection(
        parse_broker_url(closed_broker.url),
        client_id="refused-retry",
        on_state=on_state,
        backoff=Backoff(base=0.01, cap=cap),
        refusal=RefusalPolicy.RETRY_SLOWLY,
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(AuthError, match=r"0x8[67]"):
            conn.start(timeout=5)  # the refusal is still what the caller sees
        assert conn.fatal is None
        assert not conn.closing
        assert wait_until(lambda: _refusals(events) >= 3, timeout=15)
        took = time.monotonic() - t0
        # refused three times: at least two waits of the cap between them (not the 10 ms base)
        assert took >= 2 * cap * 0.9
        assert conn.next_delay() == cap  # after a refusal, always the slowest pace
    finally:
        conn.close(wait=2.0)


# -- reconnect to a broker killed and restarted ------------------------------------------------
@pytest.mark.slow
def test_connection_comes_back_after_the_broker_is_killed_and_restarted() -> None:
    broker = MosquittoBroker(port=free_port()).start()
    loop = SelectorLoop(name="lifecycle-test", connect_workers=1)
    got: list[bytes] = []
    ready = threading.Event()
    states: list[bool] = []
    conn = MqttConnection(
        parse_broker_url(broker.url),
        client_id="phoenix",
        on_message=lambda m: got.append(bytes(m.payload)),
        on_state=lambda up, err: states.append(up),
        on_subscribed=lambda codes: ready.set(),
        subscriptions=[("life/+", 1)],
        backoff=Backoff(base=0.05, cap=0.5),
        loop=loop,
    )
    try:
        conn.start(timeout=5)
        assert ready.wait(5)
        conn.publish("life/a", b"before")
        assert wait_until(lambda: b"before" in got, timeout=5)
        assert broker.proc is not None
        broker.proc.kill()  # no DISCONNECT, no goodbye: the socket just dies
        broker.proc.wait(5)
        broker.proc = None
        assert wait_until(lambda: not conn.connected, timeout=10)
        with pytest.raises(ConnectionFailed, match="down"):
            conn.publish("life/a", b"while down")  # fails fast; callers decide to queue
        time.sleep(1.0)  # several failed attempts against a closed port
        ready.clear()
        broker.start()
        assert wait_until(lambda: conn.connected, timeout=15)
        assert ready.wait(10)  # resubscribed on the new connection without being asked
        conn.publish("life/b", b"after")
        assert wait_until(lambda: b"after" in got, timeout=5)
        assert conn.connects == 2
        assert states.count(True) == 2
    finally:
        conn.close(wait=2.0)
        loop.stop()
        broker.close()


# -- the one entry point for workers --------------------------------------------------------
def test_cloud_mqtt_workers_cli_refuses_bad_input_clearly(
    capsys: pytest.CaptureFixture[str], closed_broker: MosquittoBroker
) -> None:
    from edgecloud.cli.main import main

    base = ["cloud", "mqtt-workers", "--region", "r", "--echo"]
    assert main([*base, "--mqtt", "mqtt://127.0.0.1:1", "--mqtt-workers", "0"]) == 2
    assert "--mqtt-workers must be >= 1, got 0" in capsys.readouterr().err
    assert main([*base, "--mqtt", "http://127.0.0.1:1"]) == 2
    assert "must start with mqtt:// or mqtts://" in capsys.readouterr().err
    # a broker that refuses the workers' (missing) credentials: the refusal, named, exit 1
    assert main([*base, "--mqtt", closed_broker.url]) == 1
    assert "refused by the broker: reason code 0x8" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither a repository nor --echo: argparse says so
        main(["cloud", "mqtt-workers", "--mqtt", closed_broker.url, "--region", "r"])
    assert "--repository" in capsys.readouterr().err
