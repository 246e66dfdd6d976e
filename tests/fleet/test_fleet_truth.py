"""The controller's registry against a real broker: reported versions, identity epochs,
validation at the controller, package hashes and versions, and the operator views.

The devices here are plain MQTT clients publishing exactly the messages a test needs (the
real agents are in test_fleet_faults.py); the controller, its HTTP API, the store and the CLI
are the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgecloud.cli.main import main as cli_main
from edgecloud.fleet.controller import FleetController
from edgecloud.fleet.messages import (
    ExecutionState,
    ExecutionUpdate,
    JobNotification,
    ReportedState,
    StatusMessage,
    TelemetryRecord,
    dumps,
)
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.server import FleetHTTPServer
from edgecloud.fleet.store import SqliteFleetStore
from edgecloud.package import pack_package
from edgecloud.topics import Topics
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.fleet_sim import make_package
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.mqtt
T = Topics()
ROOT = Path(__file__).resolve().parents[2]


class Wire:
    """One MQTT client that publishes as any device and records what devices receive."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="wire", protocol=paho.MQTTv5)
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.c.on_message = self._on_message
        ok = threading.Event()
        self.c.on_connect = lambda *a: ok.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ok.wait(5)
        self.c.subscribe([("edgecloud/devices/+/jobs/#", 1)])
        self.seq = 0

    def _on_message(self, c: Any, u: Any, m: paho.MQTTMessage) -> None:
        try:  # the fuzz test's own junk comes back on jobs/+/update
            self.got.append((m.topic, json.loads(m.payload)))
        except ValueError:
            pass

    def pub(self, topic: str, obj: Any, *, retain: bool = False) -> None:
        self.c.publish(topic, dumps(obj), qos=1, retain=retain).wait_for_publish(5)

    def status(self, dev: str, epoch: str = "", version: str = "", group: str = "g") -> None:
        msg = StatusMessage(dev, True, time.time(), group=group, model_version=version, epoch=epoch)
        self.pub(T.status(dev), msg, retain=True)

    def reported(self, dev: str, version: int, model: str | None, epoch: str = "e1") -> None:
        state = {"model": {"name": "digits", "version": model} if model else None}
        self.pub(
            T.shadow_reported(dev),
            ReportedState(version, state, time.time(), epoch=epoch),
            retain=True,
        )

    def update(self, dev: str, job: str, state: ExecutionState, reason: str = "") -> None:
        self.seq += 1
        u = ExecutionUpdate(job, dev, state, self.seq, time.time(), reason)
        self.pub(T.job_update(dev, job), u)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Ctl:
    def __init__(self, broker: MosquittoBroker, tmp: Path, key: Any = None) -> None:
        self.broker, self.tmp, self.key = broker, tmp, key
        self.start()

    def start(self) -> None:
        self.ctl = FleetController(
            self.broker.url,
            SqliteFleetStore(self.tmp / "fleet.sqlite"),
            PackageStore(self.tmp / "packages", self.key),
            tick_interval=0.05,
        )
        self.http = FleetHTTPServer(self.ctl).start()
        self.ctl.start()

    def stop(self) -> None:
        self.http.close()
        self.ctl.close()

    def api(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return httpx.request(method, self.http.url + path, json=body, timeout=10)

    def dev(self, device_id: str) -> dict[str, Any]:
        r = self.api("GET", f"/api/devices/{device_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    from edgecloud.package import generate_keypair

    return generate_keypair(tmp_path / "keys" / "fleet")


@pytest.fixture
def wire(mosquitto: MosquittoBroker) -> Iterator[Wire]:
    w = Wire(mosquitto)
    yield w
    w.close()


@pytest.fixture
def ctl(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[Ctl]:
    c = Ctl(mosquitto, tmp_path)
    yield c
    c.stop()


def test_the_reported_version_wins_over_arrival_order_and_restarts(
    ctl: Ctl, wire: Wire, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    wire.status("d1", "e1", version="5")
    wire.reported("d1", 7, "14")
    wait_until(
        lambda: ctl.ctl.devices.get("d1") is not None and ctl.dev("d1")["model_version"] == "14"
    )
    assert ctl.dev("d1")["model_name"] == "digits"  # from the reported state, no desired needed
    # a status naming another version, and an older reported state arriving late, change nothing
    wire.status("d1", "e1", version="5")
    wire.reported("d1", 6, "13")
    wait_until(lambda: ctl.ctl.stats["stale_reports"] >= 1)
    time.sleep(0.3)
    assert ctl.dev("d1")["model_version"] == "14"
    # the controller restarts; the broker replays the retained (older) copy we just left there
    ctl.stop()
    ctl.start()
    wait_until(lambda: ctl.ctl.connected)
    time.sleep(1.0)
    assert ctl.dev("d1")["model_version"] == "14"
    wire.reported("d1", 8, None)  # the device no longer serves anything
    wait_until(lambda: ctl.dev("d1")["model_version"] == "")


def test_a_reprovisioned_device_starts_a_new_epoch(
    ctl: Ctl, wire: Wire, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wire.status("d2", "0001-a")
    wire.reported("d2", 3, "2.0.0", epoch="0001-a")
    for seq in range(50, 53):
        wire.pub(T.telemetry("d2"), TelemetryRecord("d2", seq, time.time(), epoch="0001-a"))
    wait_until(lambda: ctl.dev("d2")["telemetry_seq"] == 52)
    assert ctl.dev("d2")["model_version"] == "2.0.0"
    # wiped: a new epoch, seq and reported version from 1 again
    wire.status("d2", "0002-b")
    for seq in range(1, 4):
        wire.pub(T.telemetry("d2"), TelemetryRecord("d2", seq, time.time(), epoch="0002-b"))
    wait_until(lambda: ctl.dev("d2")["telemetry_seq"] == 3)
    d = ctl.dev("d2")
    assert d["reprovisioned_at"] is not None
    assert d["counters"]["reprovisioned"] == 1
    assert d["counters"].get("telemetry_duplicates", 0) == 0
    assert d["counters"]["telemetry"] == 6
    assert d["model_version"] == ""  # the registry no longer claims the old installation
    wire.reported("d2", 1, "1.0.0", epoch="0002-b")
    wait_until(lambda: ctl.dev("d2")["model_version"] == "1.0.0")
    # a message of the old epoch still in flight is dropped, not a flip back
    wire.pub(T.telemetry("d2"), TelemetryRecord("d2", 99, time.time(), epoch="0001-a"))
    wait_until(lambda: ctl.ctl.stats["stale_epoch"] == 1)
    assert ctl.dev("d2")["telemetry_seq"] == 3
    assert ctl.dev("d2")["counters"]["reprovisioned"] == 1
    # and the operator sees it
    monkeypatch.setenv("EDGECLOUD_CONTROLLER", ctl.http.url)
    capsys.readouterr()
    assert cli_main(["fleet", "devices", "--status", "reprovisioned", "--json"]) == 0
    assert [d["device_id"] for d in json.loads(capsys.readouterr().out)] == ["d2"]
    assert cli_main(["fleet", "devices"]) == 0
    assert "reprovisioned" in capsys.readouterr().out


def test_the_controller_refuses_what_devices_would_refuse(
    ctl: Ctl,
    wire: Wire,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    keys: tuple[Path, Path],
) -> None:
    wire.status("d3", "e1")
    wait_until(lambda: "d3" in ctl.ctl.devices)
    for body, field in (
        ({"targets": ["d3"], "policy": {"threshold": "high"}}, "threshold"),
        ({"targets": ["d3"], "policy": {"mode": "sideways"}}, "mode"),
        ({"targets": ["d3"], "policy": {"threshold": float("inf")}}, "threshold"),
        ({"targets": ["d3"], "policy": {"regions": "eu"}}, "regions"),
    ):
        r = httpx.post(
            ctl.http.url + "/api/policy",
            content=json.dumps(body, allow_nan=True),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 400, (body, r.text)
        assert field in r.json()["error"]
    r = ctl.api("POST", "/api/devices/d3/shadow", {"desired": {"policy": {"mode": "up"}}})
    assert r.status_code == 400
    assert "desired.policy.mode" in r.json()["error"]
    assert ctl.ctl.shadows.get("d3") is None  # nothing was written
    for opts, field in (
        ({"timeout_s": "0s"}, "timeout_s"),
        ({"timeout_s": "soon"}, "timeout_s"),
        ({"job_timeout_s": -5}, "job_timeout_s"),
        ({"retry": "FAILED:many"}, "FAILED"),
        ({"retry": {"REJECTED": 1}}, "failure type"),
        ({"rollout": {"max_per_minute": 0}}, "max_per_minute"),
    ):
        r = ctl.api("POST", "/api/rollback", {"targets": ["d3"], **opts})
        assert r.status_code == 400, (opts, r.text)
        assert field in r.json()["error"]
    assert ctl.ctl.engine.jobs == {}

    # the CLI: exit 2 and the field named, for the same mistakes and an unknown target
    monkeypatch.setenv("EDGECLOUD_CONTROLLER", ctl.http.url)
    for argv, field in (
        (["policy", "set", "--to", "d3", "--mode", "sideways"], "mode"),
        (["rollback", "--to", "no-such-group"], "no-such-group"),
        (["deploy", str(make_package(tmp_path, "1.0.0", keys)), "--to", "nope"], "nope"),
        (["rollback", "--to", "d3", "--retry", "FAILED:x"], "FAILED"),
        (["rollback", "--to", "d3", "--timeout", "0"], "--timeout"),
        (["rollback", "--to", "d3", "--rate", "fast"], "rate"),
    ):
        capsys.readouterr()
        assert cli_main(["fleet", *argv]) == 2, argv
        assert field in capsys.readouterr().err, argv
    assert ctl.ctl.engine.jobs == {}
    assert cli_main(["fleet", "rollback", "--to", "d3", "--rate", "10/hour", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["rollout"]["max_per_minute"] == pytest.approx(10 / 60)
    assert cli_main(["fleet", "policy", "set", "--to", "d3", "--mode", "edge_only", "--json"]) == 0
    assert ctl.ctl.shadows["d3"].desired["policy"] == {"mode": "edge_only"}


def test_package_ref_carries_the_upload_hash_and_a_refused_signature_frees_the_version(
    ctl: Ctl, wire: Wire, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    wire.status("d4", "e1")
    wait_until(lambda: "d4" in ctl.ctl.devices)
    pkg = make_package(tmp_path, "1.0.0", keys)
    archive = pack_package(str(pkg), str(tmp_path / "up.tar.gz"))  # str paths are fine
    r = httpx.post(ctl.http.url + "/api/packages", content=archive.read_bytes(), timeout=10)
    assert r.status_code == 201, r.text
    uploaded = r.json()
    stored = ctl.ctl.packages.root / "digits" / "1.0.0"
    path_deployed = ctl.ctl.packages.add(make_package(tmp_path / "b", "1.0.1", keys))
    # uploaded and path-given packages get the same permissions
    assert (stored.stat().st_mode & 0o777) == 0o755
    assert ((stored / "manifest.json").stat().st_mode & 0o777) == 0o644
    assert ((path_deployed.archive.parent / "1.0.1").stat().st_mode & 0o777) == 0o755
    # the store is tampered with after the upload: the job still pins the upload's hash
    on_disk = ctl.ctl.packages.root / "digits" / "1.0.0.tar.gz"
    on_disk.write_bytes(on_disk.read_bytes() + b"tampered")
    ref = {"name": "digits", "version": "1.0.0", "sha256": uploaded["sha256"]}
    r = ctl.api("POST", "/api/deploy", {"package_ref": ref, "targets": ["d4"]})
    assert r.status_code == 201, r.text
    assert r.json()["document"]["sha256"] == uploaded["sha256"]
    wrong = {**ref, "sha256": "0" * 64}
    r = ctl.api("POST", "/api/deploy", {"package_ref": wrong, "targets": ["d4"]})
    assert r.status_code == 400
    assert uploaded["sha256"] in r.json()["error"]

    # a badly signed 2.0.0 (the controller has no key to check it): devices refuse it ...
    bad = make_package(tmp_path / "bad", "2.0.0", keys, note="tampered")
    (bad / "manifest.sig").write_bytes((bad / "manifest.sig").read_bytes()[::-1])
    r = ctl.api("POST", "/api/deploy", {"package": str(bad), "targets": ["d4"]})
    assert r.status_code == 201, r.text
    job = r.json()["job_id"]
    wire.update("d4", job, ExecutionState.REJECTED, "verify: signature does not verify")
    wait_until(lambda: ctl.ctl.job_done(job))
    # ... so the real 2.0.0 is not "already in the store with a different manifest"
    good = make_package(tmp_path / "good", "2.0.0", keys)
    r = ctl.api("POST", "/api/deploy", {"package": str(good), "targets": ["d4"]})
    assert r.status_code == 201, r.text
    # while a version no device refused is still immutable
    other = make_package(tmp_path / "other", "2.0.0", keys, note="different")
    r = ctl.api("POST", "/api/deploy", {"package": str(other), "targets": ["d4"]})
    assert r.status_code == 400
    assert "different manifest" in r.json()["error"]


def test_operator_views(
    ctl: Ctl, wire: Wire, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    long_id = "sensor-" + "x" * 60
    wire.status("a1", "e1", group="north")
    wire.reported("a1", 1, "1.0.0")
    wire.status("b2", "e1", group="south")
    wire.reported("b2", 1, "2.0.0")
    wire.status(long_id, "e1", group="south")
    wire.reported(long_id, 1, "2.0.0")
    for dev, req, cloud, degraded in (("a1", 100, 10, 1), ("b2", 100, 30, 3)):
        data = {"requests": req, "cloud": cloud, "degraded": degraded}
        wire.pub(T.telemetry(dev), TelemetryRecord(dev, 1, time.time(), data=data, epoch="e1"))
    wait_until(
        lambda: len(ctl.ctl.devices) == 3 and all(ctl.ctl.telemetry.get(d) for d in ("a1", "b2"))
    )
    job = ctl.ctl.rollback(["south"])
    wait_until(lambda: len([t for t, _ in wire.got if t.endswith("/jobs/notify")]) == 2)
    wire.update("b2", job.job_id, ExecutionState.FAILED, "no previous version")
    wire.update(long_id, job.job_id, ExecutionState.FAILED, "no previous version")
    wait_until(lambda: ctl.ctl.job_done(job.job_id))
    monkeypatch.setenv("EDGECLOUD_CONTROLLER", ctl.http.url)

    def run(*argv: str) -> Any:
        capsys.readouterr()
        assert cli_main(["fleet", *argv]) == 0, argv
        out = capsys.readouterr().out
        return json.loads(out) if "--json" in argv else out

    assert [d["device_id"] for d in run("devices", "--group", "south", "--json")] == [
        "b2",
        long_id,
    ]
    assert [d["device_id"] for d in run("devices", "--version", "1.0.0", "--json")] == ["a1"]
    failing = run("devices", "--status", "failing", "--json")
    assert [d["device_id"] for d in failing] == ["b2", long_id]
    assert failing[0]["last_failure"]["reason"] == "no previous version"
    by_version = run("devices", "--sort", "version", "--json")
    assert [d["model_version"] for d in by_version] == ["1.0.0", "2.0.0", "2.0.0"]
    assert run("devices", "--not-seen-for", "1h", "--json") == []
    assert len(run("devices", "--seen-within", "1h", "--json")) == 3
    table = run("devices")  # not a terminal: full widths, nothing cut
    assert long_id in table
    jobs = run("jobs")
    assert "ALL_FAILED" in jobs
    view = run("status", job.job_id, "--json")
    assert view["outcome"] == "ALL_FAILED"
    assert view["counts"]["FAILED"] == 2
    summary = run("summary", "--json")
    assert summary["online"] == 3
    assert summary["versions"] == {"digits 1.0.0": 1, "digits 2.0.0": 2}
    assert summary["offload_rate"] == pytest.approx(0.2)
    assert summary["degraded_rate"] == pytest.approx(0.02)
    assert [f["device_id"] for f in summary["failing"]] == ["b2", long_id]
    text = run("summary")
    assert "offloaded to the cloud 20.0%" in text
    assert "2 failing devices" in text
    capsys.readouterr()
    assert cli_main(["fleet", "status", job.job_id, "--wait"]) == 1  # every device failed
    out = capsys.readouterr().out
    assert "every device failed" in out
    assert f"{long_id} FAILED: no previous version" in out

    # `fleet devices --json | head -1`: no BrokenPipeError traceback
    p = subprocess.run(
        f"{sys.executable} -m edgecloud fleet devices --json --controller {ctl.http.url} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert p.stdout.strip() == "["
    assert "Traceback" not in p.stderr, p.stderr
    note = next(n for t, n in wire.got if t.endswith("/jobs/notify"))
    assert JobNotification.parse(json.dumps(note)).operation == "rollback"


def test_a_clean_stop_hands_the_lease_over_at_once(
    mosquitto: MosquittoBroker, tmp_path: Path, wire: Wire
) -> None:
    from edgecloud.fleet.controller import NotActive

    def make(name: str) -> FleetController:
        return FleetController(
            mosquitto.url,
            SqliteFleetStore(tmp_path / "shared.sqlite"),
            PackageStore(tmp_path / "packages"),
            tick_interval=0.05,
            public_base_url="http://127.0.0.1:9",
            lease_s=6.0,
            instance_id=name,
        ).start()

    a = make("ctl-a")
    wait_until(lambda: a.active, timeout=10)
    b = make("ctl-b")
    try:
        wire.status("h1", "e1")
        wait_until(lambda: "h1" in a.devices and "h1" in b.devices)
        time.sleep(0.5)
        assert not b.active
        with pytest.raises(NotActive):
            b.rollback(["h1"])
        job = a.rollback(["h1"])
        wait_until(lambda: any(t.endswith("/jobs/notify") for t, _ in wire.got))
        wire.update("h1", job.job_id, ExecutionState.IN_PROGRESS)
        stopped = time.monotonic()
        a.close()
        wait_until(lambda: b.active, timeout=5, what="b active after a clean stop")
        assert time.monotonic() - stopped < 6.0  # well before the lease would have expired
        # b finished what a started, from the database and its buffered updates
        wire.update("h1", job.job_id, ExecutionState.SUCCEEDED)
        wait_until(lambda: b.job_done(job.job_id), what="job done on b")
        assert b.execution(job.job_id, "h1").state == ExecutionState.SUCCEEDED
    finally:
        b.close()


# -- seeded property and fuzz tests against the real controller ---------------------------------
def test_property_the_highest_reported_version_wins_in_any_arrival_order(
    ctl: Ctl, wire: Wire
) -> None:
    import random

    rng = random.Random(1313)
    expected: dict[str, str] = {}
    msgs: list[tuple[str, int, str]] = []
    for i in range(12):
        dev = f"p{i}"
        versions = rng.sample(range(1, 40), rng.randint(1, 8))
        models = {v: f"{rng.randint(1, 20)}.0.0" for v in versions}
        expected[dev] = models[max(versions)]
        msgs += [(dev, v, models[v]) for v in versions]
    rng.shuffle(msgs)
    for dev, v, model in msgs:
        wire.reported(dev, v, model)
    wait_until(
        lambda: all(
            (d := ctl.ctl.devices.get(dev)) is not None and d.model_version == want
            for dev, want in expected.items()
        ),
        timeout=30,
        what="every device on its highest reported version",
    )
    time.sleep(0.5)
    assert {dev: ctl.ctl.devices[dev].model_version for dev in expected} == expected


def _junk(rng: Any, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**63, 10**400 // 10**399, 3])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("nan"), float("inf")])
    if kind == 4:
        return rng.choice(["", "x", "IN_PROGRESS", "SUCCEEDED", "edge_first", "a" * 300, "é/+#"])
    if kind == 5:
        return rng.choice(["FAILED:2", "10/hour", "0s", "90s", "TIMED_OUT:99", "lab"])
    if kind == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = [
        "job_id",
        "device_id",
        "status",
        "seq",
        "ts",
        "version",
        "state",
        "model",
        "policy",
        "mode",
        "threshold",
        "targets",
        "retry",
        "timeout_s",
        "epoch",
        "online",
        "data",
        "execution_number",
        "details",
        "desired",
        "package_ref",
        "rollout",
        "abort",
    ]
    return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_fuzzed_device_messages_and_api_bodies_never_break_the_controller(
    ctl: Ctl, wire: Wire
) -> None:
    import random

    rng = random.Random(2026)
    wire.status("f1", "e1")
    wait_until(lambda: "f1" in ctl.ctl.devices)
    topics = [
        T.status("f1"),
        T.shadow_reported("f1"),
        T.job_update("f1", "j1"),
        T.telemetry("f1"),
        T.status("f2"),
    ]
    for _ in range(300):
        obj = _junk(rng)
        raw = json.dumps(obj, allow_nan=True).encode()
        if rng.random() < 0.2:
            raw = raw[: rng.randrange(len(raw) + 1)]  # truncated
        wire.c.publish(rng.choice(topics), raw, qos=1).wait_for_publish(5)
    paths = [
        "/api/policy",
        "/api/deploy",
        "/api/rollback",
        "/api/jobs/j1/cancel",
        "/api/devices/f1/shadow",
        "/api/packages",
    ]
    with httpx.Client(base_url=ctl.http.url, timeout=10) as http:
        for _ in range(300):
            body = _junk(rng)
            if isinstance(body, dict) and rng.random() < 0.6:
                body.setdefault("targets", rng.choice([["f1"], ["nope"], "f1", []]))
            r = http.post(
                rng.choice(paths),
                content=json.dumps(body, allow_nan=True).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code < 500, (body, r.status_code, r.text)
            if r.status_code >= 400:
                assert r.json()["error"], body
        health = http.get("/api/health").json()
    assert health["ok"]
    assert health["connected"]
    assert ctl.ctl.stats["malformed"] > 0
    # and it still reads the truth from a well-formed message after all that
    wire.reported("f1", 10**6, "9.9.9", epoch=ctl.ctl.devices["f1"].epoch or "e1")
    wait_until(lambda: ctl.dev("f1")["model_version"] == "9.9.9", what="a valid report applied")
