"""The V2 HTTP server: real uvicorn on loopback, real onnxruntime, stock clients (tritonclient).

Most tests share one in-process server (fast); the CLI, the size limit, auth and the long
concurrency run use ``edgecloud cloud serve`` in a child process, as deployed.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from edgecloud.transport.http import HttpTransport
from edgecloud.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    decode_response,
    encode_request,
)
from tests.fixtures.servers import InProcessServer, make_repository, running_cloud_server

MODEL = "digits_cloud"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> Path:
    return make_repository(
        tmp_path_factory.mktemp("srv"), {MODEL: samples_dir / "models" / "digits_cloud.onnx"}
    )


@pytest.fixture(scope="module")
def x(samples_dir: Path) -> np.ndarray:
    return np.load(samples_dir / "data" / "cloud_val.npz")["input"]


@pytest.fixture(scope="module")
def reference(samples_dir: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(samples_dir / "models" / "digits_cloud.onnx"))
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[InProcessServer]:
    with running_cloud_server(
        repo, region="eu-test", subprocess=False, max_queue_delay_ms=5.0
    ) as srv:
        assert isinstance(srv, InProcessServer)
        yield srv


@pytest.fixture
def client(server: InProcessServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"metric {name}{labels} not exposed"
    return total


# ----------------------------------------------------------------------------- health, metadata


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    r = client.get("/v2/health/ready")
    assert r.status_code == 200
    assert r.headers["X-Edgecloud-Region"] == "eu-test"
    md = client.get("/v2").json()
    assert md["name"] == "edgecloud"
    assert "binary_tensor_data" in md["extensions"]


def test_model_metadata_and_ready(client: httpx.Client) -> None:
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
        md = client.get(path).json()
        assert md["name"] == MODEL
        assert md["platform"] == "onnxruntime_onnx"
        assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert md["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
    assert client.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
    r = client.get("/v2/models/nope/ready")
    assert r.status_code == 404
    assert "nope" in r.json()["error"]
    r = client.get(f"/v2/models/{MODEL}/versions/7")
    assert r.status_code == 404
    assert "no version '7'" in r.json()["error"]


# ----------------------------------------------------------------------------- inference


def test_infer_json(client: httpx.Client, x: np.ndarray, reference: np.ndarray) -> None:
    body = {
        "id": "req-1",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [2, 1, 8, 8],
                "data": x[:2].ravel().tolist(),
            }
        ],
    }
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["model_name"] == MODEL
    assert out["model_version"] == "1"
    assert out["id"] == "req-1"
    (logits,) = out["outputs"]
    assert logits["name"] == "logits"
    assert logits["datatype"] == "FP32"
    assert logits["shape"] == [2, 10]
    np.testing.assert_allclose(
        np.array(logits["data"]).reshape(2, 10), reference[:2], rtol=1e-4, atol=1e-4
    )


def test_infer_binary_both_ways(client: httpx.Client, x: np.ndarray, reference: np.ndarray) -> None:
    body, hl = encode_request(
        InferRequest(MODEL, {"input": x[:4]}), binary=True, binary_outputs=True
    )
    assert hl is not None
    r = client.post(
        f"/v2/models/{MODEL}/versions/1/infer",
        content=body,
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(hl)},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    resp_hl = int(r.headers[HEADER_LENGTH])
    header = json.loads(r.content[:resp_hl])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 4 * 10 * 4
    resp = decode_response(r.content, resp_hl)
    np.testing.assert_allclose(resp.outputs["logits"], reference[:4], rtol=1e-4, atol=1e-4)


def test_per_output_binary_data(client: httpx.Client, x: np.ndarray) -> None:
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 1, 8, 8],
                "data": x[0].ravel().tolist(),
            }
        ],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200
    assert HEADER_LENGTH in r.headers
    assert decode_response(r.content, int(r.headers[HEADER_LENGTH])).outputs["logits"].shape == (
        1,
        10,
    )


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_interop(
    server: InProcessServer, x: np.ndarray, reference: np.ndarray, binary: bool
) -> None:
    import tritonclient.http as triton

    c = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert c.is_server_live()
        assert c.is_server_ready()
        assert c.is_model_ready(MODEL)
        md = c.get_model_metadata(MODEL)
        assert md["inputs"][0]["shape"] == [-1, 1, 8, 8]
        inp = triton.InferInput("input", [3, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[:3], binary_data=binary)
        out = triton.InferRequestedOutput("logits", binary_data=binary)
        res = c.infer(MODEL, [inp], outputs=[out], request_id="t1")
        np.testing.assert_allclose(res.as_numpy("logits"), reference[:3], rtol=1e-4, atol=1e-4)
        assert res.get_response()["id"] == "t1"
        res = c.infer(MODEL, [inp])  # no outputs named: tritonclient asks binary_data_output
        np.testing.assert_allclose(res.as_numpy("logits"), reference[:3], rtol=1e-4, atol=1e-4)
        bad = triton.InferInput("pixels", [1, 1, 8, 8], "FP32")
        bad.set_data_from_numpy(x[:1], binary_data=binary)
        with pytest.raises(triton.InferenceServerException, match="no input 'pixels'"):
            c.infer(MODEL, [bad])
    finally:
        c.close()
        # Collect the client here: its __del__ closes its gevent pool again, which fails
        # (InvalidThreadUseError) when a later garbage collection runs in another thread.
        del c
        gc.collect()


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "input", "datatype": "FP64", "shape": [1, 1, 8, 8]}, "expected datatype FP32"),
        ({"name": "input", "datatype": "FP32", "shape": [1, 64]}, "input 'input': expected shape"),
        ({"name": "pixels", "datatype": "FP32", "shape": [1, 1, 8, 8]}, "no input 'pixels'"),
    ],
)
def test_bad_input_is_400_naming_it(
    client: httpx.Client, tensor: dict[str, object], message: str
) -> None:
    tensor = dict(tensor, data=[0.0] * 64)
    r = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [tensor]})
    assert r.status_code == 400
    assert message in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{not json", {}, "not valid JSON"),
        (
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [1, 2]}]}',
            {},
            "do not fill shape",
        ),
        (b"{}", {HEADER_LENGTH: "abc"}, HEADER_LENGTH),
        (b"{}", {HEADER_LENGTH: "99"}, "body has 2 bytes"),
    ],
)
def test_malformed_body_is_400(
    client: httpx.Client, body: bytes, headers: dict[str, str], message: str
) -> None:
    r = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert r.status_code == 400
    assert message in r.json()["error"]


def test_unknown_model_is_404(client: httpx.Client) -> None:
    r = client.post("/v2/models/resnet/infer", json={"inputs": []})
    assert r.status_code == 404
    assert r.json() == {"error": "model 'resnet' is not in this repository (models: digits_cloud)"}


def test_infer_fast_path_resolves_versions_and_falls_back_to_the_router(
    client: httpx.Client, x: np.ndarray, reference: np.ndarray
) -> None:
    # The infer route is matched ahead of Starlette's router: versions, unknown versions and
    # near-miss paths must behave exactly as the routed endpoints do.
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 1, 8, 8],
                "data": x[:1].ravel().tolist(),
            }
        ]
    }
    r = client.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == "1"
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], reference[0], rtol=1e-4, atol=1e-5)
    r = client.post(f"/v2/models/{MODEL}/versions/7/infer", json=body)
    assert r.status_code == 404
    assert "no version '7'" in r.json()["error"]
    r = client.post(f"/v2/models/{MODEL}/versions/1/infer/extra", json=body)
    assert r.status_code == 404
    assert "error" in r.json()
    r = client.put(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 405
    assert "error" in r.json()


def test_metrics_exposed(client: httpx.Client, server: InProcessServer, x: np.ndarray) -> None:
    before = _metric(
        client.get("/metrics").text, "edgecloud_cloud_requests_total", model=MODEL, status="200"
    )
    with HttpTransport(server.url, region="eu-test") as t:
        for i in range(3):
            t.infer(InferRequest(MODEL, {"input": x[i : i + 1]}), timeout=10)
    client.post("/v2/models/nope/infer", json={"inputs": []})
    text = client.get("/metrics").text
    assert _metric(text, "edgecloud_cloud_requests_total", model=MODEL, status="200") == before + 3
    assert _metric(text, "edgecloud_cloud_requests_total", model="_unknown", status="404") >= 1
    assert _metric(text, "edgecloud_cloud_request_seconds_count", model=MODEL) >= 3
    assert _metric(text, "edgecloud_cloud_batch_size_count", model=MODEL) >= 1
    assert _metric(text, "edgecloud_cloud_queue_depth", model=MODEL) == 0
    assert 'region="eu-test"' in text


def _hammer(url: str, x: np.ndarray, *, threads: int, seconds: float) -> tuple[int, list[str]]:
    """``threads`` HttpTransport clients sending batch-1 requests for ``seconds``."""
    errors: list[str] = []
    done = [0] * threads
    stop_at = time.monotonic() + seconds
    barrier = threading.Barrier(threads)

    def run(k: int) -> None:
        with HttpTransport(url, region="load", max_connections=2) as t:
            barrier.wait()
            i = k
            while time.monotonic() < stop_at:
                j = i % len(x)
                try:
                    r = t.infer(InferRequest(MODEL, {"input": x[j : j + 1]}), timeout=30)
                    if r.outputs["logits"].shape != (1, 10):
                        errors.append(f"bad shape {r.outputs['logits'].shape}")
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                done[k] += 1
                i += threads

    ts = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(done), errors


def test_batching_observed_under_concurrency(server: InProcessServer, x: np.ndarray) -> None:
    n, errors = _hammer(server.url, x, threads=8, seconds=2.0)
    assert errors == []
    assert n > 50
    assert server.core.stats()["max_requests_per_batch"] > 1
    text = httpx.get(f"{server.url}/metrics").text
    # Fewer batches than requests: some runs joined several requests.
    batches = _metric(text, "edgecloud_cloud_batch_requests_count", model=MODEL)
    joined = _metric(text, "edgecloud_cloud_batch_requests_sum", model=MODEL)
    assert joined > batches


# ----------------------------------------------------------------------------- child process


def test_auth_size_limit_and_health_open(repo: Path, x: np.ndarray) -> None:
    with running_cloud_server(repo, region="sec", token="s3cret", max_request_bytes=4096) as srv:
        url = srv.url
        path = f"{url}/v2/models/{MODEL}/infer"
        small = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1, 8, 8],
                    "data": x[0].ravel().tolist(),
                }
            ]
        }
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        r = httpx.post(path, json=small)
        assert r.status_code == 401
        assert "authorization required" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(path, json=small, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert r.json()["error"] == "invalid bearer token"
        assert httpx.get(f"{url}/v2/models/{MODEL}").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        r = httpx.post(path, json=small, headers=ok)
        assert r.status_code == 200, r.text
        big = {
            "inputs": [dict(small["inputs"][0], shape=[40, 1, 8, 8], data=x[:40].ravel().tolist())]
        }
        r = httpx.post(path, json=big, headers=ok)
        assert r.status_code == 413
        assert "exceeds 4096" in r.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
            yield b'{"inputs": ['
            for _ in range(100):
                yield b" " * 100

        r = httpx.post(path, content=chunks(), headers=ok)
        assert r.status_code == 413
        # The server is still healthy after refusing.
        assert httpx.post(path, json=small, headers=ok).status_code == 200


@pytest.mark.slow
def test_32_clients_for_20_seconds(repo: Path, x: np.ndarray) -> None:
    with running_cloud_server(repo, region="load", max_queue_delay_ms=2.0) as srv:
        n, errors = _hammer(srv.url, x, threads=32, seconds=20.0)
        text = httpx.get(f"{srv.url}/metrics").text
    assert errors == [], errors[:5]
    assert n > 1000
    assert _metric(text, "edgecloud_cloud_requests_total", model=MODEL, status="200") == n
    batches = _metric(text, "edgecloud_cloud_batch_requests_count", model=MODEL)
    assert _metric(text, "edgecloud_cloud_batch_requests_sum", model=MODEL) == n
    assert batches < n / 2, f"{n} requests ran in {batches} batches: batching did not happen"


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecloud", "cloud", "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_bad_repository_exits_2_naming_it(tmp_path: Path) -> None:
    out = _cli("--repository", str(tmp_path / "missing"), "--port", "0")
    assert out.returncode == 2
    assert "missing does not exist" in out.stderr
    (tmp_path / "m" / "1").mkdir(parents=True)
    out = _cli("--repository", str(tmp_path), "--port", "0")
    assert out.returncode == 2
    assert "holds no model" in out.stderr


def test_unknown_route_and_wrong_method_get_v2_error_bodies(client: httpx.Client) -> None:
    r = client.get("/v2/nothing/here")
    assert r.status_code == 404
    assert "/v2/nothing/here" in r.json()["error"]
    r = client.get(f"/v2/models/{MODEL}/infer")
    assert r.status_code == 405
    assert "error" in r.json()


def test_cli_mqtt_option_fails_clearly_without_the_worker_module(
    monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    import argparse

    from edgecloud.cli import cloud as cli_cloud
    from edgecloud.errors import ConfigError

    monkeypatch.setitem(sys.modules, "edgecloud.cloud.mqtt_worker", None)  # import fails
    args = argparse.Namespace(
        mqtt="mqtt://127.0.0.1:1",
        mqtt_workers=1,
        region="r",
        mqtt_username=None,
        mqtt_password=None,
        mqtt_ca=None,
        mqtt_cert=None,
        mqtt_key=None,
        mqtt_prefix="edgecloud",
    )
    with pytest.raises(ConfigError, match=r"--mqtt is not available.*mqtt_worker"):
        cli_cloud._start_mqtt(object(), args)


def test_cli_serve_prints_its_url_and_answers(repo: Path, x: np.ndarray) -> None:
    with running_cloud_server(repo, region="cli", max_batch_size=8) as srv:
        out = "".join(srv.output)  # type: ignore[union-attr]
        assert f"region cli serving {MODEL} on http://127.0.0.1:{srv.port}" in out
        with HttpTransport(srv.url, region="cli") as t:
            r = t.infer(InferRequest(MODEL, {"input": x[:2]}), timeout=10)
        assert r.outputs["logits"].shape == (2, 10)


@pytest.mark.mqtt
def test_cli_serves_http_and_mqtt_from_one_core(
    repo: Path, x: np.ndarray, mosquitto: object
) -> None:
    from edgecloud.transport.mqtt import MqttTransport

    url = mosquitto.url  # type: ignore[attr-defined]
    with running_cloud_server(repo, region="both", extra_args=["--mqtt", url]) as srv:
        with HttpTransport(srv.url, region="both") as h:
            via_http = h.infer(InferRequest(MODEL, {"input": x[:2]}), timeout=10)
        with MqttTransport(url, region="both", device_id="dev1") as m:
            via_mqtt = m.infer(InferRequest(MODEL, {"input": x[:2]}), timeout=10)
        text = httpx.get(f"{srv.url}/metrics").text
    np.testing.assert_array_equal(via_http.outputs["logits"], via_mqtt.outputs["logits"])
    # Both requests went through the one core's batcher.
    assert _metric(text, "edgecloud_cloud_batch_requests_sum", model=MODEL) >= 2


def test_expired_v2_timeout_parameter_is_504(client: httpx.Client, x: np.ndarray) -> None:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8]}
    body = {"inputs": [dict(tensor, data=x[0].ravel().tolist())], "parameters": {"timeout": 1}}
    r = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 504
    assert "expired" in r.json()["error"]
    body["parameters"] = {"timeout": 5_000_000}
    assert client.post(f"/v2/models/{MODEL}/infer", json=body).status_code == 200


def test_large_request_decoded_off_the_event_loop_is_exact(
    client: httpx.Client, x: np.ndarray, reference: np.ndarray
) -> None:
    """A 1.7 MB JSON body and an 85 KB output take the thread-pool path; answers stay exact."""
    big = np.concatenate([x] * 6)[:2100]
    ref = np.concatenate([reference] * 6)[:2100]
    tensor = {"name": "input", "datatype": "FP32", "shape": list(big.shape)}
    r = client.post(
        f"/v2/models/{MODEL}/infer",
        json={"inputs": [dict(tensor, data=big.ravel().tolist())]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert len(r.request.content) > 256 * 1024
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(out["shape"]), ref, rtol=1e-4, atol=1e-4
    )


def test_write_coalescer_joins_one_loop_iteration_and_flushes_before_close() -> None:
    # Logic test of the proxy (the whole suite above runs every response through it for real).
    import asyncio

    from edgecloud.cloud.http_protocol import WriteCoalescer as _WriteCoalescer

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        def get_extra_info(self, name: str) -> str:
            return f"info:{name}"

    async def scenario() -> Recorder:
        rec = Recorder()
        t = _WriteCoalescer(rec, asyncio.get_running_loop())  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(memoryview(b"body"))
        assert rec.writes == []  # nothing sent before the loop iteration ends
        await asyncio.sleep(0)
        assert rec.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(b"last")
        t.close()  # pending bytes go out before the close
        assert rec.writes[-1] == b"last"
        assert rec.closed
        assert t.get_extra_info("peername") == "info:peername"
        await asyncio.sleep(0)
        assert len(rec.writes) == 2
        return rec

    asyncio.run(scenario())
