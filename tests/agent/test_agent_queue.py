"""The durable outbox: drop policy on real SQLite, and delivery through a broker outage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from device_agent.queue import DurableQueue
from tests.fixtures.agent_util import Keys, Observer, TcpGate, start_agent, write_config
from tests.fixtures.broker import MosquittoBroker


def test_drop_policy_drops_oldest_telemetry_first(tmp_path: Path) -> None:
    q = DurableQueue(tmp_path / "q.db", max_rows=10, max_bytes=10_000, hard_cap_rows=15)
    for i in range(3):
        q.put("job", "t/job", f"job-{i}".encode())
    for i in range(12):
        q.put("telemetry", "t/tel", f"tel-{i}".encode())
    items = q.peek(limit=100)
    assert len(items) == 10
    # every job update kept; the oldest telemetry went first
    assert [i.payload for i in items if i.kind == "job"] == [b"job-0", b"job-1", b"job-2"]
    assert [i.payload for i in items if i.kind == "telemetry"] == [
        f"tel-{i}".encode() for i in range(5, 12)
    ]
    assert q.dropped() == {"telemetry": 5}
    # job updates beyond max_rows are kept (telemetry goes instead) up to the hard cap
    for i in range(3, 20):
        q.put("job", "t/job", f"job-{i}".encode())
    items = q.peek(limit=100)
    assert len(items) == 15
    assert all(i.kind == "job" for i in items)
    assert items[0].payload == b"job-5"  # over the hard cap: the oldest job updates went
    assert q.dropped() == {"telemetry": 12, "job": 5}  # cumulative
    q.close()


def test_byte_limit_and_ack_and_persistence(tmp_path: Path) -> None:
    q = DurableQueue(tmp_path / "q.db", max_rows=1000, max_bytes=1000, hard_cap_rows=2000)
    for _ in range(5):
        q.put("telemetry", "t", b"x" * 300)
    assert q.stats() == {"rows": 3, "bytes": 900}
    first = q.peek(limit=1)[0]
    q.ack(first.id)
    assert len(q) == 2
    seqs = [q.next_seq("telemetry") for _ in range(3)]
    assert seqs == [1, 2, 3]
    q.job_put("j#1", "j", 1, "SUCCEEDED", "{}", '{"reason": ""}')
    q.close()
    q2 = DurableQueue(tmp_path / "q.db", max_rows=1000, max_bytes=1000, hard_cap_rows=2000)
    assert len(q2) == 2
    assert q2.next_seq("telemetry") == 4  # seq survives a restart
    assert q2.job_get("j#1") == ("SUCCEEDED", "{}", '{"reason": ""}')
    assert [i.id for i in q2.peek(after_id=0)] == sorted(i.id for i in q2.peek(after_id=0))
    q2.close()


@pytest.mark.mqtt
def test_telemetry_survives_broker_outage_in_order(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """Broker stopped for a few seconds: every record produced meanwhile arrives after the
    reconnect, in order, without gaps (duplicates only as QoS 1 allows; dedupe by seq).

    The agent reaches the broker through a ``TcpGate`` that stays closed until the observer
    has subscribed again after the restart, so the observer cannot miss what the agent sends
    first; the records themselves can only come from the agent's queue (the broker keeps no
    state: persistence is off).
    """
    keys = Keys(tmp_path)
    gate = TcpGate(mosquitto.port)
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-q",
        broker_url=f"mqtt://127.0.0.1:{gate.port}",
        store=tmp_path / "store",
        public_key=keys.public,
        interval=0.1,
    )
    obs = Observer(mosquitto.host, mosquitto.port)
    agent = start_agent(cfg)
    try:
        obs.wait(lambda: len(obs.json_on("/telemetry")) >= 3, what="first heartbeats")
        gate.close_link()

        def broker_owes_nothing() -> bool:
            # What the broker acknowledged is gone from the agent's queue and is the broker's
            # to deliver (QoS 1); without persistence it would die with it, so wait for it.
            produced = int(agent.queue.get("seq:telemetry") or 0)
            queued = {json.loads(i.payload)["seq"] for i in agent.queue.peek(limit=10_000)}
            seen = {r["seq"] for r in obs.json_on("/telemetry")}
            return set(range(1, produced + 1)) <= seen | queued

        obs.wait(broker_owes_nothing, 10, "observer has what the broker acknowledged")
        mosquitto.stop()
        deadline = time.monotonic() + 10
        while agent.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not agent.connected
        time.sleep(2.0)  # heartbeats keep being produced while the broker is down
        queued = len(agent.queue)
        assert queued >= 10
        subs = obs.subscriptions
        mosquitto.start()
        obs.wait(lambda: obs.subscriptions > subs, what="observer subscribed again")
        gate.open_link()
        produced = agent.heartbeat()  # everything up to this one must arrive
        obs.wait(
            lambda: any(r["seq"] == produced for r in obs.json_on("/telemetry")),
            timeout=30,
            what=f"telemetry seq {produced}",
        )
        records = obs.json_on("/telemetry")
    finally:
        agent.stop()
        obs.close()
        gate.stop()
    seqs = [r["seq"] for r in records]
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == list(range(1, len(first_seen) + 1))  # in order, from 1, no gaps
    assert len(first_seen) >= produced
    assert len(seqs) - len(first_seen) <= agent.config.queue.inflight  # QoS 1 repeats only
    assert all(r["device_id"] == "dev-q" for r in records)
    assert agent.connects == 2


def test_heartbeat_reports_dropped_records(tmp_path: Path) -> None:
    """Offline with a small queue: old telemetry is dropped and the next heartbeat says so."""
    from device_agent.agent import Agent
    from device_agent.config import load_config
    from tests.fixtures.broker import free_port

    keys = Keys(tmp_path)
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-drop",
        broker_url=f"mqtt://127.0.0.1:{free_port()}",
        store=tmp_path / "store",
        public_key=keys.public,
        extra="[queue]\nmax_rows = 10\n",
    )
    agent = Agent(load_config(cfg)).start()  # nobody listens on that port: stays offline
    try:
        for _ in range(15):
            agent.heartbeat()
        last = agent.heartbeat()
        items = agent.queue.peek(limit=100)
    finally:
        agent.stop()
    assert len(items) <= 10
    newest = json.loads(items[-1].payload)
    assert newest["seq"] == last
    assert newest["data"]["dropped"]["telemetry"] >= 6
    assert not agent.connected
