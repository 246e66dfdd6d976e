"""The README's main job: ``edgecloud demo`` end to end, with real regions, broker and runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.broker import mosquitto_binary


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["mqtt", "http"])
def test_demo_runs_end_to_end(tmp_path: Path, transport: str) -> None:
    if transport == "mqtt" and mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; ./dev.sh test installs it")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "edgecloud", "demo", "--out", str(out), "--json"]
    if transport == "http":
        cmd.append("--no-mqtt")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])

    assert report["regions"]["transport_near"] == transport
    assert report["samples"] == 360
    kept = {row["name"] for row in report["conversion"] if row["verdict"] == "accepted"}
    assert "int8_static" in kept or "fp16" in kept

    edge, cloud, hybrid = report["edge_only"], report["cloud_only"], report["hybrid"]
    assert edge["sources"] == {"edge": 360}
    assert cloud["sources"] == {"cloud:near": 360}
    assert cloud["accuracy"] > edge["accuracy"] + 0.03
    # The cascade earns most of the cloud's accuracy while answering most requests locally.
    assert hybrid["accuracy"] >= cloud["accuracy"] - 0.01
    assert 0.05 < hybrid["offloaded"] < 0.6
    assert hybrid["errors"] == 0

    # Near region stopped mid-run: the far one answers; nothing raises.
    after = report["failover"]["after"]
    assert after["sources"].get("cloud:far", 0) > 0
    assert after["errors"] == 0
    assert "cloud:near" not in after["sources"]

    # Both stopped: every low-confidence request gets the local answer, marked degraded.
    down = report["all_down"]
    assert down["errors"] == 0
    assert down["sources"] == {"edge": 360}
    assert down["degraded"] == hybrid["sources"].get("cloud:near", 0)
    assert set(down["reasons"]) <= {"confident", "cloud_failed", "deadline"}

    assert Path(report["plot"]).stat().st_size > 10_000
    assert [row["threshold"] for row in report["sweep"]] == sorted(
        row["threshold"] for row in report["sweep"]
    )


def test_demo_refuses_a_bad_threshold(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecloud",
            "demo",
            "--out",
            str(tmp_path / "d"),
            "--threshold",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "--threshold must be in (0, 1)" in r.stderr
