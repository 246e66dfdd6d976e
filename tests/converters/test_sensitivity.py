"""Per-node sensitivity and the transformer-style encoder sample under INT8.

Real onnxruntime quantization and sessions on the committed sample models throughout.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converters.autotune import SearchContext, prepare
from converters.quantize import DynamicInt8Settings, StaticInt8Settings
from converters.search_space import Candidate, candidates
from converters.sensitivity import (
    _fake_quant,
    inspect_quant,
    measure_sensitivity,
    quantizable_nodes,
)
from edgecloud.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "samples" / "models"
DATA = ROOT / "samples" / "data"
ENCODER = MODELS / "digits_encoder.onnx"
CNN = MODELS / "digits_cloud.onnx"
MLP = MODELS / "digits_edge.onnx"
ATTENTION_MATMULS = {"layer0.attn/QK", "layer0.attn/PV", "layer1.attn/QK", "layer1.attn/PV"}


@pytest.fixture(scope="module")
def encoder_ctx(tmp_path_factory: pytest.TempPathFactory) -> SearchContext:
    return prepare(
        ENCODER,
        DATA / "edge_calib.npz",
        DATA / "edge_val.npz",
        work_dir=tmp_path_factory.mktemp("enc"),
        task="classification",
    )


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


# ------------------------------------------------------------------------- the encoder sample


def test_encoder_sample_is_a_working_transformer_classifier() -> None:
    model = onnx.load(str(ENCODER))
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Softmax", "LayerNormalization", "Erf", "ReduceMean"} <= ops
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert ENCODER.stat().st_size < 500 * 1024
    val = np.load(DATA / "edge_val.npz")
    sess = ort.InferenceSession(str(ENCODER), providers=["CPUExecutionProvider"])
    for bs in (1, 7):
        assert sess.run(None, {"input": val["input"][:bs]})[0].shape == (bs, 10)
    acc = (sess.run(None, {"input": val["input"]})[0].argmax(1) == val["labels"]).mean()
    assert acc >= 0.95


def _load_builder() -> ModuleType:
    path = ROOT / "samples" / "build_encoder.py"
    spec = importlib.util.spec_from_file_location("_build_encoder", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_build_encoder"] = mod
    spec.loader.exec_module(mod)
    return mod


def _structure(model: onnx.ModelProto) -> tuple[object, ...]:
    """What a rebuild must reproduce anywhere: the graph, its interface and weight shapes."""
    g = model.graph
    return (
        [(n.op_type, list(n.input), list(n.output)) for n in g.node],
        [(v.name, str(v.type)) for v in (*g.input, *g.output)],
        sorted((t.name, tuple(t.dims), t.data_type) for t in g.initializer),
        [(o.domain, o.version) for o in model.opset_import],
    )


@pytest.mark.slow
def test_encoder_builder_is_deterministic_and_reproduces_the_sample(tmp_path: Path) -> None:
    """Two builds in one run are byte-identical; against the committed file, which another
    torch/numpy/CPU may have produced, only what a release cannot promise may differ: the trained
    weights' last bits. So compare structure exactly and behaviour within tolerance."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    builder = _load_builder()
    # Determinism: same process, same environment, so the bytes must match (1 epoch keeps it quick).
    builder.build_encoder(tmp_path / "a.onnx", epochs=1)
    builder.build_encoder(tmp_path / "b.onnx", epochs=1)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()

    stats = builder.build_encoder(tmp_path / "enc.onnx")
    assert stats["max_abs_diff"] < 1e-4
    rebuilt, committed = onnx.load(str(tmp_path / "enc.onnx")), onnx.load(str(ENCODER))
    assert _structure(rebuilt) == _structure(committed)

    val = np.load(DATA / "edge_val.npz")
    x, labels = val["input"], val["labels"]

    def run(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out: np.ndarray = sess.run(None, {"input": x})[0]
        return out

    new, old = run(tmp_path / "enc.onnx"), run(ENCODER)
    acc_new, acc_old = (new.argmax(1) == labels).mean(), (old.argmax(1) == labels).mean()
    # Retraining elsewhere may move a few borderline samples, not the model's quality.
    assert acc_new >= 0.95
    assert abs(acc_new - acc_old) <= 0.02
    assert (new.argmax(1) == old.argmax(1)).mean() >= 0.97


def test_encoder_dynamic_int8_per_tensor_and_per_channel(encoder_ctx: SearchContext) -> None:
    ctx = encoder_ctx
    wd = ctx.work_dir
    per_tensor = ctx.quantizer.quantize(
        Candidate("dynamic", DynamicInt8Settings(per_channel=False), "pt"), wd / "pt.onnx"
    )
    per_channel = ctx.quantizer.quantize(
        Candidate("dynamic", DynamicInt8Settings(per_channel=True), "pc"), wd / "pc.onnx"
    )
    for p in (per_tensor, per_channel):
        assert _ops(p).count("MatMulInteger") >= 14  # every weight MatMul, attention included
        assert p.stat().st_size < 0.65 * ctx.fp32.stat().st_size
    e_pt = ctx.evaluator.evaluate(per_tensor, latency=False)
    e_pc = ctx.evaluator.evaluate(per_channel, latency=False)
    assert e_pt.gate.metric == "accuracy"
    assert e_pt.gate.drop_pct <= 1.0
    assert e_pc.gate.drop_pct <= 1.0
    # per-channel scales follow each output column's range: less output error
    assert e_pc.metrics.rel_l2 < e_pt.metrics.rel_l2


def test_encoder_static_qdq(encoder_ctx: SearchContext) -> None:
    ctx = encoder_ctx
    path = ctx.quantizer.quantize(
        Candidate("static", StaticInt8Settings(), "static"), ctx.work_dir / "qdq.onnx"
    )
    ops = _ops(path)
    assert ops.count("QuantizeLinear") > 10
    ev = ctx.evaluator.evaluate(path, latency=False)
    assert ev.metrics.top1_agreement is not None
    assert ev.metrics.top1_agreement >= 0.97


def test_encoder_exclusions_keep_the_named_nodes_float(encoder_ctx: SearchContext) -> None:
    ctx = encoder_ctx
    base = Candidate("dynamic", DynamicInt8Settings(per_channel=False), "pt")
    full = ctx.evaluator.evaluate(ctx.quantizer.quantize(base, ctx.work_dir / "f.onnx"))
    report = measure_sensitivity(
        ctx.quantizer, ctx.evaluator, base, ctx.work_dir / "sens", reporter=None
    )
    top = tuple(report.ranked_names()[:3])
    path = ctx.quantizer.quantize(base.with_exclusions(top), ctx.work_dir / "ex.onnx")
    graph = onnx.load(str(path)).graph
    float_matmuls = {n.name for n in graph.node if n.op_type == "MatMul"}
    # a Gemm (the pre-processor fuses head MatMul+Add) stays float as '<name>_MatMul'
    assert all(n in float_matmuls or f"{n}_MatMul" in float_matmuls for n in top)
    part = ctx.evaluator.evaluate(path, latency=False)
    assert part.metrics.rel_l2 < full.metrics.rel_l2
    assert (
        _ops(path).count("MatMulInteger")
        == _ops(ctx.work_dir / "f.onnx").count("MatMulInteger") - 3
    )


# ------------------------------------------------------------------------- sensitivity


def test_quantizable_nodes_per_family() -> None:
    dyn = dict(quantizable_nodes(ENCODER, "dynamic"))
    assert ATTENTION_MATMULS <= set(dyn)
    assert sum(op == "MatMul" for op in dyn.values()) == 18  # 14 with weights, 4 in attention
    static = dict(quantizable_nodes(ENCODER, "static"))
    assert {"LayerNormalization", "Softmax", "Add"} <= set(static.values())
    assert quantizable_nodes(MLP, "dynamic") == [("fc1", "Gemm"), ("fc2", "Gemm")]


def test_dynamic_exclusion_reaches_gemm_nodes(tmp_path: Path) -> None:
    """The dynamic quantizer renames Gemm g to g_MatMul; excluding 'fc1' must still work."""
    ctx = prepare(
        MLP, DATA / "edge_calib.npz", DATA / "edge_val.npz", work_dir=tmp_path, int8="dynamic"
    )
    base = candidates(ctx.profile, ctx.families)[0]
    one = ctx.quantizer.quantize(base.with_exclusions(("fc1",)), tmp_path / "one.onnx")
    both = ctx.quantizer.quantize(base.with_exclusions(("fc1", "fc2")), tmp_path / "both.onnx")
    assert _ops(one).count("MatMulInteger") == 1
    assert _ops(both).count("MatMulInteger") == 0
    assert ctx.evaluator.evaluate(both, latency=False).metrics.rel_l2 < 1e-6


def test_inspect_quant_on_the_encoder_ranks_every_matmul() -> None:
    report = inspect_quant(ENCODER, DATA / "edge_calib.npz", DATA / "edge_val.npz")
    assert report.family == "dynamic"
    assert report.complete
    mm = [n for n in report.nodes if n.op_type in ("MatMul", "Gemm")]
    assert len(mm) == 18  # 14 weight MatMuls, 4 attention MatMuls (head: fused into a Gemm)
    weight_mm = [n for n in mm if n.name not in ATTENTION_MATMULS]
    assert all(n.isolated_error is not None and n.isolated_error > 0 for n in weight_mm)
    errors = [n.isolated_error or 0.0 for n in report.nodes]
    assert errors == sorted(errors, reverse=True)
    assert report.to_dict()["nodes"][0]["name"] == report.nodes[0].name
    assert report.full_loss_pct is not None


def test_inspect_quant_static_sqnr_and_cap(tmp_path: Path) -> None:
    report = inspect_quant(
        CNN,
        DATA / "cloud_calib.npz",
        DATA / "cloud_val.npz",
        max_isolated=2,
        work_dir=tmp_path,
    )
    assert report.family == "static"
    assert not report.complete  # the cap left nodes without an isolated measurement
    measured = [n for n in report.nodes if n.isolated_error is not None]
    assert len(measured) == 2
    assert report.nodes[:2] == measured  # measured nodes rank first
    by_name = {n.name: n for n in report.nodes}
    for name in ("conv1", "conv2", "fc"):
        n = by_name[name]
        assert n.weight_sqnr_db is not None
        assert 25 < n.weight_sqnr_db < 80
        assert n.sqnr_db is not None
        assert n.sqnr_db <= n.weight_sqnr_db + 1e-9  # inputs' noise adds to the weight's
    # the cap measures the worst-SQNR nodes first
    sq_sorted = sorted(
        (n for n in report.nodes if n.sqnr_db is not None), key=lambda n: n.sqnr_db or 0.0
    )
    assert {n.name for n in measured} == {n.name for n in sq_sorted[:2]}


def test_fake_quant_matches_the_quantization_grid() -> None:
    scale = np.array(0.1, np.float32)
    zp = np.array(128, np.uint8)
    x = np.array([-12.8, -0.05, 0.0, 0.04, 0.26, 12.7, 40.0], np.float32)
    got = _fake_quant(x, scale, zp)
    np.testing.assert_allclose(got, [-12.8, -0.0, 0.0, 0.0, 0.3, 12.7, 12.7], atol=1e-6)
    assert math.isclose(
        float(_fake_quant(np.array([5.0], np.float32), scale, zp)[0]), 5.0, rel_tol=1e-6
    )


def test_measure_sensitivity_refuses_a_model_with_nothing_to_quantize(
    encoder_ctx: SearchContext,
) -> None:
    every = tuple(n for n, _ in quantizable_nodes(encoder_ctx.fp32, "dynamic"))
    cand = Candidate("dynamic", DynamicInt8Settings(exclude_nodes=every), "none")
    with pytest.raises(ConfigError, match="no node that dynamic INT8 quantizes"):
        measure_sensitivity(
            encoder_ctx.quantizer, encoder_ctx.evaluator, cand, encoder_ctx.work_dir / "s"
        )
