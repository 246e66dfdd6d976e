"""End to end: HybridClient on the edge MLP package, real V2 region servers on loopback serving the
cloud CNN, HttpTransport between them. Nothing faked: real sockets, real onnxruntime on both sides.

Regions: ``near`` (a child process, so a test can kill it like a crashed VM and restart it on the
same port) and ``far`` (in-process, 40 ms of added latency, health included, so probes measure it
as farther). ``locked`` wants a bearer token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.client import HybridClient
from edgecloud.errors import AuthError, ConnectionFailed, NoRouteError, RemoteError, ShapeError
from tests.fixtures.packages import CLOUD_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package
from tests.fixtures.servers import make_repository, running_cloud_server

FAR_MS = 40.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), {"digits_cloud": CLOUD_ONNX})


@pytest.fixture(scope="module")
def near(repo: Path) -> Iterator[Any]:
    with running_cloud_server(repo, region="near", subprocess=True, threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def far(repo: Path) -> Iterator[Any]:
    with running_cloud_server(
        repo, region="far", subprocess=False, latency_ms=FAR_MS, threads=1
    ) as s:
        yield s


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_package(tmp_path_factory.mktemp("e2e") / "edge")


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    d = np.load(SAMPLES / "data" / "edge_val.npz")
    return {"input": d["input"], "labels": d["labels"]}


@pytest.fixture(scope="module")
def conf(pkg: tuple[Path, Path], data: dict[str, np.ndarray]) -> np.ndarray:
    with HybridClient(pkg[0], public_key=pkg[1], threshold=0.0) as c:
        return np.array([r.confidence for r in c.infer_batch({"input": data["input"]})])


def row(data: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {"input": data["input"][i : i + 1]}


def region(name: str, url: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "endpoint": url,
        "model": "digits_cloud",
        "cloud_input_shape": [1, 8, 8],
        **kw,
    }


def client_for(pkg: tuple[Path, Path], regions: list[dict[str, Any]], **kw: Any) -> HybridClient:
    kw.setdefault("threshold", 0.9)
    kw.setdefault("probe_interval", 0.05)
    kw.setdefault("deadline", 5.0)
    return HybridClient(pkg[0], public_key=pkg[1], regions=regions, **kw)


def wait_measured(client: HybridClient, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(r.rtt is not None for r in client.selector.regions):
            return
        time.sleep(0.02)
    raise AssertionError(f"regions not probed in {timeout} s: {client.regions_status()}")


def test_confident_edge_unsure_nearest_region(
    pkg: tuple[Path, Path], near: Any, far: Any, data: dict[str, np.ndarray], conf: np.ndarray
) -> None:
    # far listed first: the order must come from measured RTT, not from the config
    with client_for(pkg, [region("far", far.url), region("near", near.url)]) as client:
        wait_measured(client)
        assert [r.name for r in client.selector.ordered()] == ["near", "far"]
        sure, unsure = int(np.argmax(conf)), int(np.argmin(conf))
        r = client.infer(row(data, sure))
        assert (r.source, r.reason) == ("edge", "confident")
        r = client.infer(row(data, unsure))
        assert (r.source, r.reason, r.degraded) == ("cloud:near", "low_confidence", False)
        assert r.errors == {}
        assert r.label == str(int(data["labels"][unsure]))  # the CNN gets this one right
        assert r.cloud_time > 0


def test_hybrid_accuracy_through_real_server(
    pkg: tuple[Path, Path], near: Any, data: dict[str, np.ndarray], conf: np.ndarray
) -> None:
    with client_for(pkg, [region("near", near.url)], threshold=0.7) as client:
        results = client.infer_batch({"input": data["input"]})
    preds = np.array([int(r.label or -1) for r in results])
    hybrid = float(np.mean(preds == data["labels"]))
    offload = float(np.mean([r.source == "cloud:near" for r in results]))
    assert offload == pytest.approx(float(np.mean(conf < 0.7)))
    assert 0 < offload < 0.2
    assert hybrid >= 0.965  # edge alone is 0.931, cloud alone 0.983


def test_nearest_down_next_region_then_all_down_degraded(
    pkg: tuple[Path, Path],
    repo: Path,
    near: Any,
    data: dict[str, np.ndarray],
    conf: np.ndarray,
) -> None:
    unsure = int(np.argmin(conf))
    with running_cloud_server(
        repo, region="far2", subprocess=False, latency_ms=FAR_MS, threads=1
    ) as far2:
        client = client_for(
            pkg, [region("near", near.url), region("far2", far2.url)], failure_threshold=2
        )
        try:
            wait_measured(client)
            near.kill()
            r = client.infer(row(data, unsure))
            assert r.source == "cloud:far2"
            # Either the request found near down itself, or a probe (every 50 ms) found it first
            # and near, no longer ready, was tried after far2, which answered.
            near_error = r.errors.get("near")
            if near_error is None:
                assert client.region_health()[0].ready is False
            else:
                assert isinstance(near_error, ConnectionFailed)
            far2.stop()
            # all regions down: local answers, degraded, never an exception
            for _ in range(3):
                r = client.infer(row(data, unsure))
                assert (r.source, r.degraded, r.reason) == ("edge", True, "cloud_failed")
                assert set(r.errors) == {"near", "far2"}
                assert r.outputs["logits"].shape == (1, 10)
            assert {x["state"] for x in client.regions_status()} == {"open"}
        finally:
            client.close()
            near.restart()
    # the restarted region is found again by a fresh client's probes
    with client_for(pkg, [region("near", near.url)]) as client:
        wait_measured(client)
        assert client.infer(row(data, unsure)).source == "cloud:near"


def test_breaker_recovers_after_restart(
    pkg: tuple[Path, Path], near: Any, data: dict[str, np.ndarray], conf: np.ndarray
) -> None:
    unsure = int(np.argmin(conf))
    with client_for(
        pkg, [region("near", near.url)], failure_threshold=1, cooldown=0.2, probe_interval=0.05
    ) as client:
        wait_measured(client)
        near.kill()
        try:
            r = client.infer(row(data, unsure))
            assert r.degraded
            assert client.selector.regions[0].breaker.state.value != "closed"
        finally:
            near.restart()
        end = time.monotonic() + 10
        while client.selector.regions[0].breaker.state.value != "closed":
            assert time.monotonic() < end, client.regions_status()
            time.sleep(0.05)
        assert client.infer(row(data, unsure)).source == "cloud:near"


def test_saturated_device_sends_to_cloud(
    pkg: tuple[Path, Path], near: Any, data: dict[str, np.ndarray], conf: np.ndarray
) -> None:
    with client_for(pkg, [region("near", near.url)], max_concurrency=1, max_queue=0) as client:
        assert client.capacity.try_acquire()  # a long request holds the only slot
        try:
            r = client.infer(row(data, int(np.argmax(conf))))
        finally:
            client.capacity.release()
        assert (r.source, r.reason) == ("cloud:near", "no_capacity")
        assert r.local_time == 0


def test_deadline_is_honoured(
    pkg: tuple[Path, Path], repo: Path, data: dict[str, np.ndarray], conf: np.ndarray
) -> None:
    with running_cloud_server(repo, region="slow", subprocess=False, latency_ms=600) as slow:
        with client_for(pkg, [region("slow", slow.url)], probe_interval=None) as client:
            unsure = int(np.argmin(conf))
            t0 = time.monotonic()
            r = client.infer(row(data, unsure), deadline=0.15)
            took = time.monotonic() - t0
            assert (r.source, r.reason, r.degraded) == ("edge", "deadline", True)
            assert took < 0.15 + 0.2
            r = client.infer(row(data, unsure), deadline=3.0)
            assert r.source == "cloud:slow"


def test_bad_inputs_clear_errors(
    pkg: tuple[Path, Path], near: Any, data: dict[str, np.ndarray], conf: np.ndarray
) -> None:
    with client_for(pkg, [region("near", near.url)]) as client:
        with pytest.raises(ShapeError, match=r"input 'input': expected shape \[batch, 64\]"):
            client.infer({"input": np.zeros((1, 65), np.float32)})
    # a region configured without the reshape: the server's 400 is reported, the answer degraded
    bad = {"name": "near", "endpoint": near.url, "model": "digits_cloud"}
    with client_for(pkg, [bad]) as client:
        r = client.infer(row(data, int(np.argmin(conf))))
        assert r.degraded
        err = r.errors["near"]
        assert isinstance(err, RemoteError)
        assert err.status == 400
        assert "input" in str(err)
        with pytest.raises(NoRouteError, match="near"):
            client.infer(row(data, 0), mode="cloud_only")


def test_missing_token_is_auth_error(
    pkg: tuple[Path, Path], repo: Path, data: dict[str, np.ndarray], conf: np.ndarray
) -> None:
    with running_cloud_server(repo, region="locked", subprocess=False, token="s3cret") as locked:
        with client_for(pkg, [region("locked", locked.url)], probe_interval=None) as client:
            r = client.infer(row(data, int(np.argmin(conf))))
            assert r.degraded
            err = r.errors["locked"]
            assert isinstance(err, AuthError)
            assert err.status == 401
        opts = {"options": {"token": "s3cret"}}
        with client_for(pkg, [region("locked", locked.url, **opts)]) as client:
            r = client.infer(row(data, int(np.argmin(conf))))
            assert r.source == "cloud:locked"


def test_from_toml_config_end_to_end(
    tmp_path: Path, pkg: tuple[Path, Path], near: Any, data: dict[str, np.ndarray]
) -> None:
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        f"""
[model]
package = "{pkg[0]}"
public_key = "{pkg[1]}"

