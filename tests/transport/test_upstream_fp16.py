"""Bytes upstream per offload and FP16 tensors to regions that accept them.

Real parts: the digits cloud CNN in a real region (``CloudServer`` over HTTP on loopback, and a
``ServingCore`` behind MQTT workers on a real Mosquitto), ``HybridClient`` in ``cloud_only`` mode
on the digits edge package, the transports' own byte counters. The region upcasts FP16 only when
the request declares ``upcast_fp16: true``; a seeded property test sends random FP16 tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgecloud.client import HybridClient
from edgecloud.errors import ConfigError, RemoteError
from edgecloud.transport.compact import PARAMETER, check_setting, downcast_fp16, wants_fp16
from edgecloud.transport.http import HttpTransport
from edgecloud.transport.v2 import InferRequest, encode_request
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.packages import CLOUD_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package
from tests.fixtures.servers import make_repository, running_cloud_server


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), {"digits_cloud": CLOUD_ONNX})


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Any]:
    with running_cloud_server(repo, region="web", subprocess=False, threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_package(tmp_path_factory.mktemp("fp16") / "edge")


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    d = np.load(SAMPLES / "data" / "edge_val.npz")
    return d["input"][:40], d["labels"][:40]


def _region(name: str, endpoint: str, **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "endpoint": endpoint,
        "model": "digits_cloud",
        "cloud_input_shape": [1, 8, 8],
        "options": options,
    }


def _cloud_answers(
    pkg: tuple[Path, Path], region: dict[str, Any], x: np.ndarray, **kw: Any
) -> tuple[list[int], dict[str, float]]:
    with HybridClient(pkg[0], public_key=pkg[1], regions=[region], mode="cloud_only", **kw) as c:
        labels = []
        for row in x:
            r = c.infer({"input": row[None]})
            assert r.source.startswith("cloud:"), r
            labels.append(int(np.asarray(r.outputs["logits"]).argmax()))
        counter = c.selector.regions[0].transport.upstream.snapshot()
    return labels, counter


def test_http_fp16_upstream_halves_the_tensor_bytes_and_keeps_the_answers(
    server: Any, pkg: tuple[Path, Path], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = rows
    region = _region("web", server.url, binary_threshold=0)  # binary tensors: bytes are bytes
    fp32, c32 = _cloud_answers(pkg, region, x)
    fp16, c16 = _cloud_answers(pkg, region, x, upstream_fp16=True)
    assert fp16 == fp32  # digits pixels are k/16: exact in FP16
    assert c32["requests"] == c16["requests"] == len(x)
    # 64 floats: 256 bytes of FP32 tensor data become 128, on the counted request bodies,
    # less the parameter that declares it (`,"upcast_fp16":true`, or a new parameters object)
    assert 128 - 40 <= c32["bytes_per_request"] - c16["bytes_per_request"] < 128


def test_mqtt_counts_bytes_and_fp16_reaches_the_region(
    repo: Path, pkg: tuple[Path, Path], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    from edgecloud.cloud.core import ServingCore
    from edgecloud.cloud.mqtt_worker import start_mqtt_workers

    x, _ = rows
    x = x[:12]
    with MosquittoBroker() as broker:
        core = ServingCore(repo, max_batch_size=8, max_queue_delay_ms=1.0)
        pool = start_mqtt_workers(core, broker=broker.url, region="mq", workers=1)
        try:
            region = _region("mq", broker.url, device_id="dev-fp16", binary_threshold=0)
            fp32, c32 = _cloud_answers(pkg, region, x)
            fp16, c16 = _cloud_answers(pkg, region, x, upstream_fp16=["mq"])
        finally:
            pool.stop()
            core.close()
    assert fp16 == fp32
    assert c32["requests"] == c16["requests"] == len(x)
    assert 128 - 40 <= c32["bytes_per_request"] - c16["bytes_per_request"] < 128


def test_fp16_only_for_the_regions_named(
    server: Any, pkg: tuple[Path, Path], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = rows
    region = _region("web", server.url, binary_threshold=0)
    _, named_other = _cloud_answers(pkg, region, x[:4], upstream_fp16=["elsewhere"])
    _, plain = _cloud_answers(pkg, region, x[:4])
    assert named_other["bytes_per_request"] == plain["bytes_per_request"]


def _post(url: str, req: InferRequest) -> httpx.Response:
    body, _ = encode_request(req, binary=False)
    return httpx.post(
        f"{url}/v2/models/{req.model}/infer",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


def test_region_upcasts_only_when_the_request_declares_it(server: Any) -> None:
    x = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float16)
    plain = InferRequest(model="digits_cloud", inputs={"input": x})
    r = _post(server.url, plain)
    assert r.status_code == 400
    assert "expected datatype FP32, got FP16" in r.json()["error"]
    r = _post(server.url, InferRequest("digits_cloud", {"input": x}, parameters={PARAMETER: "yes"}))
    assert r.status_code == 400
    assert f"'{PARAMETER}' must be true or false" in r.json()["error"]
    r = _post(server.url, InferRequest("digits_cloud", {"input": x}, parameters={PARAMETER: False}))
    assert r.status_code == 400  # declared false: no upcast
    r = _post(server.url, InferRequest("digits_cloud", {"input": x}, parameters={PARAMETER: True}))
    assert r.status_code == 200, r.text
    # int64 inputs are never upcast: the datatype error stands
    bad = InferRequest("digits_cloud", {"input": x.astype(np.int64)}, parameters={PARAMETER: True})
    assert _post(server.url, bad).status_code == 400


@pytest.mark.parametrize("seed", range(6))
def test_property_fp16_answers_match_fp32_of_the_rounded_input(server: Any, seed: int) -> None:
    """Random FP16 tensors (seeded) with the parameter: the region answers exactly what it
    answers for the same values sent as FP32 (the upcast is exact)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    x16 = (rng.normal(0.5, 0.4, (n, 1, 8, 8))).astype(np.float16)
    with HttpTransport(
        server.url, region="web", binary_threshold=int(rng.integers(0, 2)) * 10**6
    ) as t:
        a = t.infer(
            InferRequest("digits_cloud", {"input": x16}, parameters={PARAMETER: True}), timeout=10
        )
        b = t.infer(InferRequest("digits_cloud", {"input": x16.astype(np.float32)}), timeout=10)
    np.testing.assert_array_equal(a.outputs["logits"], b.outputs["logits"])


