"""ModelStore.install / rollback own the transaction: a failure at any step leaves the serving
model, its slot, the pointer and the rollback target as they were (real packages, real
onnxruntime sessions, real files)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.serving import load_model
from device_agent.store import (
    HealthCheckError,
    ModelStore,
    PackageMismatch,
    PackageSource,
)
from edgecloud.errors import EdgeCloudError, IntegrityError, StoreError
from edgecloud.package import ModelPackage, load_public_key
from edgecloud.runtime.base import Backend
from tests.fixtures.agent_util import Keys, make_package, ort_outputs, val_inputs


class Boom(EdgeCloudError):
    """The failure injected at one step."""


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its sha256: 'stored data intact' means this is unchanged."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


class Serving:
    """What the agent's activate does, reduced to its effect: which backend answers."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.version = ""
        self.loaded: list[Backend] = []

    def load(self, pkg: ModelPackage) -> Backend:
        b = load_model(pkg)
        self.loaded.append(b)
        return b

    def activate(self, slot: str, pkg: ModelPackage, backend: Backend) -> None:
        old, self.backend, self.version = self.backend, backend, pkg.manifest.version
        if old is not None:
            old.close()

    def answer(self) -> np.ndarray:
        assert self.backend is not None
        x = val_inputs(4)
        return np.asarray(self.backend.infer({"input": x})["logits"])

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    keys = Keys(tmp_path)
    store = ModelStore(tmp_path / "store", load_public_key(keys.public))
    serving = Serving()
    archives = {v: make_package(tmp_path, keys, v) for v in ("1.0", "2.0", "3.0")}
    for v in ("1.0", "2.0"):  # 2.0 serves, 1.0 is the rollback target
        src = PackageSource(url=archives[v].as_uri(), key=f"k-{v}", version=v)
        store.install(src, load=serving.load, activate=serving.activate)
    yield store, serving, archives, keys, tmp_path
    serving.close()


def _snapshot(store: ModelStore) -> tuple[Any, dict[str, str]]:
    return store.pointer(), _tree(store.root / "slots")


STEPS = ["download", "verify", "load", "health_check", "activate"]


@pytest.mark.parametrize("failing", STEPS)
def test_a_failure_at_each_step_leaves_the_previous_model_active(setup: Any, failing: str) -> None:
    store, serving, archives, _keys, _tmp = setup
    before_pointer, before_files = _snapshot(store)
    assert before_pointer.version == "2.0"
    assert before_pointer.previous is not None
    answer_before = serving.answer()
    steps: list[str] = []

    def on_step(step: str) -> None:
        steps.append(step)
        if step == failing:
            raise Boom(f"injected at {step}")

    with pytest.raises(Boom):
        store.install(
            PackageSource(url=archives["3.0"].as_uri(), key="k-3.0", version="3.0"),
            load=serving.load,
            activate=serving.activate,
            on_step=on_step,
        )
    assert steps[-1] == failing
    assert _snapshot(store) == (before_pointer, before_files)
    assert serving.version == "2.0"
    np.testing.assert_allclose(serving.answer(), answer_before)
    assert list((store.root / "staging").iterdir()) == []  # nothing half-made is left
    # the rollback target survived: rollback to 1.0 still works
    done = store.rollback("1.0", load=serving.load, activate=serving.activate)
    assert done.package.manifest.version == "1.0"
    assert serving.version == "1.0"


def test_activation_that_fails_puts_the_pointer_back(setup: Any) -> None:
    store, serving, archives, _keys, _tmp = setup
    before_pointer = store.pointer()

    def broken_activate(slot: str, pkg: ModelPackage, backend: Backend) -> None:
        raise Boom("the swap failed")

    with pytest.raises(Boom):
        store.install(
            PackageSource(url=archives["3.0"].as_uri(), key="k-3.0", version="3.0"),
            load=serving.load,
            activate=broken_activate,
        )
    p = store.pointer()
    assert (p.slot, p.version) == (before_pointer.slot, before_pointer.version)
    assert store.verify_slot(p.slot).manifest.version == "2.0"  # the serving slot is whole
    assert serving.version == "2.0"


@pytest.mark.parametrize(
    ("make_bad", "error"),
    [
        (lambda tmp, keys: make_package(tmp, keys, "4.0", tamper=True), IntegrityError),
        (lambda tmp, keys: make_package(tmp, keys, "5.0", bad_warmup=True), HealthCheckError),
        (lambda tmp, keys: make_package(tmp, keys, "6.0"), PackageMismatch),  # job says 9.9
    ],
    ids=["tampered", "bad-warmup", "wrong-version"],
)
def test_real_refusals_leave_everything_as_it_was(
    setup: Any, make_bad: Callable[[Path, Keys], Path], error: type[Exception]
) -> None:
    store, serving, _archives, keys, tmp = setup
    before = _snapshot(store)
    archive = make_bad(tmp, keys)
    want = "9.9" if error is PackageMismatch else None
    with pytest.raises(error):
        store.install(
            PackageSource(url=archive.as_uri(), key=f"bad-{archive.name}", version=want),
            load=serving.load,
            activate=serving.activate,
        )
    assert _snapshot(store) == before
    assert serving.version == "2.0"


def test_rollback_without_a_previous_version_changes_nothing(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    store = ModelStore(tmp_path / "store", load_public_key(keys.public))
    serving = Serving()
    try:
        archive = make_package(tmp_path, keys, "1.0")
        store.install(
            PackageSource(url=archive.as_uri(), key="k"),
            load=serving.load,
            activate=serving.activate,
        )
        before = _snapshot(store)
        with pytest.raises(StoreError, match="no previous version"):
            store.rollback(None, load=serving.load, activate=serving.activate)
        assert _snapshot(store) == before
        np.testing.assert_allclose(serving.answer(), ort_outputs(val_inputs(4)), rtol=1e-4)
    finally:
        serving.close()
