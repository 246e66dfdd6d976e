"""End to end through the device agent: tune -> deploy -> background escalation, audits and the
drift alarm, all visible in the telemetry a real Mosquitto broker carries to the fleet side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import load_config
from edgecloud import calibration as cal
from edgecloud.fleet.controller import FleetController
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.server import FleetHTTPServer
from edgecloud.fleet.store import SqliteFleetStore
from edgecloud.package import load_private_key, load_public_key, pack_package, unpack_package
from tests.fixtures.agent_util import ROOT, Keys, Observer, make_package, send_job, write_config
from tests.fixtures.broker import MosquittoBroker

pytestmark = pytest.mark.mqtt
DEV = "dev-esc"
S = ROOT / "samples"


def _tuned_archive(tmp: Path, keys: Keys) -> tuple[Path, dict[str, Any]]:
    from edgecloud import tuning

    base = unpack_package(make_package(tmp, keys, "1.0.0"), tmp / "base")
    e = [np.load(S / "data" / f"edge_{s}.npz") for s in ("calib", "val")]
    c = [np.load(S / "data" / f"cloud_{s}.npz") for s in ("calib", "val")]
    _, written = tuning.tune_package(
        base,
        tmp / "tuned",
        public_key=load_public_key(keys.public),
        signing_key=load_private_key(keys.private),
        inputs={"input": np.concatenate([d["input"] for d in e])},
        labels=np.concatenate([d["labels"] for d in e]),
        cloud=tuning.cloud_from_onnx(S / "models" / "digits_cloud.onnx"),
        cloud_inputs={"input": np.concatenate([d["input"] for d in c])},
        targets=[cal.parse_target("offload=0.2")],
    )
    return pack_package(tmp / "tuned", tmp / "tuned.tar.gz"), written.routing


def _beat(agent: Agent, obs: Observer) -> dict[str, Any]:
    seq = agent.heartbeat()
    rec: dict[str, Any] = obs.wait(
        lambda: next((r for r in obs.json_on("/telemetry") if r["seq"] == seq), None),
        what="heartbeat",
    )
    return rec


def test_background_escalation_audits_and_drift_show_in_telemetry(
    tmp_path: Path, mosquitto: MosquittoBroker, request: pytest.FixtureRequest
) -> None:
    from tests.fixtures.servers import make_repository, running_cloud_server

    keys = Keys(tmp_path)
    archive, routing = _tuned_archive(tmp_path, keys)
    repo = make_repository(tmp_path / "repo", {"digits_cloud": S / "models" / "digits_cloud.onnx"})
    obs = Observer(mosquitto.host, mosquitto.port)
    request.addfinalizer(obs.close)
    ctl = FleetController(
        mosquitto.url,
        SqliteFleetStore(tmp_path / "fleet.sqlite"),
        PackageStore(tmp_path / "packages"),
        tick_interval=0.05,
    )
    request.addfinalizer(ctl.close)
    http = FleetHTTPServer(ctl).start()
    request.addfinalizer(http.close)
    ctl.start()
    with running_cloud_server(repo, region="near", subprocess=False, threads=1) as server:
        cfg = write_config(
            tmp_path / "agent.toml",
            device=DEV,
            broker_url=mosquitto.url,
            store=tmp_path / "store",
            public_key=keys.public,
            extra=(
                "[policy]\ndeadline_s = 5.0\n"
                f'[[regions]]\nname = "near"\nendpoint = "{server.url}"\n'
                'model = "digits_cloud"\ncloud_input_shape = [1, 8, 8]\n'
            ),
        )
        agent = Agent(load_config(cfg)).start()
        try:
            obs.wait(lambda: agent.connected or None, what="agent subscribed to its jobs")
            send_job(obs, DEV, "d1", "deploy", package_url=archive.as_uri())
            assert obs.wait_job("d1")["status"] == "SUCCEEDED"
            assert agent.active_version == "1.0.0-tuned"
            # the tuned threshold is the live one (no threshold in the agent's config)
            assert agent.client.threshold == pytest.approx(routing["threshold"])
            send_job(
                obs, DEV, "p1", "policy", escalate="background", audit_rate=1.0,
                drift_window=60, drift_max_distance=0.3,
            )  # fmt: skip
            assert obs.wait_job("p1")["status"] == "SUCCEEDED"
            x = np.load(S / "data" / "edge_val.npz")["input"][:60]
            results = []
            for i in range(60):
                r = agent.client.infer({"input": x[i : i + 1]})
                results.append(r)
                assert r.source == "edge"  # background and audits: the local answer, now
                assert r.cloud_future is not None
                r.cloud_future.result(30)  # one at a time: nothing dropped
            reasons = [str(r.reason) for r in results]
            n_bg, n_conf = reasons.count("background"), reasons.count("confident")
            assert n_bg + n_conf == 60
            assert n_bg >= 3
            assert n_conf >= 30
            data = _beat(agent, obs)["data"]
            esc = data["escalation"]
            assert esc["mode"] == "background"
            assert esc["audit_rate"] == 1.0
            assert esc["background_sent"] == esc["background_answered"] == n_bg
            audits = esc["audits"]
            assert audits["sent"] == n_conf == audits["agreed"] + audits["disagreed"]
            assert audits["agreement"] > 0.9
            assert {e["event"] for e in esc["recent"]} == {"background", "audit"}
            assert all(e["source"] == "cloud:near" for e in esc["recent"])
            assert data["drift"]["windows"] == 1
            assert data["drift"]["alarms"] == 0
            # the camera fogs up: noise for a window, edge only so nothing queues
            send_job(obs, DEV, "p2", "policy", mode="edge_only", escalate="sync", audit_rate=0.0)
            assert obs.wait_job("p2")["status"] == "SUCCEEDED"
            rng = np.random.default_rng(0)
            for _ in range(60):
                agent.infer({"input": (rng.random((1, 64)) * 0.25).astype(np.float32)})
            alarm = obs.wait(
                lambda: next((r for r in obs.json_on("/telemetry") if r["kind"] == "drift"), None),
                what="drift alarm",
            )
            assert alarm["data"]["alarm"]
            assert alarm["data"]["distance"] > 0.3
            assert alarm["data"]["version"] == "1.0.0-tuned"
            assert _beat(agent, obs)["data"]["drift"]["alarms"] == 1
            # ... and the fleet controller shows it in the device's telemetry (its HTTP API)
            import httpx

            def fleet_view() -> list[dict[str, Any]] | None:
                recs = httpx.get(f"{http.url}/api/devices/{DEV}/telemetry", timeout=10).json()
                kinds = {r.get("kind") for r in recs}
                return recs if {"drift", "heartbeat"} <= kinds else None

            recs = obs.wait(fleet_view, what="drift in the fleet's telemetry view")
            drift = next(r for r in recs if r["kind"] == "drift")
            assert drift["data"]["alarm"] is True
            assert any("escalation" in r["data"] for r in recs if r["kind"] == "heartbeat")
            # a bad value rejects the whole policy and changes nothing
            send_job(obs, DEV, "p3", "policy", mode="edge_first", audit_rate=0.5, escalate="soon")
            failed = obs.wait_job("p3")
            assert failed["status"] in ("FAILED", "REJECTED")
            assert "escalate must be one of" in str(failed)
            assert agent.client.mode.value == "edge_only"
            assert agent.client.escalation.audit_rate == 0.0
            send_job(obs, DEV, "p3b", "policy", audit_rate=0.5, drift_window=3)
            assert "drift_window must be an integer" in str(obs.wait_job("p3b"))
            assert agent.client.escalation.audit_rate == 0.0
            assert agent.drift.window == 60
            send_job(obs, DEV, "p4", "policy", escalate="background", escalation_rate_limit=3)
            assert obs.wait_job("p4")["status"] == "SUCCEEDED"
        finally:
            agent.stop()
        # the accepted policy survives a restart
        again = Agent(load_config(cfg)).start()
        try:
            esc = again.client.escalation
            assert esc.mode == "background"
            assert esc.limiter is not None
            assert esc.limiter.rate == 3
            assert again.drift.window == 60
            assert again.drift.max_distance == 0.3
        finally:
            again.stop()
