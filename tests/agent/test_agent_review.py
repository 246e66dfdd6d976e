"""Review follow-ups of the device agent (issue 5): rollback target kept after a refused or failed
deployment, health check of non-classifiers, desired-state retries with backoff.

Real parts throughout: signed packages of the digits MLP (or a small regression ONNX), real
onnxruntime sessions, a real Mosquitto for the agent tests.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.serving import load_model
from device_agent.store import HealthCheckError, ModelStore, health_check
from edgecloud.errors import IntegrityError, StoreError
from edgecloud.package import (
    Manifest,
    TensorSpec,
    Variant,
    load_private_key,
    load_public_key,
    verify_package,
    write_package,
)
from tests.fixtures.agent_util import (
    Keys,
    Observer,
    make_package,
    send_job,
    val_inputs,
    write_config,
)
from tests.fixtures.broker import MosquittoBroker

DEV = "dev-r"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def observer(mosquitto: MosquittoBroker) -> Iterator[Observer]:
    obs = Observer(mosquitto.host, mosquitto.port)
    yield obs
    obs.close()


@pytest.fixture
def agent_factory(tmp_path: Path, mosquitto: MosquittoBroker, keys: Keys) -> Iterator[Any]:
    agents: list[Agent] = []

    def make(extra: str = "") -> Agent:
        cfg = write_config(
            tmp_path / "agent.toml",
            device=DEV,
            broker_url=mosquitto.url,
            store=tmp_path / "store",
            public_key=keys.public,
            extra=extra,
        )
        a = Agent(load_config(cfg)).start()
        agents.append(a)
        deadline = time.monotonic() + 10
        while not a.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.connected
        return a

    yield make
    for a in agents:
        a.stop()


def _deploy(obs: Observer, job_id: str, archive: Path, **doc: Any) -> dict[str, Any]:
    send_job(obs, DEV, job_id, "deploy", package_url=archive.as_uri(), **doc)
    return obs.wait_job(job_id)


# -- 1. a refused or failed package leaves the rollback target ----------------------------------
@pytest.mark.mqtt
def test_refused_and_failed_deploys_keep_the_previous_version_for_rollback(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    agent = agent_factory()
    assert _deploy(observer, "v1", make_package(tmp_path, keys, "1.0.0"))["status"] == "SUCCEEDED"
    assert _deploy(observer, "v2", make_package(tmp_path, keys, "2.0.0"))["status"] == "SUCCEEDED"
    before = agent.store.pointer()
    assert before is not None
    assert before.previous is not None
    prev_manifest = (agent.store.slot_path(before.previous) / "manifest.json").read_bytes()

    tampered = _deploy(observer, "bad-hash", make_package(tmp_path, keys, "3.0.0", tamper=True))
    assert tampered["status"] == "REJECTED"
    unhealthy = _deploy(
        observer, "bad-health", make_package(tmp_path, keys, "4.0.0", bad_warmup=True)
    )
    assert unhealthy["status"] == "FAILED"
    assert "warm-up" in unhealthy["reason"]
    wrong = _deploy(
        observer, "wrong-version", make_package(tmp_path, keys, "5.0.0"), version="5.0.1"
    )
    assert wrong["status"] == "REJECTED"
    assert agent.store.pointer() == before  # pointer, previous included, untouched
    assert (agent.store.slot_path(before.previous) / "manifest.json").read_bytes() == (
        prev_manifest
    )
    assert list((tmp_path / "store" / "staging").iterdir()) == []
    assert agent.active_version == "2.0.0"

    send_job(observer, DEV, "rb", "rollback", version="1.0.0")
    rb = observer.wait_job("rb")
    assert rb["status"] == "SUCCEEDED", rb
    assert agent.active_version == "1.0.0"
    assert agent.infer({"input": val_inputs(2)}).version == "1.0.0"


def test_store_unpack_touches_no_slot_until_promoted(tmp_path: Path, keys: Keys) -> None:
    store = ModelStore(tmp_path / "store", load_public_key(keys.public))
    good = store.stage(make_package(tmp_path, keys, "1.0.0"), "A")
    store.set_active("A", good)
    slots = tmp_path / "store" / "slots"
    with pytest.raises(IntegrityError, match=r"model\.onnx"):
        store.unpack(make_package(tmp_path, keys, "2.0.0", tamper=True), "job-x")
    assert sorted(p.name for p in slots.iterdir()) == ["A"]
    assert list((tmp_path / "store" / "staging").iterdir()) == []
    staged = store.unpack(make_package(tmp_path, keys, "3.0.0"), "job-y")
    assert staged.root.parent == tmp_path / "store" / "staging"
    assert staged.manifest.version == "3.0.0"
    assert sorted(p.name for p in slots.iterdir()) == ["A"]
    pkg = store.promote(staged, "B")
    assert pkg.root == slots / "B"
    assert not staged.root.exists()
    assert verify_package(pkg.root, load_public_key(keys.public)).manifest.version == "3.0.0"
    with pytest.raises(StoreError, match="slot A is active"):
        store.promote(store.unpack(make_package(tmp_path, keys, "4.0.0"), "job-z"), "A")


# -- 3. health check of a non-classifier --------------------------------------------------------
def _regression_package(
    tmp: Path, keys: Keys, task: str, warmup_extra: dict[str, Any] | None = None
) -> Any:
    """MatMul 4 -> 3 whose columns are nearly equal; warm-up outputs recorded with 1e-3 noise.

    The recorded outputs are within any sensible relative L2 tolerance, but the argmax of
    nearly equal columns flips on noise: exactly the case top-1 agreement must not judge.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (np.ones((4, 3)) + 1e-4 * rng.standard_normal((4, 3))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "regression",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    work = tmp / f"reg-{task}"
    work.mkdir(parents=True)
    onnx.save(model, work / "model.onnx")
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = x @ w
    y_rec = (y * (1 + 1e-3 * rng.standard_normal(y.shape))).astype(np.float32)
    np.savez(work / "warmup.npz", **{"input.x": x, "output.y": y_rec})
    manifest = Manifest(
        name="reg",
        version="1",
        task=task,
        confidence="none",
        inputs=(TensorSpec("x", "float32", ("batch", 4)),),
        outputs=(TensorSpec("y", "float32", ("batch", 3)),),
        variants=(Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),),
        warmup={"file": "warmup.npz", "max_rel_l2": 0.01, **(warmup_extra or {})},
    )
    write_package(
        work / "pkg",
        manifest,
        {"model.onnx": work / "model.onnx", "warmup.npz": work / "warmup.npz"},
        signing_key=load_private_key(keys.private),
    )
    return verify_package(work / "pkg", load_public_key(keys.public))


