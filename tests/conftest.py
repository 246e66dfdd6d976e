"""Shared fixtures. Real services only: brokers and servers are child processes on loopback."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.broker import MosquittoBroker, mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests cleanly where TensorRT or an NVIDIA GPU is missing."""
    from edgecloud.deps import available

    has_gpu = available("tensorrt") and Path("/dev/nvidia0").exists()
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU (not present here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_per_module() -> Iterator[None]:
    """Run the collector when a module ends, so a leaked socket or file warns in its own module.

    Left to chance, the collector runs whenever allocations happen to trigger it, and a socket a
    module forgot to close fails (``filterwarnings = error``) some unrelated test later on.
    """
    yield
    gc.collect()


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """A fresh plain (anonymous) Mosquitto broker on a free loopback port."""
    if mosquitto_binary() is None:
        pytest.fail(
            "mosquitto is not installed; ./dev.sh test installs it (apt-get install mosquitto)"
        )
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def mosquitto_session() -> Iterator[MosquittoBroker]:
    """One broker shared by a whole session, for tests that only need a broker to exist."""
    if mosquitto_binary() is None:
        pytest.fail(
            "mosquitto is not installed; ./dev.sh test installs it (apt-get install mosquitto)"
        )
    with MosquittoBroker() as broker:
        yield broker
