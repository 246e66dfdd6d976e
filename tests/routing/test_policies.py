"""Each routing policy alone, on a real local model and the real cloud model in-process.

No ``HybridClient`` here: a ``Router`` over a capacity limiter, a region selector and an
escalation object, a ``ModelSlot`` over a loaded onnxruntime backend, and one policy object
called directly, so each mode's order of edge and cloud is tested by itself. The client's own
tests (tests/routing/test_client.py, tests/test_hybrid_e2e.py over real HTTP) cover them composed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgecloud.errors import ConnectionFailed, NoRouteError
from edgecloud.routing.calibrated import confidence_from_manifest
from edgecloud.routing.capacity import CapacityLimiter
from edgecloud.routing.engine import Router
from edgecloud.routing.escalation import Escalation
from edgecloud.routing.factory import reshape_adapter
from edgecloud.routing.modes import Mode, Reason
from edgecloud.routing.policies import (
    POLICIES,
    CloudFirst,
    CloudOnly,
    EdgeFirst,
    EdgeOnly,
    make_policies,
)
from edgecloud.routing.regions import Region, RegionSelector
from edgecloud.routing.result import IDENTITY_FIELDS, HybridResult, ModelSlot
from edgecloud.runtime import load_backend
from edgecloud.runtime.base import Backend
from edgecloud.transport.base import Transport
from edgecloud.transport.v2 import InferRequest, InferResponse
from tests.fixtures.packages import CLOUD_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package


class CnnRegion(Transport):
    """The cloud CNN in-process; ``fail`` makes every request fail like a refused connection."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.fail = False
        self.requests: list[InferRequest] = []

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        self.requests.append(request)
        if self.fail:
            raise ConnectionFailed("near: connection refused", region="near")
        out = self.session.run(["logits"], dict(request.inputs))
        return InferResponse(model=request.model, outputs={"logits": out[0]})


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    pkg, pub = make_package(tmp_path_factory.mktemp("policies") / "edge", version="7")
    b = load_backend(pkg, public_key=pub)
    yield b
    b.close()


@pytest.fixture(scope="module")
def inputs(backend: Backend) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(a sure row, an unsure row) of the validation set, by the edge model's own confidence."""
    x = np.load(SAMPLES / "data" / "edge_val.npz")["input"]
    assert backend.manifest is not None
    conf = confidence_from_manifest(backend.manifest, "max_probability")
    assert conf is not None
    c = conf(backend.infer({"input": x}))
    return {"input": x[int(np.argmax(c)) :][:1]}, {"input": x[int(np.argmin(c)) :][:1]}


@pytest.fixture
def region() -> CnnRegion:
    return CnnRegion(ort.InferenceSession(str(CLOUD_ONNX), providers=["CPUExecutionProvider"]))


@pytest.fixture
def router(region: CnnRegion) -> Iterator[Router]:
    selector = RegionSelector([Region("near", region, model="digits_cloud")])
    r = Router(CapacityLimiter(1), selector, Escalation(), cloud_inputs=reshape_adapter((1, 8, 8)))
    yield r
    r.escalation.close()


def _slot(backend: Backend, threshold: float = 0.9) -> ModelSlot:
    manifest = backend.manifest
    assert manifest is not None
    return ModelSlot(
        backend, manifest, confidence_from_manifest(manifest, "max_probability"), threshold
    )


def _no_regions(router: Router) -> Router:
    return Router(router.capacity, RegionSelector([]), router.escalation, clock=router.clock)


def _call(policy: Any, slot: ModelSlot | None, x: dict[str, np.ndarray], **kw: Any) -> HybridResult:
    result: HybridResult = policy.infer(slot, x, policy.router.clock(), 5.0, **kw)
    return result


def test_edge_first_keeps_sure_answers_and_sends_unsure_ones(
    router: Router, region: CnnRegion, backend: Backend, inputs: Any
) -> None:
    sure, unsure = inputs
    p = EdgeFirst(router)
    slot = _slot(backend)
    r = _call(p, slot, sure)
    assert (r.source, r.reason, r.degraded, r.version) == ("edge", Reason.CONFIDENT, False, "7")
    assert region.requests == []
    r = _call(p, slot, unsure)
    assert (r.source, r.reason) == ("cloud:near", Reason.LOW_CONFIDENCE)
    assert r.local_outputs is not None
    assert r.local_outputs["logits"].shape == (1, 10)
    assert region.requests[0].inputs["input"].shape == (1, 1, 8, 8)  # the cloud's layout
    assert _call(p, slot, sure, threshold=1.0).reason == Reason.LOW_CONFIDENCE  # per request
    region.fail = True
    r = _call(p, slot, unsure)
    assert (r.source, r.reason, r.degraded) == ("edge", Reason.CLOUD_FAILED, True)
    assert "connection refused" in r.error_summary()
    r = _call(EdgeFirst(_no_regions(router)), slot, unsure)
    assert (r.reason, r.degraded) == (Reason.NO_REGIONS, True)
    assert router.capacity.active == 0  # every path gave its local slot back


def test_edge_first_saturated_goes_to_the_cloud_at_once(
    router: Router, region: CnnRegion, backend: Backend, inputs: Any
) -> None:
    assert router.capacity.try_acquire()  # another request holds the one local slot
    try:
        r = _call(EdgeFirst(router), _slot(backend), inputs[0])
    finally:
        router.capacity.release()
    assert (r.source, r.reason) == ("cloud:near", Reason.NO_CAPACITY)


