"""The agent's local V2 endpoint (real HTTP on loopback and a Unix socket) and the atomic swap."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import load_config
from edgecloud.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    decode_response,
    encode_request,
)
from tests.fixtures.agent_util import (
    Keys,
    Observer,
    make_package,
    ort_outputs,
    send_job,
    val_inputs,
    write_config,
)
from tests.fixtures.broker import MosquittoBroker

pytestmark = pytest.mark.mqtt
DEV = "dev-ep"


@pytest.fixture
def setup(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[tuple[Agent, Observer, Keys]]:
    keys = Keys(tmp_path)
    cfg = write_config(
        tmp_path / "agent.toml",
        device=DEV,
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
        extra=(
            "[capture]\nenabled = true\nthreshold = 0.9\nmax_count = 5\n"
            "[policy]\nthreshold = 0.0\nmax_concurrency = 2\n"
        ),
    )
    obs = Observer(mosquitto.host, mosquitto.port)
    agent = Agent(load_config(cfg)).start()
    send_job(obs, DEV, "v1", "deploy", package_url=make_package(tmp_path, keys, "1.0.0").as_uri())
    assert obs.wait_job("v1")["status"] == "SUCCEEDED"
    yield agent, obs, keys
    agent.stop()
    obs.close()


def test_v2_json_binary_metadata_errors_and_metrics(
    setup: tuple[Agent, Observer, Keys],
) -> None:
    agent, _, _ = setup
    assert agent.endpoint is not None
    base = agent.endpoint.url
    x = val_inputs(3)
    want = ort_outputs(x)
    with httpx.Client(base_url=base, timeout=10) as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2/models/digits").json()
        assert meta["versions"] == ["1.0.0"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        # JSON
        body = {
            "id": "r1",
            "inputs": [
                {"name": "input", "shape": [3, 64], "datatype": "FP32", "data": x.ravel().tolist()}
            ],
        }
        r = c.post("/v2/models/digits/infer", json=body)
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["model_version"] == "1.0.0"
        assert d["id"] == "r1"
        got = np.asarray(d["outputs"][0]["data"], dtype=np.float32).reshape(3, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert d["parameters"]["route"] == "edge"
        assert d["parameters"]["source"] == "edge"
        # binary extension both ways
        data, hl = encode_request(
            InferRequest("digits", {"input": x}), binary=True, binary_outputs=True
        )
        r = c.post(
            "/v2/models/digits/versions/1.0.0/infer", content=data, headers={HEADER_LENGTH: str(hl)}
        )
        assert r.status_code == 200, r.text
        resp = decode_response(r.content, int(r.headers[HEADER_LENGTH]))
        np.testing.assert_allclose(resp.outputs["logits"], want, rtol=1e-5, atol=1e-5)
        # errors name what is wrong
        bad = {
            "inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0.0] * 63}]
        }
        r = c.post("/v2/models/digits/infer", json=bad)
        assert r.status_code == 400
        assert "input 'input'" in r.json()["error"]
        r = c.post("/v2/models/other/infer", json=body)
        assert r.status_code == 404
        assert "digits" in r.json()["error"]
        r = c.post("/v2/models/digits/versions/9/infer", json=body)
        assert r.status_code == 404
        r = c.post("/v2/models/digits/infer", content=b"{oops")
        assert r.status_code == 400
        nan = {
            "inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [float("nan")] * 64}
            ]
        }
        r = c.post("/v2/models/digits/infer", content=json.dumps(nan).encode())
        assert r.status_code == 400
        assert "NaN" in r.json()["error"]
        # keep-alive requests are not held back by Nagle + delayed ACK (~40 ms each)
        t0 = time.perf_counter()
        for _ in range(50):
            assert c.post("/v2/models/digits/infer", json=body).status_code == 200
        assert time.perf_counter() - t0 < 1.5
        metrics = c.get("/metrics").text
        assert 'edgecloud_agent_requests_total{route="edge"} 52' in metrics
        assert "edgecloud_agent_request_errors_total 2" in metrics
        assert "edgecloud_agent_connected 1.0" in metrics
    # oversized body refused before it is read
    limit = agent.config.endpoint.max_body_bytes
    with socket.create_connection(("127.0.0.1", agent.endpoint.port), timeout=5) as s:
        s.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {limit + 1}\r\n\r\n".encode()
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")


def test_unix_socket_endpoint(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    keys = Keys(tmp_path)
    sock = tmp_path / "agent.sock"
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-sock",
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
    )
    cfg.write_text(cfg.read_text().replace("[endpoint]\n", f'[endpoint]\nsocket = "{sock}"\n'))
    with Agent(load_config(cfg)) as agent:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://agent", timeout=5) as c:
            r = c.get("/v2/health/ready")
            assert r.status_code == 503  # nothing deployed yet
            assert c.get("/v2/health/live").json() == {"live": True}
        assert agent.endpoint is not None
        assert agent.endpoint.url == f"unix://{sock}"
    assert not sock.exists()


def test_hard_examples_are_captured_bounded(
    setup: tuple[Agent, Observer, Keys], tmp_path: Path
) -> None:
    agent, _, _ = setup
    assert agent.capture is not None
    x = val_inputs(64)
    confs = [agent.client.infer({"input": x[i : i + 1]}).confidence for i in range(64)]
    hard = sum(1 for c in confs if c is not None and c < 0.9)
    assert hard >= 1, confs
    listed = agent.capture.list()
    assert len(listed) == min(hard, 5)  # bounded count, oldest dropped
    assert all(e["confidence"] < 0.9 for e in listed)
    index = agent.capture.export(tmp_path / "export")
    entries = json.loads(index.read_text())
    with np.load(index.parent / entries[0]["file"]) as z:
        assert z["input/input"].shape == (1, 64)
        assert z["edge/logits"].shape == (1, 10)
    # the same through the CLI, as an operator would on the device
    from edgecloud.cli.main import main as cli_main

    assert (
        cli_main(
            [
                "agent",
                "hard-examples",
                "--config",
                str(tmp_path / "agent.toml"),
                "--out",
                str(tmp_path / "cli-export"),
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "cli-export" / "index.json").read_text())) == len(listed)


def test_atomic_swap_under_load(setup: tuple[Agent, Observer, Keys], tmp_path: Path) -> None:
    agent, obs, keys = setup
    assert agent.endpoint is not None
    v2 = make_package(tmp_path, keys, "2.0.0")
    x = val_inputs(1)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    seen: dict[str, int] = {}
    failures: list[Any] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=agent.endpoint.url, timeout=10) as c:  # type: ignore[union-attr]
            while not stop.is_set():
                try:
                    r = c.post("/v2/models/digits/infer", json=body)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                    continue
                v = r.json()["model_version"]
                seen[v] = seen.get(v, 0) + 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while seen.get("1.0.0", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        send_job(obs, DEV, "v2", "deploy", package_url=v2.as_uri())
        assert obs.wait_job("v2")["status"] == "SUCCEEDED"
        deadline = time.monotonic() + 10
        while seen.get("2.0.0", 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    assert seen.get("1.0.0", 0) >= 20
    assert seen.get("2.0.0", 0) >= 20


def test_low_confidence_goes_to_a_real_cloud_region_and_degrades_without_it(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    from tests.fixtures.agent_util import ROOT
    from tests.fixtures.servers import make_repository, running_cloud_server

    repo = make_repository(
        tmp_path / "repo", {"digits_cloud": ROOT / "samples" / "models" / "digits_cloud.onnx"}
    )
    keys = Keys(tmp_path)
    obs = Observer(mosquitto.host, mosquitto.port)
    with running_cloud_server(repo, region="near", subprocess=False, threads=1) as server:
        cfg = write_config(
            tmp_path / "agent.toml",
            device="dev-cloud",
            broker_url=mosquitto.url,
            store=tmp_path / "store",
            public_key=keys.public,
            extra=(
                "[policy]\nthreshold = 0.9\ndeadline_s = 5.0\n"
                "[capture]\nenabled = true\nthreshold = 0.9\n"
                f'[[regions]]\nname = "near"\nendpoint = "{server.url}"\n'
                'model = "digits_cloud"\ncloud_input_shape = [1, 8, 8]\n'
            ),
        )
        agent = Agent(load_config(cfg)).start()
        try:
            send_job(
                obs,
                "dev-cloud",
                "v1",
                "deploy",
                package_url=make_package(tmp_path, keys, "1.0.0").as_uri(),
            )
            assert obs.wait_job("v1")["status"] == "SUCCEEDED"
            x = val_inputs(60)
            routes = [agent.infer({"input": x[i : i + 1]}).route for i in range(60)]
            assert "edge" in routes
            assert "cloud" in routes
            # hard examples keep the edge's answer and the cloud's
            assert agent.capture is not None
            index = agent.capture.export(tmp_path / "hard")
            entries = json.loads(index.read_text())
            from_cloud = [e for e in entries if e["route"] == "cloud"]
            assert len(from_cloud) == routes.count("cloud")
            assert all(e["confidence"] < 0.9 for e in entries)
            with np.load(index.parent / from_cloud[0]["file"]) as z:
                assert z["edge/logits"].shape == (1, 10)
                assert z["cloud/logits"].shape == (1, 10)
            server.stop()
            after = [agent.infer({"input": x[i : i + 1]}) for i in range(60)]
            assert "degraded" in [o.route for o in after]
            assert all(o.outputs["logits"].shape == (1, 10) for o in after)
            seq = agent.heartbeat()
            beat = obs.wait(
                lambda: next((r for r in obs.json_on("/telemetry") if r["seq"] == seq), None),
                what="heartbeat",
            )
        finally:
            agent.stop()
            obs.close()
    data = beat["data"]
    assert data["requests"] == 120
    assert data["edge"] == routes.count("edge") + [o.route for o in after].count("edge")
    assert data["cloud"] == routes.count("cloud")
    assert data["degraded"] == [o.route for o in after].count("degraded")
    assert sum(data["confidence_histogram"].values()) == 120
    assert data["latency"]["p50_ms"] > 0
    assert data["model_version"] == "1.0.0"
    assert "cpu_percent" in data["system"] or "load1" in data["system"]


def test_endpoint_that_cannot_listen_is_a_config_error(tmp_path: Path) -> None:
    from edgecloud.errors import ConfigError

    keys = Keys(tmp_path)
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        cfg = write_config(
            tmp_path / "agent.toml",
            device="dev-busy",
            broker_url="mqtt://127.0.0.1:1",
            store=tmp_path / "store",
            public_key=keys.public,
            endpoint_port=busy.getsockname()[1],
        )
        with pytest.raises(ConfigError, match=r"endpoint: cannot listen on 127\.0\.0\.1:\d+"):
            Agent(load_config(cfg)).start()
    finally:
        busy.close()
    # a socket path that is a regular file is refused, and the file is left alone
    victim = tmp_path / "important.txt"
    victim.write_text("keep me")
    cfg.write_text(cfg.read_text().replace("[endpoint]\n", f'[endpoint]\nsocket = "{victim}"\n'))
    with pytest.raises(ConfigError, match="is not a socket"):
        Agent(load_config(cfg)).start()
    assert victim.read_text() == "keep me"
