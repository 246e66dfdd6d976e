"""Hostile input against every HTTP port: the region server, the agent's endpoint, the fleet API.

A seeded mix (``tests/fixtures/hostile.py``: malformed V2 bodies, shapes that overflow int64,
deep JSON, 4,301-digit literals, bad header lengths, broken framing, oversized headers, unknown
methods) goes over raw sockets to the real servers. For each one: never a 5xx, never a
connection closed without a complete response, every 4xx a V2 error body, every 200 strict JSON
(no bare NaN/Infinity). Afterwards a valid request gets the same answer as before the mix, and the
server's resident memory is within 50 MiB of what it was. A failure names the seed and the case's
index, and ``SEED`` replays it exactly.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.fixtures.hostile import (
    Case,
    RawHttp,
    Response,
    SilentClose,
    http_cases,
    rss_mib,
)
from tests.fixtures.servers import make_repository, running_cloud_server
from tests.fixtures.wait import poll_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("EDGECLOUD_FUZZ_SEED", "11"))
MODEL = "digits_cloud"
INFER = f"/v2/models/{MODEL}/infer"


def _check(case: Case, resp: Response, where: str) -> None:
    assert resp.status < 500, f"{where} {case.kind}: {resp.status} {resp.body[:300]!r}"
    if resp.status >= 400:
        try:
            body = resp.json()
        except ValueError:
            raise AssertionError(
                f"{where} {case.kind}: {resp.status} body {resp.body[:200]!r}"
            ) from None
        assert isinstance(body, dict), f"{where} {case.kind}: {body!r}"
        assert isinstance(body.get("error"), str), f"{where} {case.kind}: {body!r}"
    elif resp.status == 200 and resp.headers.get("content-type", "").startswith("application/json"):
        resp.json()  # strict JSON: raises on NaN / Infinity
    if case.expect_valid:
        assert resp.status == 200, f"{where} {case.kind}: {resp.status} {resp.body[:300]!r}"


def run_mix(host: str, port: int, cases: list[Case], label: str) -> dict[str, int]:
    """Send every case over raw keep-alive connections; returns the count per status."""
    counts: dict[str, int] = {}
    client = RawHttp(host, port)
    try:
        for i, case in enumerate(cases):
            where = f"{label} seed {SEED} #{i}"
            try:
                resp = client.exchange(case.data)
            except SilentClose as exc:
                raise AssertionError(f"{where} {case.kind}: {exc}") from None
            _check(case, resp, where)
            counts[str(resp.status)] = counts.get(str(resp.status), 0) + 1
    finally:
        client.close()
    return counts


def _valid_body(x: np.ndarray) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    return json.dumps({"inputs": [dict(tensor, data=x.ravel().tolist())]}).encode()


def _big_bodies() -> list[Case]:
    """Bodies that cost memory: a 9 MiB JSON (over the JSON limit) and 7 MiB of floats."""
    zeros = (
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"data":['
        + b"0," * (9 * 1024 * 1024 // 2)
        + b"0]}]}"
    )
    floats = (
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1],"data":['
        + b"0.123456," * (7 * 1024 * 1024 // 9)
        + b"0.5]}]}"
    )

    def post(body: bytes) -> bytes:
        return (
            f"POST {INFER} HTTP/1.1\r\nHost: f\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/json\r\n\r\n"
        ).encode() + body

    return [Case("9MiB-json-zeros", post(zeros)), Case("7MiB-json-floats", post(floats))]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(
        tmp_path_factory.mktemp("fuzz"), {MODEL: ROOT / "samples/models/digits_cloud.onnx"}
    )


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.load(ROOT / "samples/data/cloud_val.npz")["input"][:2].astype(np.float32)


def test_region_server_survives_a_seeded_hostile_mix(repo: Path, x: np.ndarray) -> None:
    with running_cloud_server(
        repo, extra_args=["--header-timeout", "1", "--request-timeout", "2"]
    ) as srv:
        pid = srv.proc.pid  # type: ignore[union-attr]
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for _ in range(30):
                assert c.post(INFER, content=_valid_body(x)).status_code == 200
            before_answer = c.post(INFER, content=_valid_body(x)).json()["outputs"]
        before = rss_mib(pid)
        rng = random.Random(SEED)
        cases = http_cases(rng, infer_path=INFER, input_name="input", row_shape=[1, 8, 8], n=2500)
        cases[100:100] = _big_bodies()
        cases[1500:1500] = _big_bodies()
        counts = run_mix("127.0.0.1", srv.port, cases, "region")
        assert counts.get("200", 0) > 200, counts
        assert counts.get("413", 0) >= 4, counts  # the JSON limit and the row cap did refuse
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            after_answer = c.post(INFER, content=_valid_body(x)).json()["outputs"]
            assert c.get("/v2/health/ready").status_code == 200
            metrics = c.get("/metrics").text
        assert after_answer == before_answer
        assert 'status="500"' not in metrics
        time.sleep(0.5)
        after = rss_mib(pid)
        print(f"region: RSS {before:.0f} -> {after:.0f} MiB over {len(cases)} requests {counts}")
        assert after - before < 50, f"RSS {before:.0f} -> {after:.0f} MiB ({counts})"


def _start_limited_server(repo: Path, nofile: int, *args: str) -> tuple[subprocess.Popen[str], int]:
    """``edgecloud cloud serve`` with RLIMIT_NOFILE lowered to ``nofile`` (as ``ulimit -n``)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgecloud",
            "cloud",
            "serve",
            "--repository",
            str(repo),
            "--port",
            "0",
            "--region",
            "idle",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "serving" in line, line
    port = int(line.rsplit(":", 1)[1])
    return proc, port


