"""Task and output roles inferred from the graph and names; detection matching; interleaved
timing; what a device picks and why; the manifest's output roles (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.model import inspect_model
from converters.roles import infer_roles
from converters.validate import detection_f1, open_session, time_interleaved
from edgecloud.errors import ConfigError, PackageError
from edgecloud.package.manifest import Manifest, TensorSpec, Variant
from edgecloud.runtime.loader import explain_selection

ROOT = Path(__file__).resolve().parents[2]


def _model(path: Path, outputs: list[tuple[str, str, int]], *, last: str = "Identity") -> Path:
    """x [N,4] -> MatMul -> ``last`` -> each float output; int64 outputs via ArgMax."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    nodes.append(helper.make_node(last, ["h"], ["z"], name="last"))
    outs = []
    for name, kind, rank in outputs:
        if kind == "int64":
            nodes.append(helper.make_node("ArgMax", ["z"], [name], axis=1, keepdims=0))
            outs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["N"]))
        else:
            nodes.append(helper.make_node("Identity", ["z"], [name]))
            shape = ["N", 4] if rank == 2 else ["N", 4, 1][:rank]
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], outs, [w]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _roles(path: Path, **kw: object) -> object:
    return infer_roles(inspect_model(path), {}, **kw)  # type: ignore[arg-type]


def test_softmax_at_the_end_is_classification(tmp_path: Path) -> None:
    r = _roles(_model(tmp_path / "m.onnx", [("out", "float", 2)], last="Softmax"))
    assert r.task == "classification"  # type: ignore[attr-defined]
    assert "Softmax" in r.task_reason  # type: ignore[attr-defined]
    assert r.probabilities  # type: ignore[attr-defined]


def test_names_decide_classification_embedding_and_detection(tmp_path: Path) -> None:
    assert _roles(_model(tmp_path / "a.onnx", [("logits", "float", 2)])).task == "classification"  # type: ignore[attr-defined]
    emb = _roles(_model(tmp_path / "b.onnx", [("sentence_embedding", "float", 2)]))
    assert emb.task == "embedding"  # type: ignore[attr-defined]
    det = _roles(_model(tmp_path / "c.onnx", [("boxes", "float", 2), ("scores", "float", 2)]))
    assert det.task == "detection"  # type: ignore[attr-defined]
    assert det.score_output == "scores"  # type: ignore[attr-defined]
    assert det.gated == ("scores", "boxes")  # type: ignore[attr-defined]
    assert det.output_roles == {"scores": "score", "boxes": "boxes"}  # type: ignore[attr-defined]


def test_l2_normalised_output_is_an_embedding(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("ReduceL2", ["h"], ["n"], keepdims=1, axes=[1]),
        helper.make_node("Div", ["h", "n"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "m.onnx"))
    r = _roles(tmp_path / "m.onnx")
    assert r.task == "embedding"  # type: ignore[attr-defined]
    assert "L2-normalised" in r.task_reason  # type: ignore[attr-defined]


def test_score_output_is_never_the_int_label(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", [("label", "int64", 1), ("probabilities", "float", 2)])
    r = _roles(path)
    assert r.score_output == "probabilities"  # type: ignore[attr-defined]
    assert "output 0, 'label', is int64" in r.score_reason  # type: ignore[attr-defined]
    assert r.output_roles["label"] == "labels"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="is int64"):
        _roles(path, score_output="label")
    with pytest.raises(ConfigError, match="outputs are"):
        _roles(path, score_output="nope")


def test_no_hint_is_regression_and_says_so_and_task_overrides(tmp_path: Path) -> None:
    path = _model(tmp_path / "m.onnx", [("y", "float", 2)])
    r = _roles(path)
    assert r.task == "regression"  # type: ignore[attr-defined]
    assert "--task" in r.task_reason  # type: ignore[attr-defined]
    assert _roles(path, has_labels=True).task == "classification"  # type: ignore[attr-defined]
    forced = _roles(path, task="embedding")
    assert forced.task == "embedding"  # type: ignore[attr-defined]
    assert forced.task_reason == "--task"  # type: ignore[attr-defined]


def test_detection_f1_matches_by_iou_and_label() -> None:
    class Out(dict[str, np.ndarray]):
        splits: dict[str, list[int]]

    def outs(boxes: list[list[float]], labels: list[int], split: list[int]) -> Out:
        o = Out(
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            scores=np.linspace(1, 0.5, len(boxes)).astype(np.float32),
            labels=np.asarray(labels, np.int64),
        )
        o.splits = {"boxes": split, "scores": split, "labels": split}
        return o

    ref = outs([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]], [1, 2, 3], [2, 1])
    same = outs([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]], [1, 2, 3], [2, 1])
    kw = {"scores": "scores", "boxes": "boxes", "labels": "labels"}
    assert detection_f1(ref, same, **kw) == 1.0
    shifted = outs([[1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 5, 5]], [1, 9, 3], [2, 1])
    # box 0 still matches (IoU 0.68), box 1 has the wrong label: 2 of 3 matched
    assert detection_f1(ref, shifted, **kw) == pytest.approx(2 * 2 / 6)
    missing = outs([[0, 0, 10, 10]], [1], [1, 0])
    assert detection_f1(ref, missing, **kw) == pytest.approx(2 * 1 / 4)
    empty = outs([], [], [0, 0])
    assert detection_f1(empty, empty, **kw) == 1.0


