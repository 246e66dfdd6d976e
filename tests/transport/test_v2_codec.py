"""The V2 codec: JSON and binary round trips, and clear errors for malformed bodies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecloud.errors import ProtocolError
from edgecloud.transport.v2 import (
    InferRequest,
    InferResponse,
    decode_error,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
)


@pytest.mark.parametrize("binary", [False, True, 100])
def test_request_roundtrip(binary: bool | int) -> None:
    rng = np.random.default_rng(0)
    inputs = {
        "input": rng.standard_normal((3, 64)).astype(np.float32),
        "mask": np.array([[1, 0, 1]], dtype=np.int64),
        "flag": np.array([True, False]),
    }
    req = InferRequest(model="m", inputs=inputs, id="r1", outputs=["logits"])
    body, hlen = encode_request(req, binary=binary)
    if binary is False:
        assert hlen is None
    else:
        assert hlen is not None
        assert hlen < len(body)
    got = decode_request(body, hlen, model="m")
    assert got.id == "r1"
    assert got.outputs == ["logits"]
    for k, v in inputs.items():
        np.testing.assert_array_equal(got.inputs[k], v)
        assert got.inputs[k].dtype == v.dtype


def test_response_roundtrip_binary() -> None:
    out = {"logits": np.arange(20, dtype=np.float32).reshape(2, 10)}
    body, hlen = encode_response(InferResponse(model="m", version="3", outputs=out), binary=True)
    got = decode_response(body, hlen)
    assert got.model == "m"
    assert got.version == "3"
    np.testing.assert_array_equal(got.outputs["logits"], out["logits"])


def test_json_form_matches_spec() -> None:
    body, _ = encode_request(InferRequest(model="m", inputs={"x": np.ones((1, 2), np.float32)}))
    d = json.loads(body)
    assert d == {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}]}


@pytest.mark.parametrize(
    ("body", "hlen", "match"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (b'{"inputs": 3}', None, "must be a list"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP99", "data": [1,2]}]}',
            None,
            "unsupported datatype",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1,2]}]}',
            None,
            "do not fill shape",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}',
            None,
            "non-negative",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a","b"]}]}',
            None,
            "data is not FP32",
        ),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}', None, "neither 'data'"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",'
            b' "parameters": {"binary_data_size": 8}}]}abc',
            87,
            "body ends before",
        ),
        (b"{}", 50, "Inference-Header-Content-Length is 50"),
    ],
)
def test_malformed_requests_are_named(body: bytes, hlen: int | None, match: str) -> None:
    if hlen == 87:
        hlen = body.index(b"abc")
    with pytest.raises(ProtocolError, match=match):
        decode_request(body, hlen)


def test_error_bodies() -> None:
    assert decode_error(encode_error("model 'x' not found")) == "model 'x' not found"
    assert "non-V2" in decode_error(b"<html>502</html>")