def test_health_check_of_a_regression_model_relies_on_relative_l2(
    tmp_path: Path, keys: Keys
) -> None:
    pkg = _regression_package(tmp_path, keys, "regression")
    backend = load_model(pkg)
    try:
        figures = health_check(backend, pkg)
    finally:
        backend.close()
    assert figures["checked"] is True
    assert 0 < figures["y.rel_l2"] < 0.01
    assert "y.top1_agreement" not in figures
    # the same outputs declared a classifier: agreement is checked by default and fails
    cls = _regression_package(tmp_path, keys, "classification")
    backend = load_model(cls)
    try:
        with pytest.raises(HealthCheckError, match="top-1 agreement"):
            health_check(backend, cls)
    finally:
        backend.close()
    # an explicit threshold is honoured for any task
    strict = _regression_package(tmp_path / "s", keys, "regression", {"min_top1_agreement": 0.99})
    backend = load_model(strict)
    try:
        with pytest.raises(HealthCheckError, match="top-1 agreement"):
            health_check(backend, strict)
    finally:
        backend.close()


# -- 4. a failed desired version is retried with backoff, boundedly ----------------------------
def _reported(obs: Observer, version: int) -> list[dict[str, Any]]:
    return [r for r in obs.json_on("/shadow/reported") if r.get("desired_version") == version]


