"""Seldon MLServer 1.7.1 as a region: an independent V2 server, in its own venv (./dev.sh peers).

MLServer has no binary tensor extension (its ``GET /v2`` lists ``"extensions": []``) and answers a
binary body with HTTP 500; a server that is up answers ``/v2/health/ready`` 200 while a model is
unloaded. These tests run edgecloud's HTTP transport and HybridClient against it as they would run
in the field: JSON requests, image-sized (3x224x224) requests, a model that is not loaded next to
a region whose model is ready, and a model the region does not have.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from edgecloud.client import HybridClient
from edgecloud.errors import RemoteError
from edgecloud.package import (
    Manifest,
    TensorSpec,
    Variant,
    generate_keypair,
    load_private_key,
    write_package,
)
from edgecloud.routing import HealthProber, Region, RegionSelector
from edgecloud.routing.deadline import Deadline
from edgecloud.transport.grpc import GrpcTransport
from edgecloud.transport.http import HttpTransport
from edgecloud.transport.v2 import InferRequest
from tests.fixtures.mlserver import MLServerProcess, make_image_model
from tests.fixtures.servers import make_repository, running_cloud_server

pytestmark = pytest.mark.slow

DIGITS = "digits_cloud"
IMAGE = "image10"


@pytest.fixture(scope="module")
def image_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_model(tmp_path_factory.mktemp("img") / "image10.onnx")


@pytest.fixture(scope="module")
def mlserver(
    tmp_path_factory: pytest.TempPathFactory, samples_dir: Path, image_onnx: Path
) -> Iterator[MLServerProcess]:
    models = {DIGITS: samples_dir / "models" / "digits_cloud.onnx", IMAGE: image_onnx}
    with MLServerProcess(tmp_path_factory.mktemp("mlserver"), models) as srv:
        yield srv


@pytest.fixture(scope="module")
def digits_x(samples_dir: Path) -> np.ndarray:
    return np.load(samples_dir / "data" / "cloud_val.npz")["input"]


@pytest.fixture(scope="module")
def image_pkg(tmp_path_factory: pytest.TempPathFactory, image_onnx: Path) -> tuple[Path, Path]:
    """A signed package of the image model, for the device side of a HybridClient."""
    root = tmp_path_factory.mktemp("imgpkg")
    key = root / "k.key"
    generate_keypair(key)
    manifest = Manifest(
        name=IMAGE,
        version="1",
        inputs=(TensorSpec("input", "float32", ("batch", 3, 224, 224)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("fp32", "fp32.onnx", "onnx", "fp32", "cpu", 0, ""),),
        labels=tuple(str(i) for i in range(10)),
    )
    write_package(
        root / "pkg", manifest, {"fp32.onnx": image_onnx}, signing_key=load_private_key(key)
    )
    return root / "pkg", key.with_name(key.name + ".pub")


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 3, 224, 224), dtype=np.float32)


def test_json_requests_match_onnxruntime_seeded(
    mlserver: MLServerProcess, samples_dir: Path, digits_x: np.ndarray
) -> None:
    # A seeded generator of batch sizes and values (val rows, scaled, shifted, extremes) against
    # the real MLServer: every answer equals onnxruntime's on the same rows.
    sess = ort.InferenceSession(str(samples_dir / "models" / "digits_cloud.onnx"))
    rng = np.random.default_rng(7)
    with HttpTransport(mlserver.url, region="mls") as t:
        for i in range(25):
            n = int(rng.integers(1, 9))
            rows = digits_x[rng.integers(0, len(digits_x), n)]
            x = (rows * rng.choice([1.0, -3.0, 1e-3, 250.0]) + rng.normal(0, 1)).astype(np.float32)
            got = t.infer(InferRequest(DIGITS, {"input": x}, id=f"r{i}"), timeout=10)
            assert got.id == f"r{i}"
            ref = sess.run(None, {"input": x})[0]
            np.testing.assert_allclose(got.outputs["logits"], ref, rtol=1e-5, atol=1e-4)
        assert t.features["binary"] is None  # every request was small: nothing negotiated


def test_hybrid_answers_every_large_offload_from_mlserver(
    mlserver: MLServerProcess, image_pkg: tuple[Path, Path], image_onnx: Path
) -> None:
    pkg, pub = image_pkg
    sess = ort.InferenceSession(str(image_onnx))
    posts: list[httpx.Request] = []
    # Edge first with a threshold no local answer reaches: every request is offloaded as a low
    # confidence answer would be, and must come back from MLServer.
    client = HybridClient(
        pkg,
        public_key=pub,
        mode="edge_first",
        threshold=1.0,
        deadline=20.0,
        probe_interval=None,
        regions=[{"name": "mls", "endpoint": mlserver.url}],
    )
    with client:
        transport = client.selector.regions[0].transport
        assert isinstance(transport, HttpTransport)
        transport._client.event_hooks["request"] = [posts.append]
        xs = _images(12)
        for x in xs:  # 588 KiB per request: far over the 16 KiB binary threshold
            r = client.infer({"input": x})
            assert r.source == "cloud:mls", r.error_summary()
            assert r.reason == "low_confidence"
            assert not r.degraded
            assert r.errors == {}
            np.testing.assert_allclose(
                r.outputs["logits"], sess.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5
            )
        health = client.region_health()[0]
    # Negotiated once: MLServer declares no binary extension, so every request went as JSON.
    assert [p.url.path for p in posts if p.method == "GET"] == ["/v2"]
    infer = [p for p in posts if p.method == "POST"]
    assert len(infer) == 12
    assert {p.headers["content-type"] for p in infer} == {"application/json"}
    assert health.features is not None
    assert health.features["extensions"] == []
    assert health.features["binary"] is False
    assert (health.answered, health.failures, health.ready) == (12, 0, True)


def test_binary_refused_is_retried_in_json_once_and_remembered(
    mlserver: MLServerProcess, image_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # binary="always" skips the negotiation, as an old client or a misdeclared server would: the
    # first binary request fails to parse, is answered in JSON, and binary is off from then on.
    sess = ort.InferenceSession(str(image_onnx))
    posts: list[httpx.Request] = []
    caplog.set_level(logging.WARNING, logger="edgecloud.transport.http")
    with HttpTransport(mlserver.url, region="mls", binary="always") as t:
        t._client.event_hooks["request"] = [posts.append]
        xs = _images(3, seed=5)
        for x in xs:
            got = t.infer(InferRequest(IMAGE, {"input": x}), timeout=20)
            np.testing.assert_allclose(
                got.outputs["logits"], sess.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5
            )
        assert t.features["binary_refused"] is True
    kinds = [p.headers["content-type"] for p in posts]
    assert kinds == ["application/octet-stream"] + ["application/json"] * 3
    warned = [r for r in caplog.records if "could not parse a binary" in r.getMessage()]
    assert len(warned) == 1


def test_region_whose_model_is_not_loaded_is_not_chosen(
    mlserver: MLServerProcess, tmp_path: Path, image_onnx: Path
) -> None:
    # MLServer is the preferred region (priority 0) but its model is unloaded: the server still
    # says it is ready, the model says it is not. The edgecloud region (priority 1) answers until
    # MLServer's model is loaded again, then MLServer is chosen again.
    repo = make_repository(tmp_path, {IMAGE: image_onnx})
    mlserver.unload(IMAGE)
    try:
        assert httpx.get(mlserver.url + "/v2/health/ready", timeout=5).status_code == 200
        with running_cloud_server(repo, region="ec", subprocess=False) as ec:
            mls_t = HttpTransport(mlserver.url, region="mls")
            ec_t = HttpTransport(ec.url, region="ec")
            regions = [
                Region("mls", mls_t, priority=0, model=IMAGE),
                Region("ec", ec_t, priority=1, model=IMAGE),
            ]
            selector = RegionSelector(regions)
            prober = HealthProber(selector, interval=60, timeout=5)
            try:
                prober.probe_once()
                assert [r.model_ready for r in regions] == [False, True]
                assert "not found" in str(regions[0].last_error)
                x = _images(1)[0]
                for _ in range(3):
                    out = selector.route(lambda r: InferRequest(IMAGE, {"input": x}), Deadline(20))
                    assert out.region is not None, out.errors
                    assert out.region.name == "ec"
                    assert out.errors == {}
                mlserver.load(IMAGE)
                prober.probe_once()
                assert [r.model_ready for r in regions] == [True, True]
                out = selector.route(lambda r: InferRequest(IMAGE, {"input": x}), Deadline(20))
                assert out.region is not None, out.errors
                assert out.region.name == "mls"
            finally:
                mls_t.close()
                ec_t.close()
    finally:
        if not mlserver.model_ready(IMAGE):
            mlserver.load(IMAGE)


def test_unknown_model_is_logged_once_and_counted(
    mlserver: MLServerProcess, image_pkg: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    pkg, pub = image_pkg
    caplog.set_level(logging.ERROR, logger="edgecloud.routing.regions")
    client = HybridClient(
        pkg,
        public_key=pub,
        mode="cloud_first",
        deadline=20.0,
        probe_interval=None,
        failure_threshold=100,
        regions=[{"name": "mls", "endpoint": mlserver.url, "model": "no_such_model"}],
    )
    with client:
        x = _images(1)[0]
        for _ in range(4):
            r = client.infer({"input": x})
            assert r.degraded
            assert r.source == "edge"
            err = r.errors["mls"]
            assert isinstance(err, RemoteError)
            assert err.status == 404
            assert "no_such_model" in str(err)
        health = client.region_health()[0]
        metrics = client.region_metrics()
        assert 'edgecloud_region_persistent_error{region="mls"} 1' in metrics
        assert 'edgecloud_region_failures_total{region="mls",kind="unknown_model"} 4' in metrics
        assert client.prober is None
        prober = HealthProber(
            client.selector, interval=60, timeout=5, model_for=client._probe_model
        )
        prober.probe_once()
        assert client.region_health()[0].ready is False
    loud = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert "unknown_model" in loud[0].getMessage()
    assert health.failures_by_kind == {"unknown_model": 4}
    assert health.persistent_error is not None
    assert "no_such_model" in health.persistent_error
    assert health.ready is False
    assert health.answered == 0


def test_grpc_transport_against_mlserver(mlserver: MLServerProcess, image_onnx: Path) -> None:
    # MLServer's gRPC port takes raw tensors: image-sized requests without the JSON cost.
    sess = ort.InferenceSession(str(image_onnx))
    with GrpcTransport(f"grpc://127.0.0.1:{mlserver.grpc_port}", region="mls-grpc") as t:
        for x in _images(4, seed=9):
            got = t.infer(InferRequest(IMAGE, {"input": x}), timeout=20)
            np.testing.assert_allclose(
                got.outputs["logits"], sess.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5
            )
        assert t.model_ready(IMAGE, timeout=5) is True
        assert t.model_ready("no_such_model", timeout=5) is False
        assert t.server_metadata()["extensions"] == []
        with pytest.raises(RemoteError) as ei:
            t.infer(InferRequest("no_such_model", {"input": _images(1)[0]}), timeout=20)
        assert ei.value.status == 404  # MLServer says UNKNOWN "...ModelNotFound..."


def test_mlserver_does_not_dequantize_int8_so_it_is_opt_in(
    mlserver: MLServerProcess, digits_x: np.ndarray, samples_dir: Path
) -> None:
    # Why upstream_int8 goes only to the regions named: a stock V2 server ignores the input's
    # dequantize parameters, so it never computes the FP32 answer from a UINT8 tensor.
    from edgecloud.transport.compact import quantize_int8

    sess = ort.InferenceSession(str(samples_dir / "models" / "digits_cloud.onnx"))
    x = digits_x[:2]
    want = sess.run(None, {"input": x})[0]
    req = quantize_int8(InferRequest(DIGITS, {"input": x}))
    with HttpTransport(mlserver.url, region="mls") as t:
        # MLServer 1.7.1 hands the UINT8 tensor to onnxruntime, which fails: HTTP 500
        with pytest.raises(RemoteError) as ei:
            t.infer(req, timeout=20)
        assert ei.value.status == 500
        # the same rows as FP32 are answered (the region is fine; only INT8 is unknown to it),
        # on the same transport: MLServer resets the connection its 500 went out on, and the
        # transport sends the next request again on a new one
        got = t.infer(InferRequest(DIGITS, {"input": x}), timeout=20).outputs["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