def test_edge_first_batch_sends_only_the_unsure_rows(
    router: Router, region: CnnRegion, backend: Backend, inputs: Any
) -> None:
    sure, unsure = inputs
    feed = {"input": np.concatenate([sure["input"], unsure["input"], sure["input"]])}
    from edgecloud.routing.deadline import Deadline

    results = EdgeFirst(router).infer_batch(_slot(backend), feed, 3, Deadline(5.0))
    assert [r.reason for r in results] == [
        Reason.CONFIDENT,
        Reason.LOW_CONFIDENCE,
        Reason.CONFIDENT,
    ]
    (request,) = region.requests
    assert request.inputs["input"].shape == (1, 1, 8, 8)  # one sub-batch of the one unsure row


def test_edge_only_never_asks_the_cloud(
    router: Router, region: CnnRegion, backend: Backend, inputs: Any
) -> None:
    r = _call(EdgeOnly(router), _slot(backend), inputs[1])
    assert (r.source, r.reason, r.degraded) == ("edge", Reason.FORCED, False)
    assert r.confidence is not None
    assert r.confidence < 0.9
    assert region.requests == []
    with pytest.raises(NoRouteError, match="edge_only needs a local model"):
        _call(EdgeOnly(router), None, inputs[1])
    assert router.capacity.try_acquire()
    try:
        with pytest.raises(NoRouteError, match="no local inference slot became free"):
            EdgeOnly(router).infer(_slot(backend), inputs[1], router.clock(), 0.05)
    finally:
        router.capacity.release()


def test_cloud_only_has_no_local_fallback(
    router: Router, region: CnnRegion, backend: Backend, inputs: Any
) -> None:
    r = _call(CloudOnly(router), _slot(backend), inputs[0])
    assert (r.source, r.reason, r.version) == ("cloud:near", Reason.FORCED, "7")
    r = _call(CloudOnly(router), None, inputs[0])  # a cloud-only client: no slot, no version
    assert (r.source, r.version, r.model) == ("cloud:near", "", "")
    region.fail = True
    with pytest.raises(NoRouteError, match=r"no cloud region answered: near: .*refused"):
        _call(CloudOnly(router), _slot(backend), inputs[0])
    with pytest.raises(NoRouteError, match="needs a cloud region"):
        _call(CloudOnly(_no_regions(router)), _slot(backend), inputs[0])


def test_cloud_first_falls_back_to_the_local_answer(
    router: Router, region: CnnRegion, backend: Backend, inputs: Any
) -> None:
    r = _call(CloudFirst(router), _slot(backend), inputs[0])
    assert (r.source, r.reason) == ("cloud:near", Reason.FORCED)
    region.fail = True
    r = _call(CloudFirst(router), _slot(backend), inputs[0])
    assert (r.source, r.reason, r.degraded) == ("edge", Reason.CLOUD_FAILED, True)
    assert "near" in r.errors
    r = _call(CloudFirst(_no_regions(router)), _slot(backend), inputs[0])
    assert (r.source, r.reason, r.degraded) == ("edge", Reason.NO_REGIONS, True)


def test_one_policy_per_mode(router: Router) -> None:
    policies = make_policies(router)
    assert set(policies) == set(Mode) == set(POLICIES)
    for mode, policy in policies.items():
        assert policy.mode is mode
        assert policy.router is router  # type: ignore[attr-defined]


def test_the_positional_hot_path_result_matches_the_fields(
    router: Router, backend: Backend, inputs: Any
) -> None:
    """The confident answer is built positionally (half a keyword call's cost): pin the order."""
    names = [f.name for f in dataclasses.fields(HybridResult)]
    assert names[:9] == [
        "outputs", "source", "reason", "confidence", "degraded", "local_time", "cloud_time",
        "errors", "confidences",
    ]  # fmt: skip
    assert tuple(names[9:14]) == IDENTITY_FIELDS
    slot = _slot(backend)
    r = _call(EdgeFirst(router), slot, inputs[0])
    assert r.reason == Reason.CONFIDENT
    keyword = router.result(
        slot, r.outputs, "edge", Reason.CONFIDENT, r.confidences, conf=r.confidence
    )
    for f in names:
        if f not in ("local_time", "cloud_future"):
            assert getattr(r, f) is getattr(keyword, f) or getattr(r, f) == getattr(keyword, f), f
    assert r.errors == {}
    assert r.errors is not router.result(slot, {}, "e", r.reason, None).errors  # not shared


def test_a_custom_policy_needs_only_the_protocol(router: Router, backend: Backend) -> None:
    """What routing/ promises: a mode is a small object over the shared Router."""

    class AlwaysDegraded:
        mode = Mode.EDGE_ONLY

        def __init__(self, r: Router) -> None:
            self.router = r

        def infer(self, slot: Any, inputs: Any, start: float, seconds: Any, *a: Any) -> Any:
            assert self.router.capacity.try_acquire()
            return self.router.degraded(slot, slot.backend.validate(inputs), {}, 0.0, True)

    x = {"input": np.zeros((1, 64), np.float32)}
    r = _call(AlwaysDegraded(router), _slot(backend), x)
    assert (r.reason, r.degraded, r.source) == (Reason.DEADLINE, True, "edge")
