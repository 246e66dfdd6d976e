"""HybridClient routing on real onnxruntime sessions of the sample models.

The "cloud" here is the real digits CNN run by onnxruntime behind an in-process transport, so
these tests pin the client's decisions (modes, reasons, degraded answers, capacity, deadline,
batches, model swap, config) quickly; tests/test_hybrid_e2e.py repeats the important paths
against real HTTP region servers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgecloud.client import HybridClient, HybridResult, reshape_adapter
from edgecloud.config import load_config
from edgecloud.errors import (
    ConfigError,
    ConnectionFailed,
    DTypeError,
    InputError,
    NoRouteError,
    RemoteError,
    ShapeError,
    TransportTimeout,
)
from edgecloud.routing import CircuitBreaker, Region
from edgecloud.runtime import load_backend
from edgecloud.transport import open_transport
from edgecloud.transport.base import Transport
from edgecloud.transport.v2 import InferRequest, InferResponse
from tests.fixtures.packages import CLOUD_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package


class OrtRegion(Transport):
    """The cloud CNN in-process; ``fail``/``delay`` script an outage or a slow region."""

    def __init__(self, name: str, session: ort.InferenceSession) -> None:
        self.region = name
        self.session = session
        self.fail: Exception | None = None
        self.delay = 0.0
        self.requests: list[InferRequest] = []

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        self.requests.append(request)
        if self.delay:
            time.sleep(min(self.delay, timeout))
            if self.delay > timeout:
                raise TransportTimeout(f"{self.region}: no answer in {timeout:.3f} s")
        if self.fail is not None:
            raise self.fail
        out = self.session.run(["logits"], dict(request.inputs))
        return InferResponse(model=request.model, outputs={"logits": out[0]})


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_package(tmp_path_factory.mktemp("client") / "edge")


@pytest.fixture(scope="module")
def cloud_session() -> ort.InferenceSession:
    return ort.InferenceSession(str(CLOUD_ONNX), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    d = np.load(SAMPLES / "data" / "edge_val.npz")
    return {"input": d["input"], "labels": d["labels"]}


@pytest.fixture(scope="module")
def edge_conf(pkg: tuple[Path, Path], data: dict[str, np.ndarray]) -> np.ndarray:
    b = load_backend(pkg[0], public_key=pkg[1])
    logits = b.infer({"input": data["input"]})["logits"].astype(np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return np.asarray((e / e.sum(1, keepdims=True)).max(1))


@pytest.fixture(scope="module")
def sure_and_unsure(edge_conf: np.ndarray) -> tuple[int, int]:
    return int(np.argmax(edge_conf)), int(np.argmin(edge_conf))


def row(data: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {"input": data["input"][i : i + 1]}


Factory = Callable[..., tuple[HybridClient, list[OrtRegion]]]


@pytest.fixture
def make_client(pkg: tuple[Path, Path], cloud_session: ort.InferenceSession) -> Factory:
    made: list[HybridClient] = []

    def factory(n_regions: int = 2, **kw: object) -> tuple[HybridClient, list[OrtRegion]]:
        fakes = [OrtRegion(f"r{i}", cloud_session) for i in range(n_regions)]
        regions = [
            {
                "name": f.region,
                "transport": f,
                "model": "digits_cloud",
                "cloud_input_shape": [1, 8, 8],
            }
            for f in fakes
        ]
        kw.setdefault("probe_interval", None)
        kw.setdefault("threshold", 0.9)
        client = HybridClient(pkg[0], public_key=pkg[1], regions=regions, **kw)  # type: ignore[arg-type]
        made.append(client)
        return client, fakes

    yield factory  # type: ignore[misc]
    for c in made:
        c.close()


def test_confident_answer_stays_on_the_edge(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client()
    sure, _ = sure_and_unsure
    r = client.infer(row(data, sure))
    assert r.source == "edge"
    assert r.reason == "confident"
    assert not r.degraded
    assert r.confidence is not None
    assert r.confidence >= 0.9
    assert r.local_time > 0
    assert r.cloud_time == 0
    assert fakes[0].requests == []
    assert r.label == str(int(data["labels"][sure]))
    top = r.top_k(3)
    assert len(top) == 3
    assert top[0][1] == pytest.approx(r.confidence, rel=1e-5)
    assert top[0][1] >= top[1][1] >= top[2][1]
    assert r.model == "digits_edge"


def test_unsure_answer_goes_to_the_cloud_with_reshaped_inputs(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client()
    _, unsure = sure_and_unsure
    r = client.infer(row(data, unsure))
    assert r.source in ("cloud:r0", "cloud:r1")
    assert r.region in ("r0", "r1")
    assert r.reason == "low_confidence"
    assert not r.degraded
    assert r.local_time > 0
    assert r.cloud_time > 0
    req = (fakes[0].requests or fakes[1].requests)[0]
    assert req.model == "digits_cloud"
    assert req.inputs["input"].shape == (1, 1, 8, 8)
    assert r.outputs["logits"].shape == (1, 10)


def test_all_regions_down_gives_degraded_local_answer(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client()
    fakes[0].fail = ConnectionFailed("connection refused", region="r0")
    fakes[1].fail = RemoteError("model not ready", region="r1", status=503)
    r = client.infer(row(data, sure_and_unsure[1]))
    assert r.source == "edge"
    assert r.degraded
    assert r.reason == "cloud_failed"
    assert isinstance(r.errors["r0"], ConnectionFailed)
    assert isinstance(r.errors["r1"], RemoteError)
    assert "r0: connection refused" in r.error_summary()
    assert r.outputs["logits"].shape == (1, 10)


def test_nearest_region_down_fails_over(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client()
    client.selector.regions[0].observe_rtt(0.001)
    client.selector.regions[1].observe_rtt(0.010)
    fakes[0].fail = ConnectionFailed("refused", region="r0")
    r = client.infer(row(data, sure_and_unsure[1]))
    assert r.source == "cloud:r1"
    assert set(r.errors) == {"r0"}


def test_no_regions_configured(
    pkg: tuple[Path, Path], data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    with HybridClient(pkg[0], public_key=pkg[1], threshold=0.9) as client:
        r = client.infer(row(data, sure_and_unsure[1]))
        assert r.source == "edge"
        assert r.reason == "no_regions"
        assert r.degraded
        with pytest.raises(NoRouteError, match="cloud_only needs a cloud region"):
            client.infer(row(data, 0), mode="cloud_only")


def test_modes(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client()
    sure, unsure = sure_and_unsure
    r = client.infer(row(data, unsure), mode="edge_only")
    assert (r.source, r.reason, r.degraded) == ("edge", "forced", False)
    r = client.infer(row(data, sure), mode="cloud_only")
    assert r.source.startswith("cloud:")
    assert r.reason == "forced"
    r = client.infer(row(data, sure), mode="cloud_first")
    assert r.source.startswith("cloud:")
    for f in fakes:
        f.fail = ConnectionFailed("down")
    r = client.infer(row(data, sure), mode="cloud_first")
    assert (r.source, r.reason, r.degraded) == ("edge", "cloud_failed", True)
    assert set(r.errors) == {"r0", "r1"}
    with pytest.raises(NoRouteError, match=r"no cloud region answered: r\d: down; r\d: down"):
        client.infer(row(data, sure), mode="cloud_only")
    with pytest.raises(ConfigError, match="mode must be one of"):
        client.infer(row(data, sure), mode="sideways")


def test_deadline_bounds_a_slow_cloud(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client()
    for f in fakes:
        f.delay = 5.0
    t0 = time.monotonic()
    r = client.infer(row(data, sure_and_unsure[1]), deadline=0.2)
    took = time.monotonic() - t0
    assert took < 0.2 + 0.15
    assert r.degraded
    assert r.reason == "deadline"
    assert r.source == "edge"
    # cloud_first keeps room for the local fallback within the deadline
    t0 = time.monotonic()
    r = client.infer(row(data, sure_and_unsure[0]), deadline=0.2, mode="cloud_first")
    assert time.monotonic() - t0 < 0.2 + 0.15
    assert (r.source, r.reason) == ("edge", "deadline")


def test_saturated_device_goes_to_the_cloud(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client(max_concurrency=1, max_queue=0)
    sure = sure_and_unsure[0]
    assert client.capacity.try_acquire()  # another request holds the only slot
    try:
        r = client.infer(row(data, sure))
        assert r.source.startswith("cloud:")
        assert r.reason == "no_capacity"
        assert r.local_time == 0
        # no region answers: wait for the slot and answer locally, degraded
        for f in fakes:
            f.fail = ConnectionFailed("down")
        threading.Timer(0.05, client.capacity.release).start()
        r = client.infer(row(data, sure), deadline=2.0)
        assert (r.source, r.reason, r.degraded) == ("edge", "cloud_failed", True)
    finally:
        while client.capacity.active:
            client.capacity.release()
    # and with the slot never freed, a clear error instead of a hang
    assert client.capacity.try_acquire()
    try:
        with pytest.raises(NoRouteError, match="device saturated"):
            client.infer(row(data, sure), deadline=0.1)
    finally:
        client.capacity.release()


def test_bad_inputs_are_refused_before_routing(make_client: Factory) -> None:
    client, fakes = make_client()
    with pytest.raises(ShapeError, match="input 'input'"):
        client.infer({"input": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(DTypeError, match="float64"):
        client.infer({"input": np.zeros((1, 64))}, mode="cloud_only")
    with pytest.raises(InputError, match="missing"):
        client.infer({"x": np.zeros((1, 64), np.float32)})
    assert fakes[0].requests == []
    assert fakes[1].requests == []


def test_infer_batch_sends_only_unsure_rows(
    make_client: Factory, data: dict[str, np.ndarray], edge_conf: np.ndarray
) -> None:
    client, fakes = make_client(n_regions=1)
    x = data["input"]
    results = client.infer_batch({"input": x})
    assert len(results) == len(x)
    n_unsure = int((edge_conf < 0.9).sum())
    assert 0 < n_unsure < len(x)
    assert len(fakes[0].requests) == 1  # one sub-batch request
    assert fakes[0].requests[0].inputs["input"].shape == (n_unsure, 1, 8, 8)
    cloud = [i for i, r in enumerate(results) if r.source == "cloud:r0"]
    assert cloud == list(np.flatnonzero(edge_conf < 0.9))
    assert all(r.reason == "confident" for r in results if r.source == "edge")
    preds = np.array([int(r.label or -1) for r in results])
    edge_acc = float(
        np.mean(np.argmax(client.backend.infer({"input": x})["logits"], 1) == data["labels"])
    )  # type: ignore[union-attr]
    hybrid_acc = float(np.mean(preds == data["labels"]))
    assert hybrid_acc > edge_acc
    # list of per-sample inputs (with or without the batch axis) and a bare array
    as_list = client.infer_batch([{"input": x[0]}, {"input": x[1]}])
    assert [r.outputs["logits"].shape for r in as_list] == [(1, 10), (1, 10)]
    assert len(client.infer_batch(x[:3])) == 3
    assert len(client.infer_batch(x[:4], mode="edge_only")) == 4
    assert client.infer_batch([]) == []


def test_threshold_per_model_and_custom_confidence(
    pkg: tuple[Path, Path], data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    sure = row(data, sure_and_unsure[0])
    with HybridClient(pkg[0], public_key=pkg[1], threshold={"digits_edge": 1.01, "*": 0.0}) as c:
        assert c.threshold == 1.01
        assert c.infer(sure).reason == "no_regions"
    with HybridClient(pkg[0], public_key=pkg[1], confidence=lambda out: 1.0, threshold=0.99) as c:
        assert c.infer(row(data, sure_and_unsure[1])).reason == "confident"
    with HybridClient(pkg[0], public_key=pkg[1], confidence="margin") as c:
        assert c.infer(sure).confidence is not None


def test_swap_model_under_load_loses_no_request(
    tmp_path: Path, pkg: tuple[Path, Path], data: dict[str, np.ndarray]
) -> None:
    pkg2, pub2 = make_package(tmp_path / "v2", name="digits_edge_v2", version="2")
    old = load_backend(pkg[0], public_key=pkg[1])
    new = load_backend(pkg2, public_key=pub2)
    assert old.manifest is not None
    assert new.manifest is not None
    client = HybridClient(backend=old, manifest=old.manifest, mode="edge_only", max_concurrency=4)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[str] = set()

    def worker() -> None:
        while not stop.is_set():
            try:
                seen.add(client.infer(row(data, 3), deadline=5.0).model)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    returned = client.swap_model(new, new.manifest)
    assert returned is old
    assert client.wait_drained(old, timeout=5.0)
    assert client.inflight(old) == 0
    old.close()  # safe: nothing runs on it any more
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(5)
    assert errors == []
    assert seen == {"digits_edge", "digits_edge_v2"}
    assert client.manifest is new.manifest
    assert client.infer(row(data, 3)).model == "digits_edge_v2"
    client.close()
    assert not new.closed  # the caller's backend is the caller's to close
    with pytest.raises(ConfigError, match="together"):
        HybridClient(backend=new)


def test_ainfer(make_client: Factory, data: dict[str, np.ndarray]) -> None:
    client, _ = make_client()

    async def main() -> list[HybridResult]:
        return await asyncio.gather(*(client.ainfer(row(data, i)) for i in range(4)))

    results = asyncio.run(main())
    assert len(results) == 4
    assert all(r.outputs["logits"].shape == (1, 10) for r in results)


def test_region_breaker_opens_across_requests(
    make_client: Factory, data: dict[str, np.ndarray], sure_and_unsure: tuple[int, int]
) -> None:
    client, fakes = make_client(n_regions=1, failure_threshold=2, cooldown=60)
    fakes[0].fail = ConnectionFailed("down")
    for _ in range(2):
        client.infer(row(data, sure_and_unsure[1]))
    n = len(fakes[0].requests)
    r = client.infer(row(data, sure_and_unsure[1]))
    assert len(fakes[0].requests) == n
    assert "circuit open" in str(r.errors["r0"])
    assert client.regions_status()[0]["state"] == "open"


def test_cloud_only_client_without_a_local_model(
    cloud_session: ort.InferenceSession, data: dict[str, np.ndarray]
) -> None:
    f = OrtRegion("r0", cloud_session)
    region = Region("r0", f, model="digits_cloud", cloud_inputs=reshape_adapter((1, 8, 8)))
    with HybridClient(regions=[region], probe_interval=None) as client:
        r = client.infer(row(data, 0))
        assert r.source == "cloud:r0"
        with pytest.raises(NoRouteError, match="edge_only needs a local model"):
            client.infer(row(data, 0), mode="edge_only")


def test_reshape_adapter_error_names_the_input() -> None:
    with pytest.raises(InputError, match=r"input 'input': cannot reshape \[1, 63\]"):
        reshape_adapter((1, 8, 8))({"input": np.zeros((1, 63), np.float32)})
    per = reshape_adapter({"a": (2, 2)})
    out = per({"a": np.zeros((3, 4)), "b": np.zeros((3, 4))})
    assert out["a"].shape == (3, 2, 2)
    assert out["b"].shape == (3, 4)


# -- config and transport factory ----------------------------------------------------------------


def test_from_config(tmp_path: Path, pkg: tuple[Path, Path], data: dict[str, np.ndarray]) -> None:
    cfg = tmp_path / "conf" / "client.toml"
    cfg.parent.mkdir()
    (tmp_path / "conf" / "models").symlink_to(pkg[0].parent)
    cfg.write_text(
        f"""