[routing]
threshold = 0.9
deadline = 2.0
probe_interval = 1.0

[[regions]]
name = "near"
endpoint = "{near.url}"
model = "digits_cloud"
cloud_input_shape = [1, 8, 8]
"""
    )
    with HybridClient.from_config(cfg) as client:
        results = client.infer_batch({"input": data["input"][:60]})
        sources = {r.source for r in results}
        assert sources == {"edge", "cloud:near"}


@pytest.mark.mqtt
def test_mqtt_region_and_failover_from_http(
    pkg: tuple[Path, Path],
    repo: Path,
    mosquitto: Any,
    data: dict[str, np.ndarray],
    conf: np.ndarray,
) -> None:
    from edgecloud.cloud.core import ServingCore
    from edgecloud.cloud.mqtt_worker import start_mqtt_workers

    core = ServingCore(repo, intra_op_threads=1)
    try:
        with start_mqtt_workers(core, broker=mosquitto.url, region="mq"):
            dead = region("dead-http", "http://127.0.0.1:9", priority=-1)  # tried first, refused
            mq = region("mq", mosquitto.url, options={"device_id": "cam-1"})
            with client_for(pkg, [dead, mq], probe_interval=None) as client:
                r = client.infer(row(data, int(np.argmin(conf))))
                assert (r.source, r.reason) == ("cloud:mq", "low_confidence")
                assert isinstance(r.errors["dead-http"], ConnectionFailed)
                assert r.label == str(int(data["labels"][int(np.argmin(conf))]))
    finally:
        core.close()
