"""Per-class vector scaling (edgecloud.calibration.fit_vector) in ``tune`` and at run time.

Seeded synthetic logits whose miscalibration differs per class (the case vector scaling is for),
so the truth is known; the runtime side reads a real manifest written by ``write_package``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecloud import calibration as cal
from edgecloud.errors import ConfigError
from edgecloud.package import Manifest, TensorSpec, Variant, read_manifest, write_package
from edgecloud.routing.calibrated import (
    TemperedConfidence,
    VectorScaledConfidence,
    confidence_from_manifest,
)
from edgecloud.tuning import tune


def _per_class(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits * w + b) with w, b far from one shared temperature."""
    rng = np.random.default_rng(seed)
    k = 4
    logits = rng.normal(0, 2.5, (n, k))
    w, b = np.array([0.3, 0.6, 1.2, 2.0]), np.array([0.8, 0.0, -0.4, 0.2])
    p = cal.softmax(logits * w + b)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return logits, labels


def test_vector_wins_where_classes_are_miscalibrated_differently() -> None:
    x, y = _per_class(4000, 1)
    res = tune(x, y, y, targets=[cal.parse_target("offload=0.2")], vector=True, seed=0)
    c = res.candidates
    assert res.method == "vector"
    assert c["vector"]["nll"] < c["temperature"]["nll"]
    assert c["vector"]["ece"] < c["temperature"]["ece"]
    assert res.ece_after == pytest.approx(c["vector"]["ece"], abs=1e-6)
    r = res.routing()
    assert r["method"] == "vector"
    assert len(r["vector"]["scale"]) == len(r["vector"]["bias"]) == 4
    # the offload target is picked on the vector-scaled confidence of every row
    every = cal.vector_confidence(x, np.array(r["vector"]["scale"]), np.array(r["vector"]["bias"]))
    assert res.chosen.threshold == pytest.approx(cal.pick_offload(every, 0.2), abs=1e-5)


def test_vector_is_chosen_only_when_it_beats_the_temperature_on_both() -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        x = rng.normal(0, 3, (300, 5))
        y = np.array([rng.choice(5, p=row) for row in cal.softmax(x, 1.7)])  # one scalar T
        res = tune(x, y, y, targets=[cal.parse_target("offload=0.1")], vector=True, seed=seed)
        c = res.candidates
        wins = c["vector"]["ece"] < c["temperature"]["ece"] and (
            c["vector"]["nll"] < c["temperature"]["nll"]
        )
        assert (res.method == "vector") == wins
        assert ("vector" in res.routing()) == wins
    plain = tune(x, y, y, targets=[cal.parse_target("offload=0.1")])
    assert plain.method == "temperature"
    assert "method" not in plain.routing()
    with pytest.raises(ConfigError, match="max_probability"):
        tune(x, y, y, targets=[cal.parse_target("offload=0.1")], vector=True, measure="margin")


def test_runtime_reads_the_vector_of_the_returned_label(tmp_path: Path) -> None:
    x, y = _per_class(4000, 1)
    res = tune(x, y, y, targets=[cal.parse_target("offload=0.2")], vector=True)
    assert res.method == "vector", res.candidates
    (tmp_path / "m.onnx").write_bytes(b"x")
    m = Manifest(
        name="m",
        version="1",
        inputs=(TensorSpec("input", "float32", ("batch", 4)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 4)),),
        variants=(Variant("fp32", "m.onnx", "onnx", "fp32", "cpu", 0, ""),),
        task="classification",
        confidence="logits",
        routing=res.routing(),
    )
    written = write_package(tmp_path / "pkg", m, {"m.onnx": tmp_path / "m.onnx"})
    policy = confidence_from_manifest(read_manifest(tmp_path / "pkg"))
    assert isinstance(policy, VectorScaledConfidence)
    v = written.routing["vector"]
    got = policy({"logits": x[:50].astype(np.float32)})
    want = cal.vector_confidence(
        x[:50].astype(np.float32), np.array(v["scale"]), np.array(v["bias"])
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the label it describes is the model's own arg-max, even where scaling would move it
    p = cal.vector_probs(x[:50], np.array(v["scale"]), np.array(v["bias"]))
    moved = p.argmax(1) != x[:50].argmax(1)
    if moved.any():
        assert (got[moved] < p.max(1)[moved]).all()
    # a margin policy keeps the scalar temperature
    margin = confidence_from_manifest(read_manifest(tmp_path / "pkg"), "margin")
    assert isinstance(margin, TemperedConfidence)