def test_300_idle_and_half_sent_connections_do_not_stop_valid_requests(
    repo: Path, x: np.ndarray
) -> None:
    proc, port = _start_limited_server(repo, 256, "--header-timeout", "1.5")
    socks: list[socket.socket] = []
    half: list[socket.socket] = []
    output: list[str] = []
    assert proc.stdout is not None
    pump = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    pump.start()
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\n".encode())  # headers never end
            half.append(s)
        t0 = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for _ in range(20):
                r = c.post(INFER, content=_valid_body(x))
                assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 10
        # the half-sent requests are answered 408, not dropped
        for s in half:
            data = b""
            s.settimeout(10)
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data.startswith(b"HTTP/1.1 408"), data[:100]
            assert b'"error"' in data or b"\r\n\r\n" in data
    finally:
        for s in socks + half:
            s.close()
        proc.terminate()
        proc.wait(15)
        pump.join(5)
        proc.stdout.close()
    assert not any("Too many open files" in line for line in output), output[-5:]


# -- the device agent's endpoint ------------------------------------------------------------------
@pytest.fixture
def agent_endpoint(tmp_path: Path, mosquitto: Any) -> Iterator[Any]:
    from device_agent.agent import Agent
    from device_agent.config import load_config
    from tests.fixtures.agent_util import Keys, Observer, make_package, send_job, write_config

    keys = Keys(tmp_path)
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-fuzz",
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
        extra="[policy]\nthreshold = 0.0\n",
    )
    obs = Observer(mosquitto.host, mosquitto.port)
    agent = Agent(load_config(cfg)).start()
    try:
        send_job(
            obs,
            "dev-fuzz",
            "v1",
            "deploy",
            package_url=make_package(tmp_path, keys, "1.0.0").as_uri(),
        )
        assert obs.wait_job("v1")["status"] == "SUCCEEDED"
        yield agent
    finally:
        agent.stop()
        obs.close()


