"""End to end over MQTT: HybridClient on the edge MLP package, the cloud CNN served by
``edgecloud cloud serve --mqtt`` (a real child process, its MQTT workers in a share group) through a
real Mosquitto, and failover between that MQTT region and an HTTP region. Nothing faked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.client import HybridClient
from edgecloud.errors import ConnectionFailed
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.packages import CLOUD_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package
from tests.fixtures.servers import make_repository, running_cloud_server

pytestmark = pytest.mark.mqtt


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"), {"digits_cloud": CLOUD_ONNX})


@pytest.fixture(scope="module")
def mq_region(repo: Path, broker: MosquittoBroker) -> Iterator[Any]:
    """Region 'mq': `edgecloud cloud serve --mqtt URL --mqtt-workers 2` in a child process."""
    with running_cloud_server(
        repo,
        region="mq",
        subprocess=True,
        threads=1,
        extra_args=["--mqtt", broker.url, "--mqtt-workers", "2"],
    ) as s:
        yield s


@pytest.fixture
def http_region(repo: Path) -> Iterator[Any]:
    with running_cloud_server(repo, region="web", subprocess=False, threads=1) as s:
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


def mqtt_region(url: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": "mq",
        "endpoint": url,
        "model": "digits_cloud",
        "cloud_input_shape": [1, 8, 8],
        "options": {"device_id": "dev-e2e"},
        **kw,
    }


def http_region_spec(url: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": "web",
        "endpoint": url,
        "model": "digits_cloud",
        "cloud_input_shape": [1, 8, 8],
        **kw,
    }


def row(data: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {"input": data["input"][i : i + 1]}


def _wait(cond: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def test_low_confidence_answered_by_cloud_over_mqtt(
    pkg: tuple[Path, Path],
    broker: MosquittoBroker,
    mq_region: Any,
    data: dict[str, np.ndarray],
    conf: np.ndarray,
) -> None:
    with HybridClient(
        pkg[0], public_key=pkg[1], regions=[mqtt_region(broker.url)], threshold=0.7, deadline=5.0
    ) as client:
        sure, unsure = int(np.argmax(conf)), int(np.argmin(conf))
        r = client.infer(row(data, sure))
        assert (r.source, r.reason) == ("edge", "confident")
        r = client.infer(row(data, unsure))
        assert (r.source, r.reason, r.degraded) == ("cloud:mq", "low_confidence", False)
        assert r.label == str(int(data["labels"][unsure]))
        results = client.infer_batch({"input": data["input"]})
    preds = np.array([int(r.label or -1) for r in results])
    offload = float(np.mean([r.source == "cloud:mq" for r in results]))
    assert offload == pytest.approx(float(np.mean(conf < 0.7)))
    assert 0 < offload < 0.2
    assert float(np.mean(preds == data["labels"])) >= 0.965  # edge alone 0.931


def test_failover_mqtt_region_down_then_back(
    pkg: tuple[Path, Path],
    broker: MosquittoBroker,
    mq_region: Any,
    http_region: Any,
    data: dict[str, np.ndarray],
    conf: np.ndarray,
) -> None:
    unsure = row(data, int(np.argmin(conf)))
    with HybridClient(
        pkg[0],
        public_key=pkg[1],
        regions=[
            mqtt_region(broker.url, priority=0),
            http_region_spec(http_region.url, priority=1),
        ],
        threshold=0.9,
        deadline=5.0,
        probe_interval=0.1,
        failure_threshold=1,
        cooldown=0.5,
    ) as client:
        assert client.infer(unsure).source == "cloud:mq"
        broker.stop()
        try:
            start = time.monotonic()
            r = client.infer(unsure)
            took = time.monotonic() - start
            assert (r.source, r.degraded) == ("cloud:web", False)
            assert took < 1.0  # the MQTT region failed fast, it did not eat the 5 s deadline
            if "mq" in r.errors:
                assert isinstance(r.errors["mq"], ConnectionFailed)
        finally:
            broker.start()
        # the transport and the region's workers reconnect; the MQTT region answers again
        assert _wait(lambda: client.infer(unsure).source == "cloud:mq", 20)


def test_failover_http_region_down_mqtt_answers(
    pkg: tuple[Path, Path],
    broker: MosquittoBroker,
    mq_region: Any,
    http_region: Any,
    data: dict[str, np.ndarray],
    conf: np.ndarray,
) -> None:
    unsure = row(data, int(np.argmin(conf)))
    with HybridClient(
        pkg[0],
        public_key=pkg[1],
        regions=[
            http_region_spec(http_region.url, priority=0),
            mqtt_region(broker.url, priority=1),
        ],
        threshold=0.9,
        deadline=5.0,
        probe_interval=None,
    ) as client:
        assert client.infer(unsure).source == "cloud:web"
        http_region.stop()
        r = client.infer(unsure)
        assert (r.source, r.degraded) == ("cloud:mq", False)
        assert "web" in r.errors
