"""The agent as a real process: last will on kill, queue kept across a restart while offline,
a download interrupted by a kill resumes after the restart and the job completes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.agent_util import (
    Keys,
    Observer,
    TcpGate,
    make_package,
    send_job,
    write_config,
)
from tests.fixtures.agents import AgentProcess
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.package_server import PackageServer

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


@pytest.fixture
def procs() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for p in started:
        p.kill()


def _online(obs: Observer, device: str, online: bool) -> bool:
    s = obs.json_on(f"/devices/{device}/status")
    return bool(s) and s[-1]["online"] is online


def test_last_will_marks_device_offline_when_killed(
    tmp_path: Path, mosquitto: MosquittoBroker, procs: list[AgentProcess]
) -> None:
    keys = Keys(tmp_path)
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-p1",
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
    )
    obs = Observer(mosquitto.host, mosquitto.port)
    try:
        p = AgentProcess(cfg, tmp_path / "agent.log", via_cli=True)
        procs.append(p)
        obs.wait(lambda: _online(obs, "dev-p1", True), 60, "online status")
        status = obs.json_on("/devices/dev-p1/status")[-1]
        assert status["group"] == "lab"
        assert status["labels"] == {"site": "bench"}
        p.kill()
        obs.wait(lambda: _online(obs, "dev-p1", False), 30, "last will (offline)")
    finally:
        obs.close()
    # retained: a controller that connects later still sees the device offline
    late = Observer(mosquitto.host, mosquitto.port)
    try:
        late.wait(lambda: _online(late, "dev-p1", False), 10, "retained offline status")
    finally:
        late.close()


def test_restart_while_offline_keeps_the_queue(
    tmp_path: Path, mosquitto: MosquittoBroker, procs: list[AgentProcess]
) -> None:
    # The agent's link goes through a gate the test closes; broker and observer stay up.
    gate = TcpGate(mosquitto.port)
    keys = Keys(tmp_path)
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-p2",
        broker_url=f"mqtt://127.0.0.1:{gate.port}",
        store=tmp_path / "store",
        public_key=keys.public,
        interval=0.2,
    )
    obs = Observer(mosquitto.host, mosquitto.port)
    try:
        p1 = AgentProcess(cfg, tmp_path / "agent.log")
        procs.append(p1)
        obs.wait(lambda: len(obs.json_on("/telemetry")) >= 2, 60, "first heartbeats")
        gate.close_link()
        time.sleep(2.5)  # heartbeats pile up in the agent's SQLite queue
        p1.kill()  # killed while offline: the queue is all there is
        obs.wait(lambda: _online(obs, "dev-p2", False), 30, "last will")
        seen_before = {r["seq"] for r in obs.json_on("/telemetry")}
        p2 = AgentProcess(cfg, tmp_path / "agent.log")
        procs.append(p2)
        time.sleep(1.0)  # the new process starts offline too
        gate.open_link()
        obs.wait(
            lambda: len({r["seq"] for r in obs.json_on("/telemetry")}) >= 25,
            60,
            "queued heartbeats after restart",
        )
        seqs = [r["seq"] for r in obs.json_on("/telemetry")]
        assert p2.terminate() == 0
    finally:
        obs.close()
        gate.stop()
    first = list(dict.fromkeys(seqs))
    assert first == list(range(1, len(first) + 1))  # in order, nothing lost, no gaps
    assert max(seen_before) < 20 <= len(first)  # most came from the queue after the restart


def test_killed_mid_download_resumes_after_restart(
    tmp_path: Path, mosquitto: MosquittoBroker, procs: list[AgentProcess]
) -> None:
    keys = Keys(tmp_path)
    archive = make_package(tmp_path, keys, "1.0.0")
    data = archive.read_bytes()
    server = PackageServer({"pkg.tar.gz": data}, stall_first=True)
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-p3",
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
    )
    obs = Observer(mosquitto.host, mosquitto.port)
    try:
        p1 = AgentProcess(cfg, tmp_path / "agent.log")
        procs.append(p1)
        obs.wait(lambda: _online(obs, "dev-p3", True), 60, "online status")
        send_job(obs, "dev-p3", "deploy-1", "deploy", package_url=server.url("pkg.tar.gz"))
        downloads = tmp_path / "store" / "downloads"
        obs.wait(
            lambda: any(
                p.name.endswith(".part") and p.stat().st_size > 0 for p in downloads.iterdir()
            ),
            30,
            "a partial download",
        )
        p1.kill()
        server.release.set()
        p2 = AgentProcess(cfg, tmp_path / "agent.log")
        procs.append(p2)
        # the restarted agent does not resume on its own: it asks, and the controller (here
        # the test) sends the job again because it still runs
        obs.wait(
            lambda: any(
                u.get("details", {}).get("interrupted")
                for u in obs.json_on("/devices/dev-p3/jobs/deploy-1/update")
            ),
            60,
            "the interrupted job reported",
        )
        send_job(obs, "dev-p3", "deploy-1", "deploy", package_url=server.url("pkg.tar.gz"))
        done = obs.wait_job("deploy-1", timeout=60)
        assert done["status"] == "SUCCEEDED", done["reason"]
        assert done["details"]["version"] == "1.0.0"
        obs.wait(
            lambda: any(
                s["model_version"] == "1.0.0" and s["online"]
                for s in obs.json_on("/devices/dev-p3/status")
            ),
            30,
            "status naming the new version",
        )
        assert p2.terminate() == 0
        obs.wait(lambda: _online(obs, "dev-p3", False), 10, "offline on clean stop")
    finally:
        obs.close()
        server.close()
    ranges = [r for _, r in server.requests]
    assert ranges[0] is None
    assert ranges[1] is not None  # resumed, not restarted
    assert int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0
    assert server.bytes_sent == len(data)