@pytest.mark.mqtt
def test_failed_desired_version_is_retried_with_backoff_and_bounded(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    extra = "desired_retries = 2\ndesired_retry_delay_s = 0.5\ndesired_retry_backoff = 2.0\n"
    agent = agent_factory(extra)
    desired = f"edgecloud/devices/{DEV}/shadow/desired"
    late = tmp_path / "late.tar.gz"  # published before the file exists (a CDN not yet synced)
    observer.publish(
        desired,
        {
            "version": 5,
            "state": {
                "model": {"name": "digits", "version": "2.0.0", "package_url": late.as_uri()}
            },
        },
        retain=True,
    )
    first = observer.wait(lambda: next(iter(_reported(observer, 5)), None), 30, "reported 5")
    assert "does not exist" in first["state"]["error"]
    assert first["state"]["retry"] == {"attempts": 1, "max_attempts": 3, "next_in_s": 0.5}
    assert first["state"]["model"] is None
    shutil.copyfile(make_package(tmp_path, keys, "2.0.0"), late)
    ok = observer.wait(
        lambda: next((r for r in _reported(observer, 5) if "error" not in r["state"]), None),
        30,
        "reported 5 without error",
    )
    assert ok["state"]["model"] == {"name": "digits", "version": "2.0.0"}
    assert "retry" not in ok["state"]
    assert agent.active_version == "2.0.0"

    # never available: 3 attempts (0.5 s, then 1 s apart), then the device gives up
    never = tmp_path / "never.tar.gz"
    observer.publish(
        desired,
        {
            "version": 6,
            "state": {
                "model": {"name": "digits", "version": "3.0.0", "package_url": never.as_uri()}
            },
        },
        retain=True,
    )
    t0 = time.monotonic()
    gave_up = observer.wait(
        lambda: next(
            (r for r in _reported(observer, 6) if r["state"]["retry"].get("gave_up")), None
        ),
        30,
        "gave up on 6",
    )
    assert time.monotonic() - t0 >= 1.4
    assert gave_up["state"]["retry"] == {"attempts": 3, "max_attempts": 3, "gave_up": True}
    assert [r["state"]["retry"]["attempts"] for r in _reported(observer, 6)] == [1, 2, 3]
    assert all("does not exist" in r["state"]["error"] for r in _reported(observer, 6))
    shutil.copyfile(make_package(tmp_path, keys, "3.0.0"), never)
    time.sleep(1.5)
    assert len(_reported(observer, 6)) == 3  # no fourth attempt
    assert agent.active_version == "2.0.0"
    # the retained state comes again after a restart: still given up, reported again
    agent.stop()
    again = agent_factory(extra)
    observer.wait(lambda: len(_reported(observer, 6)) >= 4, 30, "reported 6 after restart")
    assert _reported(observer, 6)[-1]["state"]["retry"]["gave_up"] is True
    assert again.active_version == "2.0.0"


@pytest.mark.mqtt
def test_failed_desired_version_is_retried_when_it_comes_again_after_a_restart(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    extra = "desired_retries = 3\ndesired_retry_delay_s = 0.3\n"
    agent = agent_factory(extra)
    late = tmp_path / "late.tar.gz"
    observer.publish(
        f"edgecloud/devices/{DEV}/shadow/desired",
        {
            "version": 9,
            "state": {
                "model": {"name": "digits", "version": "1.0.0", "package_url": late.as_uri()}
            },
        },
        retain=True,
    )
    observer.wait(lambda: _reported(observer, 9), 30, "reported 9")
    agent.stop()  # offline before the retry is due
    shutil.copyfile(make_package(tmp_path, keys, "1.0.0"), late)
    time.sleep(0.4)
    again = agent_factory(extra)
    observer.wait(lambda: again.active_version == "1.0.0", 30, "deployed after restart")
    ok = observer.wait(
        lambda: next((r for r in _reported(observer, 9) if "error" not in r["state"]), None),
        30,
        "reported 9 without error",
    )
    assert ok["state"]["model"]["version"] == "1.0.0"
