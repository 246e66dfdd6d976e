"""The converter on the real sample models: sizes, accuracy, agreement, the gate, exclusions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from converters import ConversionReport, ConvertOptions, convert
from converters.data import load_dataset
from converters.validate import compare, gate, open_session, run_model
from edgecloud.package import verify_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cloud_report(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> ConversionReport:
    out = tmp_path_factory.mktemp("cloud") / "pkg"
    return convert(
        samples_dir / "models/digits_cloud.onnx",
        out,
        ConvertOptions(
            fp16=True,
            int8=("static",),
            calib=samples_dir / "data/cloud_calib.npz",
            val=samples_dir / "data/cloud_val.npz",
            latency_runs=5,
        ),
    )


def test_static_int8_is_small_and_keeps_accuracy(cloud_report: ConversionReport) -> None:
    fp32 = cloud_report.variant("fp32")
    int8 = cloud_report.variant("int8_static")
    assert int8.verdict == "accepted"
    assert int8.size <= 0.30 * fp32.size, (int8.size, fp32.size)
    assert int8.metrics is not None
    assert fp32.metrics is not None
    assert fp32.metrics.accuracy == pytest.approx(0.9833, abs=1e-3)
    drop_points = 100 * (fp32.metrics.accuracy - int8.metrics.accuracy)  # type: ignore[operator]
    assert drop_points <= 1.0, drop_points
    assert int8.gate is not None
    assert int8.gate.passed
    assert int8.gate.metric == "accuracy"


def test_fp16_agrees_with_fp32(cloud_report: ConversionReport) -> None:
    fp16 = cloud_report.variant("fp16")
    assert fp16.metrics is not None
    assert fp16.metrics.top1_agreement is not None
    assert fp16.metrics.top1_agreement >= 0.995
    assert fp16.metrics.cosine > 0.9999
    # IO types stay FP32 (keep_io_types), so callers feed the same arrays to every variant
    pkg = Path(cloud_report.package or "")
    model = onnx.load(str(pkg / "fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer), (
        "no FP16 weights in the FP16 variant"
    )


def test_package_manifest_is_complete(cloud_report: ConversionReport, samples_dir: Path) -> None:
    pkg = verify_package(Path(cloud_report.package or ""), None, require_signature=False)
    m = pkg.manifest
    assert m.name == "digits_cloud"
    assert m.task == "classification"
    assert m.confidence == "logits"
    assert m.score_output == "logits"
    assert m.labels == tuple(str(i) for i in range(10))
    assert m.inputs[0].shape == ("batch", 1, 8, 8)
    assert m.outputs[0].shape == ("batch", 10)
    import hashlib

    src = (samples_dir / "models/digits_cloud.onnx").read_bytes()
    assert m.source_sha256 == hashlib.sha256(src).hexdigest()
    assert {v.name for v in m.variants} == {"fp32", "fp16", "int8_static"}
    int8 = m.variant("int8_static")
    assert int8.precision == "int8"
    assert int8.target == "cpu"
    for key in (
        "top1_agreement",
        "accuracy",
        "cosine",
        "rel_l2",
        "max_abs_error",
        "latency_ms_b1",
        "latency_ms_b32",
        "gate",
    ):
        assert key in int8.metrics, key
    assert int8.extra["settings"]["per_channel"] is True
    assert m.metadata["onnx_metadata"]["role"] == "cloud"


def test_warmup_file_rule_holds_for_every_variant(cloud_report: ConversionReport) -> None:
    """Apply the device's warm-up rule (docs/package.md) to each variant in the package."""
    root = Path(cloud_report.package or "")
    m = verify_package(root, None, require_signature=False).manifest
    w = m.warmup
    assert w["file"] == "warmup.npz"
    assert w["samples"] == 8
    data = np.load(root / w["file"])
    inputs = {k.removeprefix("input."): data[k] for k in w["inputs"]}
    ref = data[f"output.{w['compare_output']}"]
    assert inputs["input"].shape == (8, 1, 8, 8)
    for v in m.variants:
        out = open_session(root / v.file).run(None, inputs)[0]
        agree = float((out.argmax(1) == ref.argmax(1)).mean())
        rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        assert agree >= w["min_top1_agreement"], v.name
        assert rel <= w["max_rel_l2"], v.name
    # and a broken model fails it: random logits
    rng = np.random.default_rng(0)
    bad = rng.normal(size=ref.shape)
    assert float(np.linalg.norm(bad - ref) / np.linalg.norm(ref)) > w["max_rel_l2"]


def test_gate_refuses_with_tiny_tolerance(tmp_path: Path, samples_dir: Path) -> None:
    report = convert(
        samples_dir / "models/digits_cloud.onnx",
        tmp_path / "pkg",
        ConvertOptions(
            int8=("static",),
            calib=samples_dir / "data/cloud_calib.npz",
            val=samples_dir / "data/cloud_val.npz",
            tolerance=0.1,
            latency_runs=3,
            search_on_failure=False,
        ),
    )
    int8 = report.variant("int8_static")
    assert int8.verdict == "rejected"
    assert report.searches == {}
    assert not report.ok
    assert int8.gate is not None
    assert not int8.gate.passed
    assert "accuracy" in int8.gate.reason
    assert "more than the 0.1 % allowed" in int8.gate.reason
    assert f"dropped {int8.gate.drop_pct:.2f} %" in int8.gate.reason
    assert int8.gate.drop_pct > 0.1
    assert f"by {int8.gate.drop_pct - 0.1:.2f} percentage points" in int8.gate.reason
    names = {
        v.name
        for v in verify_package(tmp_path / "pkg", None, require_signature=False).manifest.variants
    }
    assert names == {"fp32"}
    assert not (tmp_path / "pkg" / "int8_static.onnx").exists()


