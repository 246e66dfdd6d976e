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
    # Every request is answered by the cloud, the near region first; on a loaded machine a request
    # that misses the near region's deadline fails over to the far one, which is the design, not a
    # fault, so only the preference is asserted, not that no request was ever slow.
    assert sum(n for src, n in cloud["sources"].items() if src.startswith("cloud:")) == 360
    assert cloud["sources"].get("cloud:near", 0) >= 0.9 * 360
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
    offloaded = sum(n for src, n in hybrid["sources"].items() if src.startswith("cloud:"))
    assert down["degraded"] == offloaded
    assert set(down["reasons"]) <= {"confident", "cloud_failed", "deadline"}

    # The fleet console (its own controller and broker) saw the demo's device and its routing,
    # through the API calls the page makes.
    con = report["console"]
    assert con["url"].startswith("http://127.0.0.1:")
    assert con["url"].endswith("/console/")
    assert [(d["device_id"], d["model_version"], d["online"]) for d in con["devices"]] == [
        ("demo-device", "1", True)
    ]
    (group,) = con["routing"]
    assert group["group"] == "demo"
    assert group["requests"] > 360
    assert 0.05 < group["offload"] < 0.9
    regions = {r["name"]: r for r in group["regions"]}
    assert set(regions) == {"near", "far"}
    assert regions["near"]["requests"] > 0
    assert regions["near"]["failing"]  # stopped in step 4, its circuit open since
    assert regions["near"]["state"] == "open"

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


def test_demo_console_that_cannot_start_is_reported_not_fatal(tmp_path: Path) -> None:
    """A console whose port is taken is switched off with a note; the demo goes on without."""
    import argparse
    import io
    import socket

    from rich.console import Console

    from edgecloud.cli.demo import _open_console

    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed; ./dev.sh test installs it")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        buf = io.StringIO()
        args = argparse.Namespace(no_console=False, console_port=port)
        dc, procs = _open_console(args, tmp_path, Console(file=buf, width=200))
    assert (dc, procs) == (None, None)
    assert "fleet console: off" in buf.getvalue()
    assert f"127.0.0.1:{port}" in buf.getvalue()
    off = argparse.Namespace(no_console=True, console_port=0)
    assert _open_console(off, tmp_path, Console(file=io.StringIO())) == (None, None)