def test_downcast_and_settings() -> None:
    req = InferRequest(
        "m", {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 2), np.int64)}, parameters={"x": 1}
    )
    out = downcast_fp16(req)
    assert out.inputs["a"].dtype == np.float16
    assert out.inputs["b"].dtype == np.int64
    assert out.parameters == {"x": 1, PARAMETER: True}
    assert req.inputs["a"].dtype == np.float32  # the caller's request is not changed
    ints = InferRequest("m", {"b": np.ones((1, 2), np.int64)})
    assert downcast_fp16(ints) is ints  # nothing to shrink: no parameter either
    assert wants_fp16(check_setting(True), "any")
    assert not wants_fp16(check_setting(["eu"]), "us")
    for bad in ("eu", 1, [""], [3]):
        with pytest.raises(ConfigError, match="upstream_fp16"):
            check_setting(bad)


def test_a_stock_region_refuses_fp16_without_the_parameter(server: Any) -> None:
    """What a Triton/KServe region does with FP16 for an FP32 input: a datatype error, which
    is why FP16 upstream is opt-in per region."""
    with HttpTransport(server.url, region="web") as t, pytest.raises(RemoteError, match="FP16"):
        t.infer(
            InferRequest("digits_cloud", {"input": np.zeros((1, 1, 8, 8), np.float16)}),
            timeout=10,
        )


def test_upcast_touches_only_fp16_for_an_fp32_input() -> None:
    from edgecloud.transport.compact import upcast_input

    req = InferRequest("m", {}, parameters={PARAMETER: True})
    h = np.ones((1, 2), np.float16)
    assert upcast_input(req, h, np.float32, model="m").dtype == np.float32
    assert upcast_input(req, h, np.float16, model="m") is h  # an FP16 input stays FP16
    d = np.ones((1, 2), np.float64)
    assert upcast_input(req, d, np.float32, model="m") is d  # FP64 is judged as always
    assert upcast_input(InferRequest("m", {}), h, np.float32, model="m") is h