def test_interleaved_timing_gives_ratios_with_spread(tmp_path: Path) -> None:
    small = _model(tmp_path / "s.onnx", [("y", "float", 2)])
    sess = open_session(small, threads=1)
    t = time_interleaved(
        {"fp32": sess, "same": open_session(small, threads=1)},
        {"x": np.ones((1, 4), np.float32)},
        1,
        rounds=9,
        runs=3,
    )
    assert t["fp32"].speedup is None
    same = t["same"]
    assert same.rounds == 9
    assert same.speedup is not None
    assert same.speedup_range is not None
    lo, hi = same.speedup_range
    assert lo <= same.speedup <= hi


def _manifest(variants: list[Variant], **kw: object) -> Manifest:
    return Manifest(
        name="m",
        version="1",
        inputs=(TensorSpec("x", "float32", ("N", 4)),),
        outputs=(TensorSpec("label", "int64", ("N",)), TensorSpec("p", "float32", ("N", 3))),
        variants=tuple(variants),
        **kw,  # type: ignore[arg-type]
    )


def _v(name: str, precision: str, **extra: object) -> Variant:
    return Variant(name, f"{name}.onnx", "onnx", precision, "cpu", 1, "", extra=dict(extra))


def test_device_passes_over_a_mostly_float_int8_and_says_why() -> None:
    m = _manifest([_v("fp32", "fp32"), _v("int8_auto", "int8", quantized_fraction=0.004)])
    v, why = explain_selection(m, providers=["CPUExecutionProvider"], trt_ok=False)
    assert v.name == "fp32"
    assert "int8_auto (mostly float)" in why
    ok = _manifest([_v("fp32", "fp32"), _v("int8_static", "int8", quantized_fraction=0.99)])
    v, why = explain_selection(ok, providers=["CPUExecutionProvider"], trt_ok=False)
    assert v.name == "int8_static"
    assert "INT8" in why


def test_manifest_output_roles_round_trip_and_are_checked() -> None:
    m = _manifest(
        [_v("fp32", "fp32")], confidence_output="p", output_roles={"p": "score", "label": "labels"}
    )
    back = Manifest.from_json(m.to_json())
    assert back.output_roles == {"p": "score", "label": "labels"}
    assert back.score_output == "p"
    # older manifests (no roles) still read, and write no roles
    plain = _manifest([_v("fp32", "fp32")])
    assert "output_roles" not in json.loads(plain.to_json())
    with pytest.raises(PackageError, match="unknown outputs"):
        _manifest([_v("fp32", "fp32")], output_roles={"nope": "score"})
    with pytest.raises(PackageError, match="confidence output"):
        _manifest([_v("fp32", "fp32")], confidence_output="nope")


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgecloud", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_small_items(tmp_path: Path, samples_dir: Path) -> None:
    r = _cli("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("edgecloud ")
    r = _cli("--help")
    assert r.returncode == 0
    assert "``" not in r.stdout  # no raw reStructuredText markup in the top help
    common = (
        "convert",
        samples_dir / "models/digits_edge.onnx",
        "--out",
        tmp_path / "p",
        "--val",
        samples_dir / "data/edge_val.npz",
    )
    r = _cli(*common, "--labels", "missing.txt")
    assert r.returncode == 2
    assert "--labels missing.txt: no such file" in r.stderr
    r = _cli(*common, "--name", "bad name!")
    assert r.returncode == 2
    assert "--name 'bad name!'" in r.stderr
    r = _cli(*common, "--calib-batch", "0", "--json")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert "--calib-batch must be >= 1" in doc["error"]["message"]
    assert "PosixPath" not in r.stdout + r.stderr
    # an --out that cannot be written is found before any work
    (tmp_path / "afile").write_text("x")
    r = _cli(*common[:2], "--out", tmp_path / "afile" / "pkg", *common[4:], "--int8", "dynamic")
    assert r.returncode == 2
    assert "is not a folder" in r.stderr
    assert "validating" not in r.stderr


def test_report_and_package_inspect_say_which_variant_a_device_loads(
    tmp_path: Path, samples_dir: Path
) -> None:
    r = _cli(
        "convert",
        samples_dir / "models/digits_cloud.onnx",
        "--out",
        tmp_path / "pkg",
        "--int8",
        "static",
        "--no-search",
        "--calib",
        samples_dir / "data/cloud_calib.npz",
        "--val",
        samples_dir / "data/cloud_val.npz",
        "--latency-runs",
        "5",
        "--json",
    )
    doc = json.loads(r.stdout)
    choice = doc["device_choice"]["cpu"]
    written = {v["name"] for v in doc["variants"] if v["verdict"] in ("accepted", "reference")}
    assert choice["variant"] in written
    assert choice["why"]
    assert doc["roles"]["task"] == "classification"
    assert doc["roles"]["task_reason"]
    r = _cli("package", "inspect", tmp_path / "pkg")
    assert r.returncode == 0, r.stderr
    assert f"a CPU device loads {choice['variant']}:" in " ".join(r.stdout.split())
