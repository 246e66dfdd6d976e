"""The API endpoints the fleet console added, and how the controller serves the console's files.

Against the real controller and its HTTP server, with devices on a real Mosquitto publishing
telemetry whose figures the test chose, so every number on the routing page is checked exactly.
The browser itself is exercised in ``test_console_browser.py``.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgecloud.client import HybridResult
from edgecloud.errors import TransportError
from edgecloud.fleet.controller import FleetController
from edgecloud.fleet.messages import TelemetryRecord, dumps
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.server import FleetHTTPServer
from edgecloud.fleet.store import SqliteFleetStore
from edgecloud.package import generate_keypair
from edgecloud.routing.modes import Reason
from edgecloud.topics import Topics
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.fleet_sim import Fleet, SimDevice, devices, make_package
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.mqtt
T = Topics("edgecloud")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys" / "fleet")


@pytest.fixture
def fleet(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    ctl = FleetController(
        mosquitto.url,
        SqliteFleetStore(tmp_path / "fleet.sqlite"),
        PackageStore(tmp_path / "packages"),
        tick_interval=0.05,
    )
    http = FleetHTTPServer(ctl).start()
    ctl.start()
    try:
        yield Fleet(ctl, http)
    finally:
        http.close()
        ctl.close()


def publish(dev: SimDevice, ts: float, data: dict[str, Any]) -> None:
    """One heartbeat with the given figures and timestamp (the agent's telemetry format)."""
    assert dev._client is not None
    rec = TelemetryRecord(dev.device_id, dev.telemetry_seq, ts, "heartbeat", data)
    dev._client.publish(T.telemetry(dev.device_id), dumps(rec), qos=1).wait_for_publish(5)
    dev.telemetry_seq += 1


def beat(
    requests: int, cloud: int, degraded: int, regions: dict[str, tuple[int, int, str]]
) -> dict[str, Any]:
    return {
        "requests": requests,
        "edge": requests - cloud - degraded,
        "cloud": cloud,
        "degraded": degraded,
        "regions": {
            name: {
                "state": state,
                "requests": att,
                "failures": fail,
                "latency": {"p50_ms": 20.0, "p95_ms": 40.0},
                "last_error": "connection refused" if fail else None,
            }
            for name, (att, fail, state) in regions.items()
        },
        "variant": {"name": "int8_static", "precision": "int8", "format": "onnx"},
    }


def test_routing_sums_counter_deltas_per_group_and_flags_the_failing_region(
    fleet: Fleet, mosquitto: MosquittoBroker
) -> None:
    a, b = devices(mosquitto, 2, group="shop")
    c = SimDevice(mosquitto, "lone", group="depot").connect()
    now = time.time()
    # a: 100 requests in 20 s, 30 to the cloud; "near" answers, "far" fails every attempt
    publish(a, now - 25, beat(0, 0, 0, {"near": (0, 0, "closed"), "far": (0, 0, "closed")}))
    publish(a, now - 15, beat(40, 10, 0, {"near": (10, 0, "closed"), "far": (5, 5, "closed")}))
    publish(a, now - 5, beat(100, 30, 2, {"near": (30, 0, "closed"), "far": (9, 9, "open")}))
    # b restarted between its heartbeats: counters went down, that interval is skipped
    publish(b, now - 20, beat(500, 100, 0, {"near": (100, 0, "closed")}))
    publish(b, now - 10, beat(10, 5, 0, {"near": (5, 0, "closed")}))
    publish(b, now - 4, beat(30, 15, 0, {"near": (15, 0, "closed")}))
    publish(c, now - 10, beat(0, 0, 0, {}))
    publish(c, now - 3, beat(8, 0, 8, {}))  # no region at all: all 8 degraded
    wait_until(
        lambda: sum(d.counters.get("telemetry", 0) for d in fleet.ctl.devices.values()) == 8,
        what="telemetry",
    )
    r = fleet.api("GET", "/api/routing?window=60&step=10")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["step_s"] == 10
    assert len(view["groups"][0]["series"]) == 6
    groups = {g["group"]: g for g in view["groups"]}
    assert sorted(groups) == ["depot", "shop"]
    shop = groups["shop"]
    assert sorted(shop["devices"]) == ["dev-0", "dev-1"]
    assert shop["online"] == 2
    assert shop["requests"] == 100 + 20  # a's 100, b's 20 after its restart
    assert shop["offload"] == pytest.approx((30 + 10) / 120)
    assert shop["degraded_rate"] == pytest.approx(2 / 120)
    regions = {x["name"]: x for x in shop["regions"]}
    assert regions["far"]["failing"] is True
    assert regions["far"]["requests"] == 9
    assert regions["far"]["failures"] == 9
    assert regions["far"]["state"] == "open"
    assert regions["far"]["last_error"] == "connection refused"
    assert regions["near"]["failing"] is False
    assert regions["near"]["requests"] == 30 + 10
    lat = [p["p50_ms"] for p in regions["near"]["series"] if p.get("p50_ms") is not None]
    assert lat
    assert set(lat) == {20.0}
    assert all(p.get("p50_ms") is None for p in regions["far"]["series"])  # never answered
    depot = groups["depot"]
    assert depot["degraded_rate"] == 1.0
    assert depot["regions"] == []
    # the series add up to the totals and every point sits inside the window
    assert sum(p["requests"] for p in shop["series"]) == shop["requests"]
    assert all(
        view["now"] - view["window_s"] < p["t"] <= view["now"] + 1e-6 for p in shop["series"]
    )


def test_device_jobs_and_latest_telemetry(
    fleet: Fleet, mosquitto: MosquittoBroker, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    good = SimDevice(mosquitto, "good").connect()
    bad = SimDevice(mosquitto, "bad", behaviour="reject").connect()
    wait_until(lambda: len(fleet.ctl.devices) == 2, what="devices")
    for dev in (good, bad):
        publish(dev, time.time(), beat(3, 1, 0, {}))
        publish(dev, time.time(), beat(5, 2, 0, {}))
    job = fleet.ctl.deploy(make_package(tmp_path, "2.0.0", keys), ["good", "bad"])
    wait_until(lambda: fleet.ctl.job_done(job.job_id), what="job")
    first = fleet.ctl.rollback(["bad"])
    wait_until(lambda: fleet.ctl.job_done(first.job_id), what="rollback")

    r = fleet.api("GET", "/api/devices/bad/jobs")
    assert r.status_code == 200
    execs = r.json()
    assert [(e["job_id"], e["state"]) for e in execs] == [
        (first.job_id, "REJECTED"),
        (job.job_id, "REJECTED"),
    ]  # newest first
    assert execs[1]["reason"] == "signature does not verify"
    assert execs[1]["operation"] == "deploy"
    assert execs[1]["version"] == "2.0.0"
    assert execs[0]["operation"] == "rollback"
    only = fleet.api("GET", "/api/devices/good/jobs").json()
    assert [(e["job_id"], e["state"]) for e in only] == [(job.job_id, "SUCCEEDED")]

    wait_until(
        lambda: all(d.counters.get("telemetry", 0) == 2 for d in fleet.ctl.devices.values()),
        what="telemetry",
    )
    latest = fleet.api("GET", "/api/telemetry/latest").json()
    assert sorted(latest) == ["bad", "good"]
    assert latest["good"]["seq"] == 1
    assert latest["good"]["data"]["requests"] == 5
    assert latest["good"]["data"]["variant"]["precision"] == "int8"

    missing = fleet.api("GET", "/api/devices/nobody/jobs")
    assert missing.status_code == 404
    assert "nobody" in missing.json()["error"]


@pytest.fixture
def guarded(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[FleetHTTPServer]:
    ctl = FleetController(
        mosquitto.url, SqliteFleetStore(tmp_path / "f.sqlite"), PackageStore(tmp_path / "p")
    )
    http = FleetHTTPServer(ctl, token="s3cret").start()
    ctl.start()
    try:
        yield http
    finally:
        http.close()
        ctl.close()


def test_console_files_are_open_and_its_data_needs_the_token(guarded: FleetHTTPServer) -> None:
    url = guarded.url
    with httpx.Client(base_url=url, timeout=5) as c:
        root = c.get("/")
        assert root.status_code == 302
        assert root.headers["location"] == "/console/"
        page = c.get("/console/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp
        assert "script-src 'self'" in csp
        assert "http" not in page.text.lower().replace("http-equiv", "")  # no external asset
        for name, ctype in (("console.js", "text/javascript"), ("console.css", "text/css")):
            r = c.get(f"/console/{name}")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith(ctype)
            assert "://" not in r.text.replace("http://www.w3.org/2000/svg", "")
        assert c.get("/console/../server.py").status_code == 404
        assert c.get("/console/nope.js").status_code == 404
        for path in ("/api/routing", "/api/telemetry/latest", "/api/devices/x/jobs"):
            assert c.get(path).status_code == 401
        ok = c.get("/api/routing", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert ok.json()["groups"] == []


def test_console_routes_fuzzed_never_answer_5xx(fleet: Fleet, mosquitto: MosquittoBroker) -> None:
    """A seeded generator of hostile query strings and paths against the real server."""
    dev = SimDevice(mosquitto, "fz").connect()
    publish(dev, time.time() - 5, beat(1, 0, 0, {"r": (1, 1, "open")}))
    publish(dev, time.time(), {"requests": "many", "regions": ["not", "a", "map"]})
    publish(dev, time.time(), {"regions": {"r": {"requests": None, "failures": -3}}})
    wait_until(
        lambda: (
            (d := fleet.ctl.devices.get("fz")) is not None and d.counters.get("telemetry", 0) == 3
        ),
        what="fz registered with 3 telemetry records",
    )
    rng = random.Random(16)
    junk = string.ascii_letters + string.digits + "%&=?/.-_~:;+ #\x7f"
    values = ["", "0", "-1", "9", "10", "1e309", "nan", "inf", "-inf", "86400", "86401", "1e-9"]
    with httpx.Client(base_url=fleet.http.url, timeout=10) as c:
        for _ in range(300):
            kind = rng.randrange(4)
            if kind == 0:
                w = rng.choice([*values, "".join(rng.choices(junk, k=rng.randrange(8)))])
                s = rng.choice(values)
                path = f"/api/routing?window={w}&step={s}"
            elif kind == 1:
                path = "/console/" + "".join(rng.choices(junk, k=rng.randrange(1, 20)))
            elif kind == 2:
                path = (
                    "/api/devices/" + "".join(rng.choices(junk, k=rng.randrange(1, 12))) + "/jobs"
                )
            else:
                path = "/api/telemetry/" + "".join(rng.choices(junk, k=rng.randrange(0, 8)))
            try:
                r = c.get(path)
            except httpx.InvalidURL:
                continue
            assert r.status_code in (200, 302, 400, 404), (path, r.status_code, r.text)
            if r.status_code in (400, 404):
                assert r.json()["error"], path
    bad = fleet.api("GET", "/api/routing?window=5")
    assert bad.status_code == 400
    assert "'window' must be between 10 and 86400" in bad.json()["error"]
    junky = fleet.api("GET", "/api/routing?window=60").json()
    assert [g["group"] for g in junky["groups"]] == ["edge"]  # malformed figures skipped


def test_agent_metrics_report_p95_local_latency_regions_and_variant() -> None:
    from device_agent.serving import Metrics

    m = Metrics(window=100)
    m.regions_source = lambda: [
        {"name": "near", "state": "closed", "rtt_ms": 3.0, "requests": 4, "failures": 1}
    ]
    m.variant = {"name": "int8_static", "precision": "int8", "format": "onnx"}
    out = {"y": np.zeros((1, 2), np.float32)}
    for i in range(1, 101):
        m.observe("edge", 0.95, i / 1000)
        m.observe_result(HybridResult(out, "edge", Reason.CONFIDENT, local_time=i / 1000))
    for i in range(3):  # answered first time: counted for near's latency
        r = HybridResult(out, "cloud:near", Reason.LOW_CONFIDENCE, cloud_time=0.01 * (i + 1))
        m.observe_result(r)
    failover = HybridResult(out, "cloud:near", Reason.LOW_CONFIDENCE, cloud_time=5.0)
    failover.errors["far"] = TransportError("refused")
    m.observe_result(failover)  # waited for "far" first: not near's latency
    snap = m.snapshot()
    assert snap["latency"]["p95_ms"] == pytest.approx(96.0)
    assert snap["latency"]["p50_ms"] == pytest.approx(51.0)
    assert snap["local_latency"] == {"p50_ms": pytest.approx(51.0), "p95_ms": pytest.approx(96.0)}
    near = snap["regions"]["near"]
    assert near["state"] == "closed"
    assert near["requests"] == 4
    assert near["failures"] == 1
    assert near["latency"]["p50_ms"] == pytest.approx(20.0)
    assert near["latency"]["p95_ms"] == pytest.approx(30.0)
    assert snap["variant"]["precision"] == "int8"


def test_fleet_serve_prints_and_serves_the_console(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from tests.fixtures.broker import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgecloud",
            "fleet",
            "serve",
            "--broker",
            mosquitto.url,
            "--db",
            str(tmp_path / "f.sqlite"),
            "--packages",
            str(tmp_path / "p"),
            "--http-port",
            str(port),
            "--token",
            "t0k",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode() for _ in range(2)]
        assert lines[1].startswith(f"fleet console: http://127.0.0.1:{port}/console/"), lines
        page = httpx.get(f"http://127.0.0.1:{port}/console/", timeout=5)
        assert page.status_code == 200
        assert '<script src="console.js"' in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/api/routing", timeout=5).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
