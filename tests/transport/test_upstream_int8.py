"""INT8 tensors upstream: UINT8 with per-tensor dequantize parameters, over HTTP, MQTT and gRPC.

Real parts: the digits cloud CNN in one real ``ServingCore`` behind the real HTTP server and the
real gRPC server on loopback (and MQTT workers on a real Mosquitto), ``HybridClient`` in
``cloud_only`` mode on the digits edge package, the transports' own byte counters. Malformed
dequantize parameters go to the real servers from a seeded generator: a 400 naming the input and
the key, never a 5xx; valid ones are answered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgecloud.client import HybridClient
from edgecloud.errors import ConfigError, InputError, RemoteError
from edgecloud.transport.compact import (
    SCALE,
    ZERO_POINT,
    check_settings,
    dequantize_input,
    quantize_int8,
)
from edgecloud.transport.grpc import GrpcTransport
from edgecloud.transport.mqtt import MqttTransport
from edgecloud.transport.v2 import V2_TO_DTYPE, InferRequest, decode_request, encode_request
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.packages import CLOUD_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package
from tests.fixtures.servers import make_repository, running_cloud_server

MODEL = "digits_cloud"
#: Measured: INT8 and FP32 offloads agree on 360 of 360 held-out digits rows (one row per
#: request, so the scale is per row); the bound leaves room for a different rounding.
AGREEMENT = 0.98


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo8"), {MODEL: CLOUD_ONNX})


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Any]:
    """The HTTP region, and a gRPC server on the same core (``server.grpc_url``)."""
    from edgecloud.cloud.grpc_server import GrpcServer

    with running_cloud_server(repo, region="web", subprocess=False, threads=1) as s:
        with GrpcServer(s.core, region="web") as g:
            s.grpc_url = g.url
            yield s


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_package(tmp_path_factory.mktemp("int8") / "edge")


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, np.ndarray]:
    d = np.load(SAMPLES / "data" / "edge_val.npz")
    return d["input"], d["labels"]


def _region(name: str, endpoint: str, **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "endpoint": endpoint,
        "model": MODEL,
        "cloud_input_shape": [1, 8, 8],
        "options": options,
    }


def _cloud_answers(
    pkg: tuple[Path, Path], region: dict[str, Any], x: np.ndarray, **kw: Any
) -> tuple[np.ndarray, dict[str, float]]:
    with HybridClient(pkg[0], public_key=pkg[1], regions=[region], mode="cloud_only", **kw) as c:
        labels = []
        for row in x:
            r = c.infer({"input": row[None]})
            assert r.source.startswith("cloud:"), r
            labels.append(int(np.asarray(r.outputs["logits"]).argmax()))
        counter = c.selector.regions[0].transport.upstream.snapshot()
    return np.array(labels), counter


def test_http_int8_agrees_with_fp32_on_the_held_out_rows_and_sends_fewer_bytes(
    server: Any, pkg: tuple[Path, Path], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = rows
    region = _region("web", server.url, binary_threshold=0)
    fp32, c32 = _cloud_answers(pkg, region, x)
    int8, c8 = _cloud_answers(pkg, region, x, upstream_int8=True)
    assert c32["requests"] == c8["requests"] == len(x)
    assert np.mean(int8 == fp32) >= AGREEMENT
    assert np.mean(int8 == y) >= np.mean(fp32 == y) - 0.02
    # 256 bytes of FP32 tensor data become 64, less the two parameters (about 70 bytes)
    saved = c32["bytes_per_request"] - c8["bytes_per_request"]
    assert 192 - 90 <= saved < 192


def test_mqtt_and_grpc_carry_int8_and_fp16(
    repo: Path,
    server: Any,
    pkg: tuple[Path, Path],
    rows: tuple[np.ndarray, np.ndarray],
) -> None:
    from edgecloud.cloud.core import ServingCore
    from edgecloud.cloud.mqtt_worker import start_mqtt_workers

    x = rows[0][:40]
    g = _region("g", server.grpc_url)
    g32, cg32 = _cloud_answers(pkg, g, x)
    g8, cg8 = _cloud_answers(pkg, g, x, upstream_int8=["g"])
    g16, cg16 = _cloud_answers(pkg, g, x, upstream_fp16=True)
    assert np.mean(g8 == g32) >= AGREEMENT
    assert np.array_equal(g16, g32)  # digits pixels are k/16: exact in FP16
    assert cg32["requests"] == cg8["requests"] == cg16["requests"] == len(x)
    assert cg8["bytes_per_request"] < cg16["bytes_per_request"] < cg32["bytes_per_request"]
    assert cg32["bytes_per_request"] - cg16["bytes_per_request"] >= 128 - 30

    with MosquittoBroker() as broker:
        core = ServingCore(repo, max_batch_size=8, max_queue_delay_ms=1.0)
        pool = start_mqtt_workers(core, broker=broker.url, region="mq", workers=1)
        try:
            m = _region("mq", broker.url, device_id="dev-int8", binary_threshold=0)
            m32, cm32 = _cloud_answers(pkg, m, x[:20])
            m8, cm8 = _cloud_answers(pkg, m, x[:20], upstream_int8=["mq"])
            bad = InferRequest(
                MODEL, {"input": _GOOD_U8}, input_parameters={"input": {SCALE: "-1", ZERO_POINT: 0}}
            )
            with (
                MqttTransport(broker.url, region="mq", device_id="dev-int8") as t,
                pytest.raises(RemoteError) as ei,
            ):
                t.infer(bad, timeout=10)
        finally:
            pool.stop()
            core.close()
    assert np.mean(m8 == m32) >= AGREEMENT
    assert ei.value.status == 400
    assert f"input 'input': parameter '{SCALE}' must be a finite number > 0" in str(ei.value)
    assert 192 - 90 <= cm32["bytes_per_request"] - cm8["bytes_per_request"] < 192


def test_int8_only_for_the_regions_named(
    server: Any, pkg: tuple[Path, Path], rows: tuple[np.ndarray, np.ndarray]
) -> None:
    x = rows[0][:4]
    region = _region("web", server.url, binary_threshold=0)
    _, other = _cloud_answers(pkg, region, x, upstream_int8=["elsewhere"], upstream_fp16=["web"])
    _, fp16 = _cloud_answers(pkg, region, x, upstream_fp16=True)
    assert other["bytes_per_request"] == fp16["bytes_per_request"]  # web got FP16, not INT8


def test_quantize_round_trip_and_zero_is_exact() -> None:
    rng = np.random.default_rng(3)
    for lo, hi in ((-2.0, 3.0), (0.5, 4.0), (-7.0, -1.0), (0.0, 0.0)):
        a = rng.uniform(lo, hi, (3, 5)).astype(np.float32)
        a[0, 0] = 0.0
        req = InferRequest("m", {"a": a, "i": np.ones((1, 2), np.int64)})
        q = quantize_int8(req)
        assert q.inputs["a"].dtype == np.uint8
        assert q.inputs["i"].dtype == np.int64
        assert set(q.input_parameters) == {"a"}
        p = q.input_parameters["a"]
        assert isinstance(p[SCALE], str)
        assert isinstance(p[ZERO_POINT], int)
        back = dequantize_input(q, "a", q.inputs["a"], np.float32, model="m")
        assert back.dtype == np.float32
        assert back[0, 0] == 0.0
        step = float(p[SCALE])
        assert np.max(np.abs(back - a)) <= step / 2 + 1e-6
        assert req.inputs["a"].dtype == np.float32  # the caller's request is not changed
    nan = InferRequest("m", {"a": np.array([[np.nan, 1.0]], np.float32)})
    assert quantize_int8(nan) is nan  # no affine map for NaN: sent as FP32


def test_settings_refuse_one_region_both_ways() -> None:
    assert check_settings(["eu"], ["us"]) == (frozenset({"eu"}), frozenset({"us"}))
    assert check_settings(False, True) == (False, True)
    for fp16, int8, named in (
        (True, True, "every region"),
        (True, ["us"], "'us'"),
        (["eu", "us"], True, "'eu', 'us'"),
        (["eu", "us"], ["us"], "'us'"),
    ):
        with pytest.raises(ConfigError, match="upstream_fp16 and upstream_int8") as ei:
            check_settings(fp16, int8)
        assert named in str(ei.value)
    with pytest.raises(ConfigError, match="upstream_int8 must be"):
        check_settings(False, "eu")


# -- malformed parameters against the real servers ----------------------------------------------

_GOOD_U8 = np.full((1, 1, 8, 8), 7, np.uint8)


def _json_body(params: dict[str, Any], datatype: str = "UINT8") -> bytes:
    data = [7] * 64 if datatype != "FP32" else [0.5] * 64
    entry = {"name": "input", "shape": [1, 1, 8, 8], "datatype": datatype, "data": data}
    if params:
        entry["parameters"] = params
    return json.dumps({"inputs": [entry]}).encode()


def _post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v2/models/{MODEL}/infer",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


MALFORMED: list[tuple[dict[str, Any], str, str]] = [
    ({SCALE: "0.01"}, "UINT8", ZERO_POINT),  # zero point missing
    ({ZERO_POINT: 3}, "UINT8", SCALE),  # scale missing
    ({SCALE: "0", ZERO_POINT: 3}, "UINT8", SCALE),
    ({SCALE: "-0.5", ZERO_POINT: 3}, "UINT8", SCALE),
    ({SCALE: "nan", ZERO_POINT: 3}, "UINT8", SCALE),
    ({SCALE: "inf", ZERO_POINT: 3}, "UINT8", SCALE),
    ({SCALE: "zero point one", ZERO_POINT: 3}, "UINT8", SCALE),
    ({SCALE: 0.01, ZERO_POINT: 3}, "UINT8", SCALE),  # a number, not the string V2 carries
    ({SCALE: "1e300", ZERO_POINT: 3}, "UINT8", SCALE),  # beyond FP32
    ({SCALE: "1e-60", ZERO_POINT: 3}, "UINT8", SCALE),  # rounds to 0.0 in FP32
    ({SCALE: "0.01", ZERO_POINT: 256}, "UINT8", ZERO_POINT),
    ({SCALE: "0.01", ZERO_POINT: -1}, "UINT8", ZERO_POINT),
    ({SCALE: "0.01", ZERO_POINT: "3"}, "UINT8", ZERO_POINT),
    ({SCALE: "0.01", ZERO_POINT: True}, "UINT8", ZERO_POINT),
    ({SCALE: "0.01", ZERO_POINT: 3}, "FP32", SCALE),  # datatype not UINT8
    ({SCALE: "0.01", ZERO_POINT: 3}, "INT8", SCALE),
]


@pytest.mark.parametrize(("params", "datatype", "key"), MALFORMED)
def test_malformed_dequantize_parameters_are_a_400_naming_input_and_key(
    server: Any, params: dict[str, Any], datatype: str, key: str
) -> None:
    r = _post(server.url, _json_body(params, datatype))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "input 'input'" in err, err
    assert f"'{key}'" in err, err


def test_a_stock_region_refuses_uint8_without_the_parameters(server: Any) -> None:
    r = _post(server.url, _json_body({}))
    assert r.status_code == 400
    assert "expected datatype FP32, got UINT8" in r.json()["error"]


def _random_params(rng: np.random.Generator) -> tuple[dict[str, Any], str, bool]:
    """Parameters from a seeded mix of good and bad values, the datatype, and whether valid."""
    good_scales = [repr(float(rng.uniform(1e-6, 10))), repr(float(rng.uniform(1e-3, 1))), "1e-30"]
    good_scales.append("1e36")  # 255 * 1e36 still fits FP32
    bad_scales: list[Any] = [
        repr(-float(rng.uniform(0, 5))),
        "0.0",
        "NaN",
        "-inf",
        "",
        "1" * 80,
        "0x1p-3",
        "2e36",
        "1e-46",
        float(rng.uniform(0, 1)),
        int(rng.integers(1, 5)),
        bool(rng.integers(0, 2)),
    ]
    good_zps = [int(rng.integers(0, 256)), 0, 255]
    bad_zps: list[Any] = [
        int(rng.integers(256, 10**12)),
        -int(rng.integers(1, 10**12)),
        "12",
        False,
    ]
    params: dict[str, Any] = {}
    ok = True
    for key, good, bad in ((SCALE, good_scales, bad_scales), (ZERO_POINT, good_zps, bad_zps)):
        if rng.random() < 0.08:  # left out
            ok = False
        elif rng.random() < 0.6:
            params[key] = good[int(rng.integers(len(good)))]
        else:
            params[key] = bad[int(rng.integers(len(bad)))]
            ok = False
    datatype = "UINT8" if rng.random() < 0.85 else str(rng.choice(["FP32", "INT8", "UINT16"]))
    return params, datatype, ok and datatype == "UINT8"


def test_fuzz_dequantize_parameters_over_http_never_a_5xx(server: Any) -> None:
    rng = np.random.default_rng(1515)
    seen = {200: 0, 400: 0}
    for _ in range(120):
        params, datatype, ok = _random_params(rng)
        r = _post(server.url, _json_body(params, datatype))
        assert r.status_code == (200 if ok else 400), (params, datatype, r.text)
        seen[r.status_code] += 1
        if not ok:
            err = r.json()["error"]
            assert "input 'input'" in err, err
            assert "dequantize_" in err or "UINT8" in err, err
        else:
            assert len(r.json()["outputs"][0]["data"]) == 10  # answered (1e36 may overflow)
    assert seen[200] > 10
    assert seen[400] > 10


def test_fuzz_dequantize_parameters_over_grpc_never_a_5xx(server: Any) -> None:
    rng = np.random.default_rng(2626)
    with GrpcTransport(server.grpc_url, region="g") as t:
        for _ in range(60):
            params, datatype, ok = _random_params(rng)
            arr = _GOOD_U8.astype(V2_TO_DTYPE[datatype])
            req = InferRequest(MODEL, {"input": arr}, input_parameters={"input": params})
            if ok:
                assert t.infer(req, timeout=10).outputs["logits"].shape == (1, 10)
                continue
            with pytest.raises(RemoteError) as ei:
                t.infer(req, timeout=10)
            assert ei.value.status == 400, ei.value
            assert "input 'input'" in str(ei.value), ei.value
            assert "dequantize_" in str(ei.value), ei.value


def test_grpc_dequantizes_like_http(server: Any) -> None:
    x = np.load(SAMPLES / "data" / "cloud_val.npz")["input"][:5]
    q = quantize_int8(InferRequest(MODEL, {"input": x}))
    with GrpcTransport(server.grpc_url, region="g") as g:
        a = g.infer(q, timeout=10).outputs["logits"]
    body, hl = encode_request(q, binary=True)
    assert decode_request(body, hl).input_parameters == q.input_parameters  # the codec keeps them
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        content=body,
        headers={
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(hl),
        },
        timeout=10,
    )
    assert r.status_code == 200, r.text
    b = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(a.shape)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dequantize_refuses_an_input_that_is_not_fp32() -> None:
    req = InferRequest("m", {}, input_parameters={"a": {SCALE: "0.5", ZERO_POINT: 1}})
    with pytest.raises(InputError, match=f"input 'a'.*'{SCALE}' is for FP32 model inputs"):
        dequantize_input(req, "a", np.ones(2, np.uint8), np.int64, model="m")


@pytest.mark.parametrize("seed", range(4))
def test_codec_round_trips_input_parameters(seed: int) -> None:
    """Seeded: random inputs, some with INT8 parameters, JSON or binary: the decoded request has
    the same tensors and the same per-input parameters (``binary_data_size`` not among them)."""
    rng = np.random.default_rng(seed)
    inputs = {
        f"in{i}": rng.normal(0, 3, tuple(int(d) for d in rng.integers(1, 5, 2))).astype(np.float32)
        for i in range(int(rng.integers(1, 4)))
    }
    req = quantize_int8(InferRequest(MODEL, inputs))
    keep = [n for n in inputs if rng.random() < 0.5]
    req.inputs.update({n: inputs[n] for n in keep})  # some stay FP32, without parameters
    for n in keep:
        req.input_parameters.pop(n)
    for binary in (False, True):
        body, hl = encode_request(req, binary=binary)
        back = decode_request(body, hl, model=MODEL)
        assert back.input_parameters == req.input_parameters
        for n, a in req.inputs.items():
            np.testing.assert_array_equal(back.inputs[n], a)


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.from_regex(r"-?[0-9]{0,3}(\.[0-9]{0,20})?(e-?[0-9]{1,3})?", fullmatch=True),
)


@settings(max_examples=300, deadline=None)
@given(
    scale=_ANY,
    zp=_ANY,
    drop=st.sampled_from(["", SCALE, ZERO_POINT]),
    dtype=st.sampled_from([np.uint8, np.uint8, np.int8, np.float32, np.uint16]),
)
def test_property_dequantize_raises_only_input_errors(
    scale: Any, zp: Any, drop: str, dtype: Any
) -> None:
    """Any parameter values: an FP32 array, or an ``InputError`` naming the input and a key."""
    params = {SCALE: scale, ZERO_POINT: zp}
    params.pop(drop, None)
    params = {k: v for k, v in params.items() if v is not None}
    req = InferRequest("m", {}, input_parameters={"x": params})
    arr = np.arange(6, dtype=dtype).reshape(2, 3)
    try:
        out = dequantize_input(req, "x", arr, np.float32, model="m")
    except InputError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert "input 'x': parameter 'dequantize_" in message
        return
    if not params:
        assert out is arr
        return
    assert out.dtype == np.float32
    assert out.shape == arr.shape
    assert float(params[SCALE]) > 0
    assert 0 <= params[ZERO_POINT] <= 255
