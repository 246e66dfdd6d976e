"""End to end: a package that was only converted (never tuned) raises the drift alarm.

Real parts: ``convert`` of samples/models/digits_edge.onnx with the labelled sample data,
signed and packed; a device agent in this process deploying it from a fleet job over a real
Mosquitto broker; the telemetry read back off that broker. In-distribution rows the reference
never saw (the calibration file) close a window without an alarm; the same digits under heavy
noise close the next one with a ``drift`` record naming the variant's own reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters import ConvertOptions, convert
from device_agent.agent import Agent
from device_agent.config import load_config
from edgecloud.package import pack_package
from tests.fixtures.agent_util import ROOT, Keys, Observer, send_job, write_config
from tests.fixtures.broker import MosquittoBroker

pytestmark = pytest.mark.mqtt
DEV = "dev-convert-drift"
S = ROOT / "samples"
WINDOW = 100


def _telemetry(obs: Observer, kind: str) -> list[dict[str, Any]]:
    return [r for r in obs.json_on("/telemetry") if r.get("kind") == kind]


def test_a_converted_package_gives_the_agent_its_drift_signal(
    tmp_path: Path, mosquitto: MosquittoBroker, request: pytest.FixtureRequest
) -> None:
    keys = Keys(tmp_path)
    rep = convert(
        S / "models/digits_edge.onnx",
        tmp_path / "pkg",
        ConvertOptions(
            int8=("static",),
            calib=S / "data/edge_calib.npz",
            val=S / "data/edge_val.npz",
            latency_runs=3,
            version="2.0.0",
            sign=keys.private,
        ),
    )
    assert rep.manifest is not None
    assert set(rep.manifest.routing["references"]) == {"fp32", "int8_static"}
    assert "curve" not in rep.manifest.routing  # not tuned: convert's routing only
    archive = pack_package(tmp_path / "pkg", tmp_path / "pkg.tar.gz")
    obs = Observer(mosquitto.host, mosquitto.port)
    request.addfinalizer(obs.close)
    cfg = write_config(
        tmp_path / "agent.toml",
        device=DEV,
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
    )
    agent = Agent(load_config(cfg)).start()
    try:
        obs.wait(lambda: agent.connected or None, what="agent subscribed to its jobs")
        send_job(obs, DEV, "d1", "deploy", package_url=archive.as_uri())
        assert obs.wait_job("d1")["status"] == "SUCCEEDED"
        assert agent.active_version == "2.0.0"
        send_job(obs, DEV, "p1", "policy", drift_window=WINDOW)
        assert obs.wait_job("p1")["status"] == "SUCCEEDED"
        variant = agent.client.metrics.variant
        assert variant is not None
        own = f"routing.references.{variant['name']}"
        # digits the reference never saw, from the same distribution: no alarm
        x = np.load(S / "data/edge_calib.npz")["input"]
        for i in range(WINDOW):
            agent.infer({"input": x[i : i + 1]})
        seq = agent.heartbeat()
        beat = obs.wait(
            lambda: next((r for r in _telemetry(obs, "heartbeat") if r["seq"] == seq), None),
            what="heartbeat after the in-distribution window",
        )
        drift = beat["data"]["drift"]
        assert drift["windows"] == 1
        assert drift["alarms"] == 0
        assert drift["reference"] == own
        assert drift["last"]["alarm"] is False
        assert drift["last"]["distance"] <= 0.25
        assert _telemetry(obs, "drift") == []  # telemetry goes out in order: none before it
        # the camera fogs up: the same digits under heavy noise for one window
        rng = np.random.default_rng(0)
        noisy = np.clip(x[:WINDOW] + rng.normal(0.0, 0.5, x[:WINDOW].shape), 0, 1)
        for i in range(WINDOW):
            agent.infer({"input": noisy[i : i + 1].astype(np.float32)})
        alarm = obs.wait(
            lambda: next(iter(_telemetry(obs, "drift")), None), what="a drift telemetry record"
        )["data"]
        assert alarm["alarm"] is True
        assert alarm["version"] == "2.0.0"
        assert alarm["variant"] == variant["name"]
        assert alarm["reference"] == own
        assert alarm["window"] == WINDOW
        ref = rep.manifest.routing["references"][variant["name"]]
        assert alarm["reference_offload"] == pytest.approx(ref["offload"], abs=1e-4)
        assert alarm["distance"] > 0.25 or alarm["offload_shift"] > 0.15
        assert alarm["offload"] > ref["offload"] + 0.15  # unsure answers are not given locally
    finally:
        agent.stop()
