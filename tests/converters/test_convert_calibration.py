"""Calibration at convert time (converters/calibrate.py) on the real digits samples.

Real parts: ``convert`` on samples/models/digits_edge.onnx with the labelled sample data, the
signed package it writes, onnxruntime sessions, ``HybridClient`` reading the temperature back
and the real CLI. The regression check runs on a real, degraded ONNX variant (the digits MLP
with seeded noise in its weights), not on made-up scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converters import ConversionReport, ConvertOptions, VariantReport, convert
from converters.calibrate import calibrate_variants, offload_for_accuracy, summary_lines
from converters.data import load_dataset
from converters.model import inspect_model
from edgecloud import calibration as cal
from edgecloud.client import HybridClient
from edgecloud.package import read_manifest, verify_package
from edgecloud.routing.calibrated import (
    TemperedConfidence,
    VectorScaledConfidence,
    confidence_from_manifest,
)
from edgecloud.runtime.loader import load_backend

ROOT = Path(__file__).resolve().parents[2]
S = ROOT / "samples"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ConversionReport:
    return convert(
        S / "models/digits_edge.onnx",
        tmp_path_factory.mktemp("cal") / "pkg",
        ConvertOptions(
            int8=("static",),
            calib=S / "data/edge_calib.npz",
            val=S / "data/edge_val.npz",
            latency_runs=3,
        ),
    )


def test_convert_fits_a_temperature_that_calibrates_unseen_rows(report: ConversionReport) -> None:
    pkg = verify_package(Path(report.package or ""), None, require_signature=False)
    r = pkg.manifest.routing
    assert report.manifest is not None
    assert r == report.manifest.routing
    t = r["temperature"]
    assert 0.3 < t < 1.5, t
    assert abs(t - 1.0) > 0.05, t  # the digits MLP is under-confident: T < 1 sharpens it
    c = r["calibration"]
    assert c["fit_rows"] + c["eval_rows"] == 360
    assert c["fit_rows"] == 180
    assert r["ece_after"] < r["ece_before"]
    assert c["nll_after"] < c["nll_before"]
    # rows neither the fit nor the evaluation saw (the calibration split): ECE drops there too
    z = np.load(S / "data/edge_calib.npz")
    be = load_backend(pkg, public_key=None, variant="fp32", require_signature=False)
    try:
        logits = np.asarray(be.infer({"input": z["input"]})["logits"], dtype=np.float64)
    finally:
        be.close()
    y = z["labels"]
    raw, calibrated = cal.ece(cal.softmax(logits), y), cal.ece(cal.softmax(logits, t), y)
    assert calibrated < raw, (raw, calibrated)
    # and the confidence the runtime will actually route on (vector scaling if chosen)
    routed = confidence_from_manifest(pkg.manifest)
    assert routed is not None
    conf = routed({"logits": logits.astype(np.float32)})
    assert cal.ece_of(conf, logits.argmax(1) == y) < raw


def test_the_runtime_routes_on_the_converted_calibration(report: ConversionReport) -> None:
    """HybridClient reads ``routing``: confidence is the calibrated probability of the label the
    model returned (vector scaling when the manifest chose it, else softmax(logits / T)), while
    the outputs returned stay the model's own."""
    pkg = Path(report.package or "")
    m = read_manifest(pkg)
    r = m.routing
    c = r["calibration"]["candidates"]
    vector = r["method"] == "vector"
    # chosen only when it beats the scalar temperature on the evaluation rows in ECE and NLL
    assert vector == (
        c["vector"]["ece"] < c["temperature"]["ece"]
        and c["vector"]["nll"] < c["temperature"]["nll"]
    )
    policy = confidence_from_manifest(m)
    if vector:
        assert isinstance(policy, VectorScaledConfidence)
        scale, bias = np.array(r["vector"]["scale"]), np.array(r["vector"]["bias"])
        assert len(scale) == len(bias) == 10

        def expected(z: np.ndarray) -> float:
            return float(cal.vector_confidence(z[None], scale, bias)[0])
    else:
        assert isinstance(policy, TemperedConfidence)

        def expected(z: np.ndarray) -> float:
            return float(cal.softmax(z[None], r["temperature"]).max())

    x = np.load(S / "data/edge_val.npz")["input"][:8]
    with HybridClient(package=pkg, public_key=None, require_signature=False, mode="edge_only",
                      variant="fp32") as client:  # fmt: skip
        for row in x:
            res = client.infer({"input": row[None]})
            logits = np.asarray(res.outputs["logits"], dtype=np.float64).reshape(-1)
            assert res.confidence == pytest.approx(expected(logits), abs=1e-6)
            assert res.confidence != pytest.approx(float(cal.softmax(logits[None]).max()), abs=1e-4)


def test_a_bad_vector_in_the_manifest_is_a_package_error(report: ConversionReport) -> None:
    import dataclasses

    from edgecloud.errors import PackageError

    m = read_manifest(Path(report.package or ""))
    bad = dataclasses.replace(
        m, routing={**m.routing, "method": "vector", "vector": {"scale": [1]}}
    )
    with pytest.raises(PackageError, match=r"routing\.vector"):
        confidence_from_manifest(bad)
    bad = dataclasses.replace(
        m, routing={**m.routing, "method": "vector", "vector": {"scale": [1, 2], "bias": [0]}}
    )
    with pytest.raises(PackageError, match="one number per class"):
        confidence_from_manifest(bad)


