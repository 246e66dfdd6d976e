"""Property tests of the V2 codec (hypothesis): whatever the bytes, a ProtocolError or a request.

The seeded mixes in test_fuzz_*.py drive the real servers; these drive the codec alone, much
faster, over shapes of input no hand-written list covers: any JSON value in any field, any
header length, NaN and infinities in outputs.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecloud.errors import ProtocolError
from edgecloud.limits import Limits
from edgecloud.transport.v2 import (
    InferResponse,
    decode_request,
    decode_response,
    encode_response,
    encode_response_mixed,
)

LIMITS = Limits(max_json_bytes=64 * 1024, max_json_depth=16)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.text(max_size=4), json_values),
        "datatype": st.one_of(st.sampled_from(["FP32", "INT64", "BOOL", "BYTES"]), json_values),
        "shape": st.one_of(
            st.lists(st.integers(min_value=-2, max_value=2**64), max_size=70), json_values
        ),
        "data": json_values,
        "parameters": st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.integers(-5, 2**40)}), json_values
        ),
    },
)
request = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.one_of(st.lists(tensor, max_size=3), json_values),
        "outputs": json_values,
        "parameters": json_values,
        "id": json_values,
    },
)


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(body=request, tail=st.binary(max_size=64), hl=st.one_of(st.none(), st.integers(-3, 400)))
def test_decode_request_raises_only_protocol_errors(body: Any, tail: bytes, hl: int | None) -> None:
    raw = json.dumps(body).encode()
    data = raw + tail if hl is not None else raw
    try:
        req = decode_request(data, hl, model="m", limits=LIMITS)
    except ProtocolError:
        return
    for arr in req.inputs.values():
        assert isinstance(arr, np.ndarray)


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.binary(max_size=300))
def test_decode_request_of_any_bytes(data: bytes) -> None:
    try:
        decode_request(data, None, limits=LIMITS)
    except ProtocolError:
        pass


@settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=20),
    st.booleans(),
)
def test_nonfinite_outputs_are_strict_json_and_round_trip(values: list[float], mixed: bool) -> None:
    arr = np.asarray(values, np.float32)
    resp = InferResponse(model="m", outputs={"y": arr})
    body, hl = encode_response_mixed(resp, False) if mixed else encode_response(resp)
    assert hl is None

    def refuse(name: str) -> Any:
        raise AssertionError(f"bare {name} in a JSON body")

    json.loads(body, parse_constant=refuse)
    back = decode_response(body).outputs["y"]
    assert back.dtype == np.float32
    for a, b in zip(back.tolist(), arr.tolist(), strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == b