@pytest.mark.mqtt
def test_agent_endpoint_survives_a_seeded_hostile_mix_and_idle_connections(
    agent_endpoint: Any,
) -> None:
    from tests.fixtures.agent_util import val_inputs

    ep = agent_endpoint.endpoint
    path = "/v2/models/digits/infer"
    xa = val_inputs(2).astype(np.float32)
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [2, 64], "data": xa.ravel().tolist()}
            ]
        }
    ).encode()
    with httpx.Client(base_url=ep.url, timeout=30) as c:
        for _ in range(20):
            assert c.post(path, content=body).status_code == 200
        before_answer = c.post(path, content=body).json()["outputs"]
    before = rss_mib(os.getpid())
    rng = random.Random(SEED + 1)
    cases = http_cases(rng, infer_path=path, input_name="input", row_shape=[64], n=2000)
    counts = run_mix("127.0.0.1", ep.port, cases, "agent")
    assert counts.get("200", 0) > 100, counts
    # 300 idle connections hold no handler thread: valid requests are still answered
    idle = [socket.create_connection(("127.0.0.1", ep.port), timeout=5) for _ in range(300)]
    try:
        with httpx.Client(base_url=ep.url, timeout=10) as c:
            for _ in range(10):
                assert c.post(path, content=body).json()["outputs"] == before_answer
    finally:
        for s in idle:
            s.close()
    assert poll_until(lambda: rss_mib(os.getpid()) - before < 50, 5), (before, counts)


@pytest.mark.mqtt
def test_agent_endpoint_drip_feed_gets_408_within_the_request_deadline(
    agent_endpoint: Any,
) -> None:
    """A byte a second used to hold a thread forever: the deadline is per request."""
    ep = agent_endpoint.endpoint
    handler_cls = ep._server.RequestHandlerClass
    handler_cls.limits = handler_cls.limits.with_(header_timeout_s=1.0)  # read per request
    s = socket.create_connection(("127.0.0.1", ep.port), timeout=15)
    try:
        t0 = time.monotonic()
        data = b""
        for ch in b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n":
            try:
                s.sendall(bytes([ch]))
            except OSError:
                break
            time.sleep(0.5)
            if time.monotonic() - t0 > 40:
                break
            s.setblocking(False)
            try:
                data += s.recv(4096)
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
            if data:
                break
        s.settimeout(15)
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:120]
        assert time.monotonic() - t0 < 1.0 + 8
    finally:
        s.close()


# -- the fleet controller's API -------------------------------------------------------------------
@pytest.mark.mqtt
def test_fleet_api_survives_a_seeded_hostile_mix(mosquitto: Any, tmp_path: Path) -> None:
    from edgecloud.fleet.controller import FleetController
    from edgecloud.fleet.packages import PackageStore
    from edgecloud.fleet.server import FleetHTTPServer
    from edgecloud.fleet.store import SqliteFleetStore

    ctl = FleetController(
        mosquitto.url,
        SqliteFleetStore(tmp_path / "fleet.sqlite"),
        PackageStore(tmp_path / "packages"),
        tick_interval=0.05,
    )
    http = FleetHTTPServer(ctl).start()
    ctl.start()
    try:
        rng = random.Random(SEED + 2)
        cases: list[Case] = []
        for path in ("/api/deploy", "/api/policy", "/api/rollback", "/api/devices/d1/shadow"):
            cases += http_cases(rng, infer_path=path, input_name="input", row_shape=[4], n=300)
        cases += http_cases(rng, infer_path="/api/packages", input_name="x", row_shape=[1], n=150)
        for c in cases:
            c.expect_valid = False  # V2 bodies are not fleet API calls; only "no 5xx" holds
        cases += [
            Case(
                "range", b"GET /packages/a/1.tar.gz HTTP/1.1\r\nHost: f\r\nRange: bytes=9-1\r\n\r\n"
            )
        ]
        before = rss_mib(os.getpid())  # the controller's HTTP server runs in this process
        counts = run_mix(http.host, http.port, cases, "fleet")
        assert counts.get("400", 0) > 100, counts
        assert poll_until(lambda: rss_mib(os.getpid()) - before < 50, 5), (before, counts)
        idle = [socket.create_connection((http.host, http.port), timeout=5) for _ in range(300)]
        try:  # idle connections hold no handler thread: the API still answers
            with httpx.Client(base_url=http.url, timeout=10) as c:
                for _ in range(5):
                    assert c.get("/api/health").json()["ok"] is True
        finally:
            for s in idle:
                s.close()
    finally:
        http.close()
        ctl.close()