def test_keep_rejected_writes_it_marked(tmp_path: Path, samples_dir: Path) -> None:
    report = convert(
        samples_dir / "models/digits_cloud.onnx",
        tmp_path / "pkg",
        ConvertOptions(
            int8=("static",),
            calib=samples_dir / "data/cloud_calib.npz",
            val=samples_dir / "data/cloud_val.npz",
            tolerance=0.1,
            keep_rejected=True,
            latency_runs=3,
            search_on_failure=False,
        ),
    )
    assert report.variant("int8_static").verdict == "kept-rejected"
    m = verify_package(tmp_path / "pkg", None, require_signature=False).manifest
    v = m.variant("int8_static")
    assert v.extra["rejected"] is True
    assert "allowed" in v.extra["rejected_reason"]
    assert "int8_static" not in m.warmup["per_variant"]


def test_dynamic_int8_on_the_edge_mlp(tmp_path: Path, samples_dir: Path) -> None:
    report = convert(
        samples_dir / "models/digits_edge.onnx",
        tmp_path / "pkg",
        ConvertOptions(int8=("dynamic",), val=samples_dir / "data/edge_val.npz", latency_runs=5),
    )
    dyn = report.variant("int8_dynamic")
    assert dyn.verdict == "accepted"
    assert dyn.metrics is not None
    assert dyn.metrics.top1_agreement is not None
    assert dyn.metrics.top1_agreement >= 0.98
    assert dyn.size < 0.6 * report.variant("fp32").size  # a 750-parameter MLP: headers weigh
    model = onnx.load(str(tmp_path / "pkg" / "int8_dynamic.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "QGemm", "MatMulIntegerToFloat"}
    # an MLP has no Conv, so no ConvInteger warning
    assert not any("ConvInteger" in w for w in dyn.warnings)


def test_dynamic_int8_of_a_cnn_is_flagged(tmp_path: Path, samples_dir: Path) -> None:
    report = convert(
        samples_dir / "models/digits_cloud.onnx",
        tmp_path / "pkg",
        ConvertOptions(int8=("dynamic",), val=samples_dir / "data/cloud_val.npz", latency_runs=5),
    )
    dyn = report.variant("int8_dynamic")
    assert any("ConvInteger" in w for w in dyn.warnings)
    m = verify_package(tmp_path / "pkg", None, require_signature=False).manifest
    assert m.variant("int8_dynamic").extra["warnings"] == dyn.warnings


def test_exclusions_keep_nodes_in_float(tmp_path: Path, samples_dir: Path) -> None:
    convert(
        samples_dir / "models/digits_cloud.onnx",
        tmp_path / "pkg",
        ConvertOptions(
            int8=("static",),
            calib=samples_dir / "data/cloud_calib.npz",
            val=samples_dir / "data/cloud_val.npz",
            exclude_nodes=("conv1",),
            exclude_ops=("Gemm",),
            latency_runs=3,
        ),
    )
    path = tmp_path / "pkg" / "int8_static.onnx"
    g = onnx.load(str(path)).graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    by_name = {n.name: n for n in g.node}
    for name in ("conv1", "fc"):  # by node name, by op type
        node = by_name[name]
        assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT, name
        assert node.input[1] not in producers, f"{name}'s weight goes through a DequantizeLinear"
    assert producers[by_name["conv2"].input[1]].op_type == "DequantizeLinear"
    # and onnxruntime runs only conv2 as an integer kernel
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 1, ops
    assert "QGemm" not in ops, ops


def test_validation_pieces_are_reusable(samples_dir: Path) -> None:
    """compare + gate on real sessions, the API an accuracy search uses per trial."""
    model = samples_dir / "models/digits_edge.onnx"
    data = load_dataset(samples_dir / "data/edge_val.npz", _inputs(model))
    outs = run_model(open_session(model), data)
    m = compare(outs, outs, score_output="logits", task="classification", labels=data.labels)
    assert m.top1_agreement == 1.0
    assert m.rel_l2 == 0.0
    noisy = {
        "logits": outs["logits"]
        + np.float32(5.0)
        * np.random.default_rng(1).normal(size=outs["logits"].shape).astype(np.float32)
    }
    bad = compare(outs, noisy, score_output="logits", task="classification", labels=data.labels)
    verdict = gate(bad, "classification", 1.0)
    assert not verdict.passed
    assert verdict.metric == "accuracy"
    assert verdict.drop_pct > 1.0
    reg = gate(bad, "regression", 1.0)
    assert not reg.passed
    assert reg.metric == "rel_l2"
    assert "relative L2" in reg.reason
    nan = {"logits": np.full_like(outs["logits"], np.nan)}
    nan_verdict = gate(
        compare(outs, nan, score_output="logits", task="classification"), "classification", 100.0
    )
    assert not nan_verdict.passed
    assert "NaN" in nan_verdict.reason


def _inputs(model: Path) -> tuple:  # type: ignore[type-arg]
    from converters.model import inspect_model

    return inspect_model(model).inputs