def test_every_variant_is_checked_for_the_offload_fp32_accuracy_needs(
    report: ConversionReport,
) -> None:
    c = report.manifest.routing["calibration"] if report.manifest else {}
    assert set(c["variants"]) == {"fp32", "int8_static"}
    int8 = c["variants"]["int8_static"]
    assert int8["regression"] is False  # static INT8 of this MLP ranks rows like FP32
    assert abs(int8["extra_offload_points"]) <= 2.0
    assert 0.0 <= c["variants"]["fp32"]["offload_for_fp32_accuracy"] <= c["fp32_offload"]
    lines = summary_lines(report.manifest.routing if report.manifest else {})
    assert lines[0].startswith("calibration: temperature")
    assert any("int8_static" in line for line in lines)
    json.dumps(report.to_dict(), default=str)  # the --json report carries it


def _noisy_copy(src: Path, dst: Path, scale: float, seed: int) -> Path:
    m = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        if init.name == "fc1.weight":
            w = numpy_helper.to_array(init)
            noisy = w + rng.normal(0.0, scale * float(np.abs(w).mean()), w.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    onnx.save(m, str(dst))
    return dst


def test_a_variant_that_needs_more_offload_is_a_regression(tmp_path: Path) -> None:
    """A degraded variant (real ONNX, real sessions) that must offload more for FP32's accuracy
    is flagged, and its warning names it; an identical copy is not."""
    src = S / "models/digits_edge.onnx"
    val = load_dataset(S / "data/edge_val.npz", inspect_model(src).inputs, what="validation")
    fp32 = VariantReport(name="fp32", precision="fp32", format="onnx", file="fp32.onnx")
    same = VariantReport(name="fp16", precision="fp16", format="onnx", file="fp16.onnx")
    bad = VariantReport(name="int8_static", precision="int8", format="onnx", file="int8.onnx")
    written = [(fp32, src), (same, src), (bad, _noisy_copy(src, tmp_path / "bad.onnx", 1.0, 3))]
    notes: list[str] = []
    routing = calibrate_variants(
        written, val, val.labels, score="logits", confidence="logits", warnings=notes
    )
    rows = routing["calibration"]["variants"]
    assert rows["fp16"]["regression"] is False
    assert rows["fp16"]["extra_offload_points"] == 0.0
    assert rows["int8_static"]["regression"] is True, rows["int8_static"]
    assert rows["int8_static"]["extra_offload_points"] > 2.0
    assert any("routing regression" in w for w in bad.warnings)
    assert not any("routing regression" in w for w in same.warnings + fp32.warnings)
    assert any("REGRESSION" in line for line in summary_lines(routing))
    assert notes == []


def test_no_calibration_without_labels_too_few_rows_or_when_asked(tmp_path: Path) -> None:
    src = S / "models/digits_edge.onnx"
    val = load_dataset(S / "data/edge_val.npz", inspect_model(src).inputs, what="validation")
    fp32 = VariantReport(name="fp32", precision="fp32", format="onnx", file="fp32.onnx")
    kw = {"score": "logits", "confidence": "logits"}
    assert calibrate_variants([(fp32, src)], val, None, **kw) == {}  # type: ignore[arg-type]
    assert calibrate_variants([(fp32, src)], val, val.labels, enabled=False, **kw) == {}  # type: ignore[arg-type]
    notes: list[str] = []
    few = val.take(12)
    assert calibrate_variants([(fp32, src)], few, few.labels, warnings=notes, **kw) == {}  # type: ignore[arg-type]
    assert "12 labelled validation rows" in notes[0]
    out = tmp_path / "pkg"
    rep = convert(src, out, ConvertOptions(val=S / "data/edge_val.npz", calibrate=False,
                                           latency_runs=3))  # fmt: skip
    assert rep.manifest is not None
    assert rep.manifest.routing == {}
    assert "routing" not in json.loads((out / "manifest.json").read_text())


def test_cli_prints_the_calibration_and_no_calibrate_skips_it(tmp_path: Path) -> None:
    def cli(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgecloud", "convert", str(S / "models/digits_edge.onnx"),
             "--val", str(S / "data/edge_val.npz"), "--latency-runs", "3", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    r = cli("--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "calibration: temperature" in r.stdout
    assert "ECE" in r.stdout
    assert "drift reference: confidence histogram of 180 validation rows" in r.stdout
    assert read_manifest(tmp_path / "a").routing["temperature"] > 0
    r = cli("--out", str(tmp_path / "b"), "--no-calibrate", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["manifest"].get("routing") in (None, {})


@pytest.mark.parametrize("seed", range(20))
def test_offload_for_accuracy_matches_brute_force(seed: int) -> None:
    """Against every threshold tried one by one, ties included (confidences on a coarse grid)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    conf = np.round(rng.uniform(0, 1, n), 1)
    ok = rng.uniform(0, 1, n) < conf + 0.2
    target = float(rng.uniform(0.5, 1.0))
    best = 1.0
    for t in np.unique(conf):
        kept = conf >= t
        if ok[kept].mean() >= target:
            best = min(best, 1.0 - kept.mean())
    assert offload_for_accuracy(conf, ok, target) == pytest.approx(best)
