"""The fleet controller over a real Mosquitto and real HTTP, with small simulated devices.

``SimDevice`` is a paho client that behaves like the device agent does on the wire (last will,
retained online status, reported state, job updates with a seq, telemetry): it lets these tests
drive every corner of a rollout (rejections, a device that dies mid-update, one that is offline)
that real agents cannot be made to hit on demand. test_fleet_e2e.py runs the real agents.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgecloud.cli.main import main as cli_main
from edgecloud.errors import FleetError
from edgecloud.fleet.controller import FleetController
from edgecloud.fleet.messages import (
    ExecutionState,
    ReportedState,
    TelemetryRecord,
    dumps,
)
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.server import FleetHTTPServer, parse_range
from edgecloud.fleet.store import ShadowConflict, SqliteFleetStore
from edgecloud.package import (
    generate_keypair,
)
from edgecloud.topics import Topics
from tests.fixtures.bench import run_benchmark
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.fleet_sim import Fleet, SimDevice, devices, make_package
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.mqtt

T = Topics()
ROOT = Path(__file__).resolve().parents[2]
EDGE_MODEL = ROOT / "samples" / "models" / "digits_edge.onnx"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys" / "fleet")


@pytest.fixture
def fleet(mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    store = SqliteFleetStore(tmp_path / "fleet.sqlite")
    ctl = FleetController(
        mosquitto.url, store, PackageStore(tmp_path / "packages"), tick_interval=0.05
    )
    http = FleetHTTPServer(ctl).start()
    ctl.start()
    try:
        yield Fleet(ctl, http)
    finally:
        http.close()
        ctl.close()


def test_registry_tracks_status_reported_and_telemetry(
    fleet: Fleet, mosquitto: MosquittoBroker
) -> None:
    a, b = devices(mosquitto, 2)
    wait_until(
        lambda: (
            len(fleet.ctl.devices) == 2
            and all(d.online and d.model_version == "1.0.0" for d in fleet.ctl.devices.values())
        ),
        what="two devices online",
    )
    a.telemetry(5)
    wait_until(lambda: fleet.ctl.devices["dev-0"].counters.get("telemetry") == 5)
    recs = fleet.api("GET", "/api/devices/dev-0/telemetry?after=1").json()
    assert [r["seq"] for r in recs] == [2, 3, 4]
    # a redelivered record is counted as a duplicate, never twice
    c = a._client
    assert c is not None
    c.publish(T.telemetry("dev-0"), dumps(TelemetryRecord("dev-0", 3, time.time())), qos=1)
    wait_until(lambda: fleet.ctl.devices["dev-0"].counters.get("telemetry_duplicates") == 1)
    assert fleet.ctl.devices["dev-0"].counters["telemetry"] == 5
    # a malformed payload is dropped and counted, and the controller keeps going
    c.publish(T.telemetry("dev-0"), b"{not json", qos=1)
    c.publish(T.status("dev-0"), b'{"device_id": "dev-0"}', qos=1)
    wait_until(lambda: fleet.ctl.stats["malformed"] == 2)
    b.kill()  # the broker publishes its last will
    wait_until(lambda: not fleet.ctl.devices["dev-1"].online, what="last will")
    devs = {d["device_id"]: d for d in fleet.api("GET", "/api/devices").json()}
    assert devs["dev-0"]["online"]
    assert not devs["dev-1"]["online"]
    assert devs["dev-0"]["group"] == "edge"
    metrics = httpx.get(fleet.http.url + "/metrics", timeout=10).text
    assert 'edgecloud_fleet_devices{online="true"} 1' in metrics
    assert 'edgecloud_fleet_devices{online="false"} 1' in metrics
    assert 'edgecloud_fleet_messages_total{outcome="malformed"} 2' in metrics
    assert 'edgecloud_fleet_telemetry_records_total{outcome="duplicate"} 1' in metrics
    assert "edgecloud_fleet_broker_connected 1" in metrics
    a.disconnect()


def test_deploy_all_succeeded(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    sims = devices(mosquitto, 4)
    wait_until(lambda: sum(d.online for d in fleet.ctl.devices.values()) == 4)
    pkg = make_package(tmp_path, "2.0.0", keys)
    r = fleet.api("POST", "/api/deploy", {"package": str(pkg), "targets": ["edge"]})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["total"] == 4
    wait_until(lambda: fleet.ctl.job_done(job["job_id"]), what="job done")
    view = fleet.api("GET", f"/api/jobs/{job['job_id']}").json()
    assert view["status"] == "COMPLETED"
    assert view["counts"]["SUCCEEDED"] == 4
    note = sims[0].notifications[0]
    assert note.document["version"] == "2.0.0"
    assert note.document["package_url"].startswith(fleet.http.url + "/packages/digits/2.0.0")
    wait_until(lambda: all(d.model_version == "2.0.0" for d in fleet.ctl.devices.values()))
    # the notified URL serves exactly the archive whose sha256 the document names
    import hashlib

    blob = httpx.get(note.document["package_url"], timeout=10).content
    assert hashlib.sha256(blob).hexdigest() == note.document["sha256"]
    # re-adding the identical package is fine; the same version with other content is refused
    pkg2 = make_package(tmp_path / "other", "2.0.0", keys, note="rebuilt")
    r = fleet.api("POST", "/api/deploy", {"package": str(pkg2), "targets": ["edge"]})
    assert r.status_code == 400
    assert "different manifest" in r.json()["error"]
    for s in sims:
        s.disconnect()


def test_rejections_trip_abort_criteria(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    sims = devices(mosquitto, 6, behaviour="reject")
    wait_until(lambda: sum(d.online for d in fleet.ctl.devices.values()) == 6)
    pkg = make_package(tmp_path, "3.0.0", keys)
    body = {
        "package": str(pkg),
        "targets": ["edge"],
        "rollout": {"max_per_minute": 600},  # one every 0.1 s
        "abort": [{"failure_type": "REJECTED", "threshold_percent": 50, "min_executed": 2}],
    }
    job = fleet.api("POST", "/api/deploy", body).json()
    wait_until(lambda: fleet.ctl.job_done(job["job_id"]))
    time.sleep(0.3)
    view = fleet.api("GET", f"/api/jobs/{job['job_id']}").json()
    assert view["status"] == "CANCELED"
    assert view["reason"].startswith("aborted")
    n = view["counts"]
    assert n["REJECTED"] >= 2
    assert n["CANCELED"] >= 3
    assert n["REJECTED"] + n["CANCELED"] + n["QUEUED"] + n["IN_PROGRESS"] == 6
    notified = sum(len(s.notifications) for s in sims)
    assert notified == 6 - n["CANCELED"]  # canceled executions were never sent
    reasons = {e["reason"] for e in view["executions"] if e["state"] == "REJECTED"}
    assert reasons == {"signature does not verify"}
    for s in sims:
        s.disconnect()


def test_offline_device_stays_queued_then_runs(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    a, b = devices(mosquitto, 2)
    wait_until(lambda: sum(d.online for d in fleet.ctl.devices.values()) == 2)
    b.disconnect()
    wait_until(lambda: not fleet.ctl.devices["dev-1"].online)
    job = fleet.ctl.deploy(make_package(tmp_path, "2.0.0", keys), ["edge"])
    wait_until(
        lambda: (
            (ex := fleet.ctl.execution(job.job_id, "dev-0")) is not None
            and ex.state == ExecutionState.SUCCEEDED
        )
    )
    time.sleep(0.3)
    ex_b = fleet.ctl.execution(job.job_id, "dev-1")
    assert ex_b is not None
    assert ex_b.state == ExecutionState.QUEUED
    assert ex_b.sent_at is None
    assert b.notifications == []
    b.connect()
    wait_until(lambda: fleet.ctl.job_done(job.job_id), what="offline device ran the job")
    assert fleet.ctl.job_view(job.job_id)["counts"]["SUCCEEDED"] == 2
    assert len(b.notifications) == 1
    a.disconnect()
    b.disconnect()


def test_device_dying_in_progress_times_out_and_next_job_runs(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    (a,) = devices(mosquitto, 1, behaviour="hang")
    wait_until(
        lambda: fleet.ctl.devices.get("dev-0") is not None and fleet.ctl.devices["dev-0"].online
    )
    job = fleet.ctl.deploy(make_package(tmp_path, "2.0.0", keys), ["dev-0"], timeout_s=1.0)
    job2 = fleet.ctl.rollback(["dev-0"])
    wait_until(
        lambda: (
            (ex := fleet.ctl.execution(job.job_id, "dev-0")) is not None
            and ex.state == ExecutionState.IN_PROGRESS
        )
    )
    a.kill()
    wait_until(lambda: fleet.ctl.job_done(job.job_id), timeout=15)
    ex = fleet.ctl.execution(job.job_id, "dev-0")
    assert ex is not None
    assert ex.state == ExecutionState.TIMED_OUT
    assert "in-progress timeout" in ex.reason
    # the second job was waiting for the device, not for the dead execution
    a.behaviour = "succeed"
    a.connect()
    wait_until(lambda: fleet.ctl.job_done(job2.job_id), timeout=15)
    assert fleet.ctl.job_view(job2.job_id)["counts"]["SUCCEEDED"] == 1
    assert [n.job_id for n in a.notifications] == [job.job_id, job2.job_id]
    a.disconnect()


def test_shadow_optimistic_concurrency(fleet: Fleet, mosquitto: MosquittoBroker) -> None:
    (a,) = devices(mosquitto, 1)
    wait_until(lambda: "dev-0" in fleet.ctl.devices)
    r = fleet.api(
        "POST",
        "/api/devices/dev-0/shadow",
        {"desired": {"policy": {"threshold": 0.7}}, "expected_version": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    # a second writer still based on version 0 is refused
    r = fleet.api(
        "POST",
        "/api/devices/dev-0/shadow",
        {"desired": {"policy": {"threshold": 0.9}}, "expected_version": 0},
    )
    assert r.status_code == 409
    assert r.json()["current_version"] == 1
    r = fleet.api(
        "POST",
        "/api/devices/dev-0/shadow",
        {"desired": {"policy": {"mode": "edge_first"}}, "expected_version": 1},
    )
    shadow = r.json()
    assert shadow["version"] == 2
    assert shadow["desired"]["policy"] == {"threshold": 0.7, "mode": "edge_first"}
    assert shadow["delta"] == {"policy": {"threshold": 0.7, "mode": "edge_first"}}
    # the device got the retained desired state, latest version last
    wait_until(lambda: a.desired and a.desired[-1].version == 2)
    assert a.desired[-1].state["policy"]["threshold"] == 0.7
    # the compare-and-set also holds in the database itself (two controllers sharing it)
    with pytest.raises(ShadowConflict):
        fleet.ctl.store.save_shadow(fleet.ctl.shadows["dev-0"], expected_version=1)
    # once the device reports the policy, the delta is empty
    c = a._client
    assert c is not None
    c.publish(
        T.shadow_reported("dev-0"),
        dumps(
            ReportedState(
                2,
                {
                    "model": {"name": "digits", "version": "1.0.0"},
                    "policy": {"threshold": 0.7, "mode": "edge_first"},
                },
            )
        ),
        qos=1,
        retain=True,
    )
    wait_until(lambda: fleet.api("GET", "/api/devices/dev-0/shadow").json()["delta"] == {})
    # the device after a restart gets the retained desired state again
    a.disconnect()
    late = SimDevice(mosquitto, "dev-0").connect()
    wait_until(lambda: bool(late.desired))
    assert late.desired[-1].version == 2
    assert fleet.api("POST", "/api/devices/nope/shadow", {"desired": {}}).status_code == 404
    late.disconnect()


def test_package_server_supports_resumable_range_downloads(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    blob = tmp_path / "big.bin"
    blob.write_bytes(os.urandom(300_000))  # incompressible, so the archive is large
    stored = fleet.ctl.packages.add(make_package(tmp_path, "2.0.0", keys, model=blob))
    url = fleet.http.url + stored.url_path()
    full = httpx.get(url, timeout=10)
    assert full.status_code == 200
    assert full.headers["Accept-Ranges"] == "bytes"
    size = len(full.content)
    assert size == stored.size > 200_000
    # a download cut after 5000 bytes resumes from there
    with httpx.stream("GET", url, timeout=10) as r:
        first = b""
        for chunk in r.iter_bytes(1000):
            first += chunk
            if len(first) >= 5000:
                break
    first = first[:5000]
    rest = httpx.get(
        url, headers={"Range": "bytes=5000-", "If-Range": full.headers["ETag"]}, timeout=10
    )
    assert rest.status_code == 206
    assert rest.headers["Content-Range"] == f"bytes 5000-{size - 1}/{size}"
    assert first + rest.content == full.content
    mid = httpx.get(url, headers={"Range": "bytes=100-199"}, timeout=10)
    assert mid.status_code == 206
    assert mid.content == full.content[100:200]
    tail = httpx.get(url, headers={"Range": "bytes=-10"}, timeout=10)
    assert tail.content == full.content[-10:]
    bad = httpx.get(url, headers={"Range": f"bytes={size}-"}, timeout=10)
    assert bad.status_code == 416
    assert bad.headers["Content-Range"] == f"bytes */{size}"
    # a stale ETag means the file changed: the whole file comes back, not a wrong slice
    stale = httpx.get(url, headers={"Range": "bytes=10-", "If-Range": '"old"'}, timeout=10)
    assert stale.status_code == 200
    assert len(stale.content) == size
    head = httpx.head(url, timeout=10)
    assert int(head.headers["Content-Length"]) == size
    assert httpx.get(fleet.http.url + "/packages/digits/../../etc.tar.gz").status_code == 404
    assert httpx.get(fleet.http.url + "/packages/digits/9.9.tar.gz").status_code == 404


def test_parse_range_edges() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=5-100", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=0-1,4-5", 10) is None
    with pytest.raises(ValueError, match="outside"):
        parse_range("bytes=10-", 10)
    with pytest.raises(ValueError, match="outside"):
        parse_range("bytes=5-2", 10)


def test_api_token_and_bad_input(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    ctl = FleetController(
        mosquitto.url,
        SqliteFleetStore(tmp_path / "f.sqlite"),
        PackageStore(tmp_path / "p"),
        tick_interval=0.05,
    )
    with FleetHTTPServer(ctl, token="s3cret") as http, ctl:
        assert httpx.get(http.url + "/api/devices").status_code == 401
        ok = httpx.get(http.url + "/api/devices", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        r = httpx.post(http.url + "/api/deploy", headers=auth, content=b"[1,2")
        assert r.status_code == 400
        assert "not JSON" in r.json()["error"]
        r = httpx.post(http.url + "/api/rollback", headers=auth, json={"targets": ["ghost"]})
        assert r.status_code == 400  # a bad target is bad input, not a missing URL
        assert "neither a known device nor a group" in r.json()["error"]
        r = httpx.post(
            http.url + "/api/deploy",
            headers=auth,
            json={"package": str(tmp_path), "targets": ["x"]},
        )
        assert r.status_code == 400
        # the bad target is refused before anything is read or stored
        assert "neither a known device nor a group" in r.json()["error"]
        assert ctl.packages.list() == []
        assert httpx.get(http.url + "/api/jobs/nope", headers=auth).status_code == 404


def test_signature_is_checked_when_controller_has_a_key(
    mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    from edgecloud.package import load_public_key

    other = generate_keypair(tmp_path / "keys" / "other")
    store = PackageStore(tmp_path / "p", load_public_key(keys[1]))
    assert store.add(make_package(tmp_path, "1.0.0", keys)).signed_by
    with pytest.raises(FleetError, match="refused"):
        store.add(make_package(tmp_path, "1.0.1", other))


def test_state_survives_a_controller_restart(
    mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    (a,) = devices(mosquitto, 1, behaviour="silent")
    db = tmp_path / "fleet.sqlite"
    ctl = FleetController(
        mosquitto.url,
        SqliteFleetStore(db),
        PackageStore(tmp_path / "p"),
        public_base_url="http://127.0.0.1:1",
        tick_interval=0.05,
    ).start()
    wait_until(lambda: "dev-0" in ctl.devices and ctl.devices["dev-0"].online)
    job = ctl.deploy(make_package(tmp_path, "2.0.0", keys), ["edge"])
    wait_until(lambda: bool(a.notifications))
    ctl.close()
    # while the controller is down the device finishes; its persistent session keeps the update
    a.update(job.job_id, ExecutionState.SUCCEEDED)
    ctl2 = FleetController(
        mosquitto.url,
        SqliteFleetStore(db),
        PackageStore(tmp_path / "p"),
        public_base_url="http://127.0.0.1:1",
        tick_interval=0.05,
    ).start()
    try:
        assert job.job_id in ctl2.engine.jobs
        wait_until(lambda: ctl2.job_done(job.job_id), what="update queued during downtime")
        assert ctl2.job_view(job.job_id)["counts"]["SUCCEEDED"] == 1
        wait_until(lambda: ctl2.devices["dev-0"].online, what="retained status after restart")
    finally:
        ctl2.close()
        a.disconnect()


# -- the CLI against a controller subprocess ---------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = cli_main(list(argv))
    out = capsys.readouterr().out
    try:
        return code, json.loads(out)
    except json.JSONDecodeError:
        return code, out


@pytest.mark.slow
def test_cli_commands_json(
    mosquitto: MosquittoBroker,
    tmp_path: Path,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.fixtures.broker import free_port

    port = free_port()
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
            str(tmp_path / "fleet.sqlite"),
            "--packages",
            str(tmp_path / "pkgs"),
            "--http-port",
            str(port),
            "--public-key",
            str(keys[1]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "fleet controller" in line, line
        monkeypatch.setenv("EDGECLOUD_CONTROLLER", f"http://127.0.0.1:{port}")
        sims = [*devices(mosquitto, 2), SimDevice(mosquitto, "dev-2", group="lab").connect()]
        code, devs = _cli(capsys, "fleet", "devices", "--json")
        for _ in range(100):
            if code == 0 and len(devs) == 3 and all(d["online"] for d in devs):
                break
            time.sleep(0.05)
            code, devs = _cli(capsys, "fleet", "devices", "--json")
        assert code == 0
        assert {d["group"] for d in devs} == {"edge", "lab"}
        pkg = make_package(tmp_path, "2.0.0", keys)
        code, job = _cli(
            capsys,
            "fleet",
            "deploy",
            str(pkg),
            "--to",
            "edge",
            "dev-2",
            "--rate",
            "600/min",
            "--abort-failed-percent",
            "50",
            "--timeout",
            "30s",
            "--json",
            "--wait",
        )
        assert code == 0, job
        assert job["status"] == "COMPLETED"
        assert job["counts"]["SUCCEEDED"] == 3
        assert job["rollout"]["max_per_minute"] == 600
        assert job["abort"][0]["threshold_percent"] == 50
        code, devs = _cli(capsys, "fleet", "devices", "--json")
        assert {d["model_version"] for d in devs} == {"2.0.0"}
        code, jobs = _cli(capsys, "fleet", "jobs", "--json")
        assert [j["job_id"] for j in jobs] == [job["job_id"]]
        code, st = _cli(capsys, "fleet", "status", job["job_id"], "--json")
        assert code == 0
        assert len(st["executions"]) == 3
        # a package not signed by the controller's key is refused: exit code 2, clear message
        bad = make_package(tmp_path / "o", "2.0.1", generate_keypair(tmp_path / "k2" / "x"))
        code = cli_main(["fleet", "deploy", str(bad), "--to", "edge", "--json"])
        err = capsys.readouterr().err
        assert code == 2
        assert "refused" in err
        # a silent device: the job stays in progress; cancel it
        sims[0].behaviour = "silent"
        code, rb = _cli(
            capsys,
            "fleet",
            "rollback",
            "--to",
            "dev-0",
            "--exp-base-rate",
            "6/min",
            "--exp-factor",
            "3",
            "--exp-on-succeeded",
            "2",
            "--job-timeout",
            "1h",
            "--json",
        )
        assert code == 0
        assert rb["operation"] == "rollback"
        assert rb["rollout"] == {
            "max_per_minute": None,
            "base_rate_per_minute": 6.0,
            "increment_factor": 3.0,
            "on_succeeded": 2,
        }
        assert rb["job_timeout_s"] == 3600
        code, canceled = _cli(capsys, "fleet", "cancel", rb["job_id"], "--force", "--json")
        assert code == 0
        assert canceled["status"] == "CANCELED"
        code, _waited = _cli(capsys, "fleet", "status", rb["job_id"], "--wait", "--json")
        assert code == 1  # a waited-for job that did not succeed everywhere
        code, shadows = _cli(
            capsys,
            "fleet",
            "policy",
            "set",
            "--to",
            "edge",
            "--threshold",
            "0.8",
            "--mode",
            "edge_first",
            "--json",
        )
        assert code == 0
        assert [s["desired"]["policy"] for s in shadows] == [
            {"threshold": 0.8, "mode": "edge_first"}
        ] * 2
        wait_until(
            lambda: sims[0].desired and sims[0].desired[-1].state["policy"]["mode"] == "edge_first"
        )
        code, sh = _cli(capsys, "fleet", "shadow", "dev-0", "--json")
        assert sh["delta"] == {"policy": {"threshold": 0.8, "mode": "edge_first"}}
        assert cli_main(["fleet", "policy", "set", "--to", "edge", "--threshold", "7"]) == 2
        assert cli_main(["fleet", "deploy", str(pkg), "--to", "edge", "--rate", "fast"]) == 2
        assert cli_main(["fleet", "status", "nope"]) == 1
        capsys.readouterr()
        # the human forms render
        monkeypatch.setenv("COLUMNS", "200")
        assert cli_main(["fleet", "devices"]) == 0
        assert "dev-0" in capsys.readouterr().out
        assert cli_main(["fleet", "jobs"]) == 0
        assert job["job_id"] in capsys.readouterr().out
        assert cli_main(["fleet", "status", job["job_id"], "--wait"]) == 0
        out = capsys.readouterr().out
        assert "COMPLETED" in out
        assert "SUCCEEDED=3" in out
        for s in sims:
            s.disconnect()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
    # no controller: a clear error and exit code 1
    monkeypatch.setenv("EDGECLOUD_CONTROLLER", f"http://127.0.0.1:{port}")
    assert cli_main(["fleet", "devices", "--json"]) == 1
    assert "cannot reach the fleet controller" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_quick_runs() -> None:
    assert "100/100 SUCCEEDED, job COMPLETED" in run_benchmark("fleet", "--quick")


def test_controller_refused_or_misconfigured_broker(tmp_path: Path) -> None:
    from edgecloud.errors import AuthError, ConfigError

    def make(url: str) -> FleetController:
        return FleetController(
            url, SqliteFleetStore(tmp_path / "f.sqlite"), PackageStore(tmp_path / "p")
        )

    with pytest.raises(ConfigError, match="mqtt://"):
        make("http://127.0.0.1:1883")
    with MosquittoBroker(allow_anonymous=False) as locked:
        ctl = make(locked.url)
        with pytest.raises(AuthError, match=r"0x87|0x86|Not authorized"):
            ctl.start(timeout=5)
        ctl.store.close()


def test_upload_then_deploy_by_reference(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """An operator on another machine: the package travels over HTTP, not as a path."""
    from edgecloud.errors import ConfigError
    from edgecloud.fleet.client import ControllerClient

    sims = devices(mosquitto, 2)
    wait_until(lambda: sum(d.online for d in fleet.ctl.devices.values()) == 2)
    pkg = make_package(tmp_path, "2.1.0", keys)
    with ControllerClient(fleet.http.url) as c:
        job = c.deploy(pkg, ["edge"], upload=True, timeout_s=30)
        wait_until(lambda: fleet.ctl.job_done(job["job_id"]))
        assert c.job(job["job_id"])["counts"]["SUCCEEDED"] == 2
        stored = fleet.ctl.packages.root / "digits" / "2.1.0"
        assert (stored / "manifest.json").read_bytes() == (pkg / "manifest.json").read_bytes()
        assert sims[0].notifications[0].document["version"] == "2.1.0"
        listed = c._call("GET", "/api/packages")
        assert [(p["name"], p["version"]) for p in listed] == [("digits", "2.1.0")]
        assert listed[0]["url"] == job["document"]["package_url"]
        with pytest.raises(ConfigError, match=r"uploaded package refused"):
            c._call(
                "POST",
                "/api/packages",
                content=b"not a tarball",
                headers={"Content-Type": "application/gzip"},
            )
        with pytest.raises(FleetError, match=r"no package 'digits' version '9\.9'"):
            c._call(
                "POST",
                "/api/deploy",
                {"package_ref": {"name": "digits", "version": "9.9"}, "targets": ["edge"]},
            )
    assert not list(fleet.ctl.packages.root.glob(".upload-*"))  # temp files cleaned up
    for s in sims:
        s.disconnect()