[model]
package = "models/{pkg[0].name}"
public_key = "{pkg[1]}"
threads = 1

[routing]
mode = "edge_first"
threshold = 0.8
deadline = 0.5
max_concurrency = 2
probe_interval = 30

[[regions]]
name = "eu"
endpoint = "http://127.0.0.1:9"
model = "digits_cloud"
cloud_input_shape = [1, 8, 8]
timeout = 0.2
[regions.options]
token = "s3cret"
"""
    )
    loaded = load_config(cfg)
    assert loaded.package == tmp_path / "conf" / "models" / pkg[0].name
    assert loaded.regions[0].options == {"token": "s3cret"}
    with HybridClient.from_config(cfg) as client:
        assert client.threshold == 0.8
        assert client.capacity.max_concurrency == 2
        assert client.prober is not None
        assert client.prober.running
        (region,) = client.selector.regions
        assert region.timeout == 0.2
        assert type(region.transport).__name__ == "HttpTransport"
        r = client.infer(row(data, 0), mode="edge_only")
        assert r.source == "edge"
    assert client.prober is not None
    assert not client.prober.running


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[routing]\ntreshold = 0.5\n", r"\[routing\]: unknown key\(s\) \['treshold'\]"),
        ("[routing]\nthreshold = 'high'\n", r"\[routing\]\.threshold: expected a number"),
        ("[routing]\ndeadline = -1\n", r"deadline: expected a number > 0"),
        ("[model]\nthreads = 1.5\n", r"threads: expected an integer"),
        ("[[regions]]\nname = 'a'\n", r"#1: missing required key 'endpoint'"),
        ("[[regions]]\nname='a'\nendpoint='x'\ncloud_input_shape=[0]\n", "positive integers"),
        ("[cloud]\n", r"unknown section\(s\) \['cloud'\]"),
        ("[routing\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def test_config_bad_mode_and_endpoint(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[routing]\nmode = 'edge-first'\n")
    with pytest.raises(ConfigError, match="mode must be one of"):
        HybridClient.from_config(p)
    p.write_text("[[regions]]\nname = 'a'\nendpoint = 'ftp://x'\n")
    with pytest.raises(ConfigError, match=r"region 'a': unknown endpoint scheme 'ftp'"):
        HybridClient.from_config(p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_open_transport_by_scheme(mosquitto: object) -> None:
    from edgecloud.transport.http import HttpTransport
    from edgecloud.transport.mqtt import MqttTransport

    with open_transport("http://127.0.0.1:9", region="eu", token="t") as t:
        assert isinstance(t, HttpTransport)
        assert t.region == "eu"
    url = mosquitto.url  # type: ignore[attr-defined]
    with open_transport(url, region="eu", device_id="dev1") as t:
        assert isinstance(t, MqttTransport)
        assert t.ready(timeout=5.0)
    with pytest.raises(ConfigError, match="unknown endpoint scheme 'ftp'"):
        open_transport("ftp://x:1", region="eu")
    with pytest.raises(ConfigError, match="must be a URL"):
        open_transport("localhost:80", region="eu")
    with pytest.raises(ConfigError, match=r"region 'eu': bad option for HttpTransport"):
        open_transport("http://x:1", region="eu", colour="red")


def test_breaker_instance_is_per_region(make_client: Factory) -> None:
    client, _ = make_client()
    a, b = client.selector.regions
    assert isinstance(a.breaker, CircuitBreaker)
    assert a.breaker is not b.breaker


def test_set_policy_is_validated_and_applies_to_active_and_later_models(
    tmp_path: Path,
    make_client: Factory,
    data: dict[str, np.ndarray],
    sure_and_unsure: tuple[int, int],
) -> None:
    client, fakes = make_client(threshold=0.9)
    sure, unsure = sure_and_unsure
    assert client.mode == "edge_first"
    assert client.infer(row(data, sure)).reason == "confident"
    # a threshold above every confidence sends even the sure row to the cloud
    client.set_policy(threshold=1.0)
    assert client.threshold == 1.0
    assert client.infer(row(data, sure)).reason == "low_confidence"
    client.set_policy(mode="edge_only")
    assert client.mode == "edge_only"
    assert client.threshold == 1.0  # None leaves the other part unchanged
    r = client.infer(row(data, unsure))
    assert (r.source, r.reason) == ("edge", "forced")
    n = len(fakes[0].requests) + len(fakes[1].requests)
    for bad, match in (
        ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\], got 1.5"),
        ({"threshold": float("nan")}, "got nan"),
        ({"threshold": True}, "got True"),
        ({"threshold": {"digits_edge": -0.1}}, "threshold for 'digits_edge'.*got -0.1"),
        ({"mode": "edge_sometimes", "threshold": 0.1}, "edge_sometimes"),
    ):
        with pytest.raises(ConfigError, match=match):
            client.set_policy(**bad)  # type: ignore[arg-type]
    # nothing changed by a refused policy (not even the valid threshold given with a bad mode)
    assert (client.mode, client.threshold) == ("edge_only", 1.0)
    client.set_policy(mode="edge_first", threshold={"digits_edge_v2": 0.0, "*": 1.0})
    assert client.threshold == 1.0
    # a model swapped in later gets the policy too (its own entry of the mapping)
    pkg2, pub2 = make_package(tmp_path / "v2", name="digits_edge_v2", version="2.0.0")
    new = load_backend(pkg2, public_key=pub2)
    assert new.manifest is not None
    old = client.swap_model(new, new.manifest)
    assert old is not None
    assert client.threshold == 0.0
    r = client.infer(row(data, unsure))
    assert (r.reason, r.version, r.model) == ("confident", "2.0.0", "digits_edge_v2")
    assert len(fakes[0].requests) + len(fakes[1].requests) == n
    client.wait_drained(old, 5.0)
    old.close()
    new.close()


def test_result_version_and_local_outputs(
    make_client: Factory,
    cloud_session: ort.InferenceSession,
    data: dict[str, np.ndarray],
    sure_and_unsure: tuple[int, int],
) -> None:
    client, _ = make_client()
    sure, unsure = sure_and_unsure
    edge = client.infer(row(data, sure))
    assert edge.version == "1"  # the package's manifest version
    assert edge.local_outputs is None
    cloud = client.infer(row(data, unsure))
    assert cloud.region is not None
    assert cloud.version == "1"
    assert cloud.local_outputs is not None
    # what the local model said, not the cloud's answer
    local = client.infer(row(data, unsure), mode="edge_only").outputs["logits"]
    np.testing.assert_allclose(cloud.local_outputs["logits"], local, rtol=1e-6)
    assert not np.allclose(cloud.local_outputs["logits"], cloud.outputs["logits"])
    batch = client.infer_batch({"input": data["input"][[sure, unsure]]})
    assert [b.version for b in batch] == ["1", "1"]
    assert batch[0].local_outputs is None
    assert batch[1].local_outputs is not None
    np.testing.assert_allclose(batch[1].local_outputs["logits"], local, rtol=1e-6)
    f = OrtRegion("r0", cloud_session)
    region = Region("r0", f, model="digits_cloud", cloud_inputs=reshape_adapter((1, 8, 8)))
    with HybridClient(regions=[region], probe_interval=None) as cloud_only:
        assert cloud_only.infer(row(data, 0)).version == ""


def test_set_policy_concurrent_with_requests_and_swaps(
    tmp_path: Path, pkg: tuple[Path, Path], data: dict[str, np.ndarray]
) -> None:
    a = load_backend(pkg[0], public_key=pkg[1])
    pkg2, pub2 = make_package(tmp_path / "v2", name="digits_edge_v2", version="2")
    b = load_backend(pkg2, public_key=pub2)
    assert a.manifest is not None
    assert b.manifest is not None
    client = HybridClient(backend=a, manifest=a.manifest, max_concurrency=4, threshold=0.5)
    stop = threading.Event()
    errors: list[BaseException] = []

    def requests() -> None:
        while not stop.is_set():
            try:
                client.infer(row(data, 3), deadline=5.0)
            except BaseException as exc:
                errors.append(exc)

    def swaps() -> None:
        for i in range(30):
            be = b if i % 2 == 0 else a
            assert be.manifest is not None
            old = client.swap_model(be, be.manifest)
            assert old is not None
            client.wait_drained(old, 5.0)

    threads = [threading.Thread(target=requests) for _ in range(2)]
    threads.append(threading.Thread(target=swaps))
    for t in threads:
        t.start()
    try:
        for i in range(200):
            client.set_policy(threshold=i / 200)
        client.set_policy(threshold=0.25)
        threads[-1].join(30)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    assert client.threshold == 0.25  # the last policy won, whatever swapped meanwhile
    client.close()
    a.close()
    b.close()
