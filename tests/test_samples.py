"""Tests for the sample models and data under samples/.

The committed digits models and their calibration/validation data are fixtures
for converter, router and benchmark tests elsewhere, so these tests pin their
interface (names, shapes, dynamic batch), their accuracies against the recorded
metadata, and the edge/cloud accuracy gap the hybrid router depends on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
META = json.loads((SAMPLES / "data" / "digits_meta.json").read_text())
ROLES = {"edge": [64], "cloud": [1, 8, 8]}
MIN_GAP = 0.03


def _load_script(name: str) -> ModuleType:
    """Import a samples/ script by path (samples/ is not a package)."""
    mod_name = f"_edgecloud_samples_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, SAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses look the module up while executing it
    spec.loader.exec_module(module)
    return module


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _val_accuracy(role: str, models_dir: Path, data_dir: Path) -> float:
    data = np.load(data_dir / f"{role}_val.npz")
    logits = _session(models_dir / f"digits_{role}.onnx").run(["logits"], {"input": data["input"]})[
        0
    ]
    return float(np.mean(logits.argmax(axis=1) == data["labels"]))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("role", sorted(ROLES))
def test_committed_model_interface(role: str) -> None:
    path = SAMPLES / "models" / f"digits_{role}.onnx"
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    props = {p.key: p.value for p in model.metadata_props}
    assert props["task"] == "classification"
    assert props["confidence"] == "logits"
    assert json.loads(props["labels"]) == [str(i) for i in range(10)]
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )

    sess = _session(path)
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert (inp.name, inp.type, inp.shape) == ("input", "tensor(float)", ["batch", *ROLES[role]])
    assert (out.name, out.type, out.shape) == ("logits", "tensor(float)", ["batch", 10])
    for batch in (1, 5):
        x = np.zeros((batch, *ROLES[role]), dtype=np.float32)
        assert sess.run(["logits"], {"input": x})[0].shape == (batch, 10)


def test_cloud_model_keeps_batchnorm_for_converter() -> None:
    ops = [n.op_type for n in onnx.load(SAMPLES / "models" / "digits_cloud.onnx").graph.node]
    assert ops.count("BatchNormalization") == 2
    assert "Softmax" not in ops


def test_committed_files_match_meta_hashes() -> None:
    for rel, digest in META["sha256"].items():
        assert _sha256(SAMPLES / rel) == digest, rel


@pytest.mark.parametrize("split", ["calib", "val"])
def test_edge_and_cloud_data_hold_the_same_samples(split: str) -> None:
    edge = np.load(SAMPLES / "data" / f"edge_{split}.npz")
    cloud = np.load(SAMPLES / "data" / f"cloud_{split}.npz")
    assert sorted(edge.files) == sorted(cloud.files) == ["input", "labels"]
    n = META["split_sizes"][split]
    assert edge["input"].dtype == cloud["input"].dtype == np.float32
    assert edge["labels"].dtype == np.int64
    assert edge["input"].shape == (n, 64)
    assert cloud["input"].shape == (n, 1, 8, 8)
    np.testing.assert_array_equal(edge["input"].reshape(n, 1, 8, 8), cloud["input"])
    np.testing.assert_array_equal(edge["labels"], cloud["labels"])
    assert edge["input"].min() >= 0.0
    assert edge["input"].max() <= 1.0
    assert set(np.unique(edge["labels"]).tolist()) == set(range(10))


def test_committed_accuracies_match_meta_and_cloud_beats_edge() -> None:
    acc = {role: _val_accuracy(role, SAMPLES / "models", SAMPLES / "data") for role in ROLES}
    for role in ROLES:
        assert acc[role] == pytest.approx(META[role]["val_accuracy"], abs=1e-9)
    assert acc["cloud"] >= 0.98
    assert acc["cloud"] - acc["edge"] >= MIN_GAP


@pytest.mark.slow
def test_retraining_reproduces_committed_results(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    train_digits = _load_script("train_digits")
    result = train_digits.train_and_export(tmp_path)

    # The splits are pure numpy/scikit-learn, so the arrays must be identical (compared as
    # arrays: the .npz container's bytes are the writer's business, not the data's).
    for rel in META["sha256"]:
        if rel.startswith("data/"):
            fresh, committed = np.load(tmp_path / rel), np.load(SAMPLES / rel)
            assert sorted(fresh.files) == sorted(committed.files), rel
            for key in committed.files:
                np.testing.assert_array_equal(fresh[key], committed[key], err_msg=f"{rel}:{key}")
    # Training is deterministic (same bytes on the machine that produced the commit),
    # but float kernels may round differently on another CPU/torch build, so allow
    # accuracy to move by at most one validation sample there.
    one_sample = 1.0 / META["split_sizes"]["val"]
    for role in ROLES:
        assert result[f"{role}_accuracy"] == pytest.approx(
            META[role]["val_accuracy"], abs=one_sample + 1e-9
        )
        assert result[f"{role}_max_abs_diff"] < 1e-4
        assert _val_accuracy(role, tmp_path / "models", tmp_path / "data") == pytest.approx(
            result[f"{role}_accuracy"], abs=1e-9
        )
    assert result["cloud_accuracy"] - result["edge_accuracy"] >= MIN_GAP


def test_make_inputs_is_seeded() -> None:
    build = _load_script("build_resnet18")
    a = build.make_inputs(2, seed=3)
    assert a.shape == (2, 3, 224, 224)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, build.make_inputs(2, seed=3))
    assert not np.array_equal(a, build.make_inputs(2, seed=4))


def test_build_resnet18_runs_in_onnxruntime(tmp_path: Path) -> None:
    build = _load_script("build_resnet18")
    path = build.build_resnet18(tmp_path / "r18.onnx", seed=0)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 20  # 1 stem + 16 in blocks + 3 downsample
    assert ops.count("BatchNormalization") == 20
    assert ops.count("Add") == 8
    n_params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    # torchvision resnet18 has 11,689,512 parameters; the BN running stats add 2 x 4,800.
    assert n_params == 11_689_512 + 9_600

    sess = _session(path)
    assert sess.get_inputs()[0].shape == ["batch", 3, 224, 224]
    logits = sess.run(["logits"], {"input": build.make_inputs(2, seed=1)})[0]
    assert logits.shape == (2, 1000)
    assert np.isfinite(logits).all()
    assert np.ptp(logits) > 0.0
    assert not np.allclose(logits[0], logits[1])
