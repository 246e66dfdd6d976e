"""The drift reference written at convert time (converters/drift_reference.py).

Real parts: ``convert`` on samples/models/digits_edge.onnx with the sample data (labelled and
with the labels stripped), the signed package it writes, onnxruntime backends of each variant
and the runtime's own confidence policy (``confidence_from_manifest``) recomputing what a
device would see. ``tune`` is run on the same digits logits to check that both commands store
one definition (``edgecloud.calibration.drift_reference``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters import ConversionReport, ConvertOptions, VariantReport, convert
from converters.calibrate import split_rows
from converters.data import Dataset, load_dataset
from converters.drift_reference import MIN_REFERENCE_ROWS, add_drift_reference, reference_lines
from converters.model import inspect_model
from device_agent.drift import DriftMonitor
from edgecloud import calibration as cal
from edgecloud.package import read_manifest, verify_package
from edgecloud.package.manifest import Manifest
from edgecloud.routing.calibrated import confidence_from_manifest
from edgecloud.runtime.loader import load_backend

ROOT = Path(__file__).resolve().parents[2]
S = ROOT / "samples"
SRC = S / "models/digits_edge.onnx"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ConversionReport:
    return convert(
        SRC,
        tmp_path_factory.mktemp("ref") / "pkg",
        ConvertOptions(
            int8=("static",),
            calib=S / "data/edge_calib.npz",
            val=S / "data/edge_val.npz",
            latency_runs=3,
        ),
    )


def _device_confidence(pkg: Path, variant: str, x: np.ndarray) -> np.ndarray:
    """What a device that loaded ``variant`` computes: the backend's outputs, the manifest's
    own calibrated policy."""
    m = read_manifest(pkg)
    policy = confidence_from_manifest(m)
    assert policy is not None
    be = load_backend(pkg, public_key=None, variant=variant, require_signature=False)
    try:
        return np.asarray(policy(be.infer({"input": x})), dtype=np.float64)
    finally:
        be.close()


def test_each_variant_gets_the_reference_of_the_confidence_its_device_computes(
    report: ConversionReport,
) -> None:
    pkg = Path(report.package or "")
    m = verify_package(pkg, None, require_signature=False).manifest
    r = m.routing
    c = r["calibration"]
    assert set(r["references"]) == {"fp32", "int8_static"}
    assert r["reference"] == r["references"]["fp32"]  # the package's: FP32's
    # the rows the temperature was not fitted on (tune likewise uses its threshold split)
    _, ev = split_rows(360, c["fit_rows"], c["seed"])
    x = np.load(S / "data/edge_val.npz")["input"][ev]
    for variant in ("fp32", "int8_static"):
        ref = r["references"][variant]
        conf = _device_confidence(pkg, variant, x)
        want = cal.drift_reference(conf, 0.9)  # the package has no threshold: the default
        assert ref == {**want, "by": "edgecloud convert", "variant": variant}
        assert ref["rows"] == len(ev) == 180
        assert sum(ref["histogram"]) == pytest.approx(1.0)
        # the offload at the threshold is the per-variant check's figure on the same rows
        assert ref["offload"] == pytest.approx(c["variants"][variant]["offload_at_threshold"])
        # and it is the calibrated confidence's, not the raw softmax's
        raw = cal.softmax(np.log(np.clip(_raw_probs(pkg, variant, x), 1e-12, 1))).max(1)
        assert cal.histogram(raw) != ref["histogram"]
    lines = reference_lines(r)
    assert len(lines) == 1
    assert "180 validation rows" in lines[0]
    assert "int8_static" in lines[0]
    assert f"{r['reference']['offload']:.1%}" in lines[0]
    js = report.to_dict()  # --json
    assert js["manifest"]["routing"]["reference"]["rows"] == 180
    assert js["drift_reference"] == {
        "rows": 180,
        "threshold": 0.9,
        "offload": {v: r["references"][v]["offload"] for v in ("fp32", "int8_static")},
        "package_reference": "fp32",
    }


def _raw_probs(pkg: Path, variant: str, x: np.ndarray) -> np.ndarray:
    be = load_backend(pkg, public_key=None, variant=variant, require_signature=False)
    try:
        return cal.softmax(np.asarray(be.infer({"input": x})["logits"]))
    finally:
        be.close()


def test_tune_stores_the_same_definition_for_its_rows_and_confidence() -> None:
    """``tune``'s reference is ``drift_reference`` of its threshold rows' calibrated confidence
    at the chosen threshold: the function convert uses."""
    import onnxruntime as ort

    from edgecloud import tuning

    z = np.load(S / "data/edge_val.npz")
    sess = ort.InferenceSession(str(SRC), providers=["CPUExecutionProvider"])
    logits = np.asarray(sess.run(None, {"input": z["input"]})[0], dtype=np.float64)
    y = z["labels"]
    cloud = np.where(np.arange(len(y)) % 10 == 0, (y + 1) % 10, y)  # a 90 %-right cloud
    res = tuning.tune(logits, cloud, y, targets=[cal.parse_target("accuracy=1pt")], seed=3)
    perm = np.random.default_rng(3).permutation(len(y))
    b = perm[round(len(y) * 0.5) :]
    conf = cal.softmax(logits[b], res.temperature).max(1)
    assert res.reference == cal.drift_reference(conf, res.chosen.threshold)
    assert res.routing()["reference"]["offload"] == pytest.approx(res.chosen.offload)


def test_val_without_labels_still_gives_a_reference_of_the_raw_confidence(
    tmp_path: Path,
) -> None:
    z = np.load(S / "data/edge_val.npz")
    np.savez(tmp_path / "nolabels.npz", input=z["input"])
    rep = convert(SRC, tmp_path / "pkg", ConvertOptions(val=tmp_path / "nolabels.npz",
                                                        latency_runs=3))  # fmt: skip
    assert rep.manifest is not None
    r = rep.manifest.routing
    assert "temperature" not in r  # nothing calibrated without labels
    assert "references" not in r  # one variant: the package's reference is its
    conf = _device_confidence(tmp_path / "pkg", "fp32", z["input"])
    want = cal.drift_reference(conf, 0.9)
    assert r["reference"] == {**want, "by": "edgecloud convert", "variant": "fp32"}
    assert r["reference"]["rows"] == 360  # every row: no fit split to keep out
    assert not any("drift reference" in w for w in rep.warnings)


def test_too_few_rows_give_no_reference_and_say_why(tmp_path: Path) -> None:
    z = np.load(S / "data/edge_val.npz")
    np.savez(tmp_path / "few.npz", input=z["input"][:30])
    rep = convert(SRC, tmp_path / "pkg", ConvertOptions(val=tmp_path / "few.npz",
                                                        latency_runs=3))  # fmt: skip
    assert rep.manifest is not None
    assert "reference" not in rep.manifest.routing
    assert rep.to_dict()["drift_reference"] is None
    note = next(w for w in rep.warnings if w.startswith("no drift reference"))
    assert "30 validation rows" in note
    assert f"at least {MIN_REFERENCE_ROWS}" in note
    # labelled: 90 rows calibrate (>= 40), but the 45 evaluation rows are too few for it
    info = inspect_model(SRC)
    val = load_dataset(S / "data/edge_val.npz", info.inputs, what="validation")
    fp32 = VariantReport(name="fp32", precision="fp32", format="onnx", file="fp32.onnx")
    notes: list[str] = []

    def ref(routing: dict[str, Any], data: Dataset, score: str = "logits", **kw: Any) -> Any:
        notes.clear()
        opts: dict[str, Any] = {"inputs": info.inputs, "outputs": info.outputs, **kw}
        return add_drift_reference(
            routing, [(fp32, SRC)], data, task="classification", score=score,
            confidence="logits", warnings=notes, **opts,
        )  # fmt: skip

    split = {"by": "edgecloud convert", "fit_rows": 45, "seed": 0}
    cal_routing = {"temperature": 0.8, "calibration": split}
    assert ref(cal_routing, val.take(90)) == cal_routing
    assert "45 validation rows (the calibration's evaluation rows)" in notes[0]
    # a spec the manifest refuses (no such score output) is a note too, never a crash
    probs = (dataclasses.replace(info.outputs[0], name="probs"),)
    assert ref({}, val, outputs=probs) == {}
    assert notes[0].startswith("no drift reference: manifest: confidence output"), notes
    # the spec names an output the model does not give: that variant is skipped, said why
    assert ref({}, val, score="probs", outputs=probs) == {}
    assert notes[0].startswith("no drift reference for fp32: its confidence failed"), notes


def test_the_monitor_reads_the_loaded_variants_reference_else_the_packages(
    report: ConversionReport,
) -> None:
    m = read_manifest(Path(report.package or ""))
    x = np.load(S / "data/edge_val.npz")["input"][:1]
    out = {"logits": np.asarray(_raw_probs(Path(report.package or ""), "fp32", x))}
    for variant, source in (
        ("int8_static", "routing.references.int8_static"),
        ("fp32", "routing.references.fp32"),
        ("trt_fp16", "routing.reference"),  # an engine convert could not run here
        (None, "routing.reference"),
    ):
        mon = DriftMonitor(window=10)
        mon.observe(m, out, offloaded=False, variant=variant)
        assert mon.source == source
        assert mon.report()["reference"] == source
    bad = dataclasses.replace(m, routing={**m.routing, "references": {"fp32": {"offload": 2}}})
    mon = DriftMonitor(window=10)
    assert mon.observe(bad, out, offloaded=False, variant="fp32") is None
    assert "routing.references.fp32 must be" in mon.source  # not monitored, and why
    assert cal.reference_for(bad, "int8_static")[1] == "routing.reference"
    # a good reference but a confidence the runtime refuses: not monitored either, and why
    bad = dataclasses.replace(m, routing={**m.routing, "method": "vector", "vector": {}})
    mon = DriftMonitor(window=10)
    for _ in range(10):
        assert mon.observe(bad, out, offloaded=False, variant="fp32") is None
    assert mon.windows == 0
    assert "routing.vector" in mon.report()["reference"]


def test_tune_replaces_the_convert_time_reference_in_its_newer_signed_version(
    tmp_path: Path,
) -> None:
    from edgecloud import tuning
    from edgecloud.package import generate_keypair, load_private_key, load_public_key

    priv, pub = generate_keypair(tmp_path / "k.key")
    conv = convert(SRC, tmp_path / "pkg", ConvertOptions(val=S / "data/edge_val.npz",
                                                         latency_runs=3, sign=priv))  # fmt: skip
    assert conv.manifest is not None
    assert conv.manifest.routing["reference"]["by"] == "edgecloud convert"
    e = [np.load(S / "data" / f"edge_{s}.npz") for s in ("calib", "val")]
    c = [np.load(S / "data" / f"cloud_{s}.npz") for s in ("calib", "val")]
    res, _ = tuning.tune_package(
        tmp_path / "pkg",
        tmp_path / "tuned",
        public_key=load_public_key(pub),
        signing_key=load_private_key(priv),
        inputs={"input": np.concatenate([d["input"] for d in e])},
        labels=np.concatenate([d["labels"] for d in e]),
        cloud=tuning.cloud_from_onnx(S / "models" / "digits_cloud.onnx"),
        cloud_inputs={"input": np.concatenate([d["input"] for d in c])},
        targets=[cal.parse_target("offload=0.2")],
    )
    m = verify_package(tmp_path / "tuned", load_public_key(pub)).manifest
    assert m.version == f"{conv.manifest.version}-tuned"
    assert m.routing["reference"] == res.reference  # tune's own: rows of its threshold split
    assert "by" not in m.routing["reference"]
    assert "references" not in m.routing  # convert's per-variant ones are gone with it
    assert cal.reference_for(m, "fp32") == (res.reference, "routing.reference")
    assert reference_lines(m.routing) == []


def test_a_live_threshold_other_than_the_references_does_not_alarm_by_itself(
    report: ConversionReport,
) -> None:
    """Same rows, same confidences, another live threshold: the window is compared at the
    reference's own threshold, so only the reported live offload moves; a reference without a
    threshold falls back to the live offload, and that alone alarms."""
    pkg = Path(report.package or "")
    m = read_manifest(pkg)
    x = np.load(S / "data/edge_calib.npz")["input"][:100]
    conf = _device_confidence(pkg, "fp32", x)
    be = load_backend(pkg, public_key=None, variant="fp32", require_signature=False)
    try:
        outs = [be.infer({"input": x[i : i + 1]}) for i in range(100)]
    finally:
        be.close()
    for live in (0.9, 0.999):
        mon = DriftMonitor(window=100)
        for o, c in zip(outs, conf, strict=True):
            a = mon.observe(m, o, offloaded=bool(c < live), variant="fp32")
        assert mon.last is not None
        assert a is None, mon.last
        assert mon.last["distance"] <= 0.25  # the histogram is in distribution either way
        assert mon.last["offload_at"] == 0.9
        assert mon.last["live_offload"] == pytest.approx(float((conf < live).mean()))
        assert mon.last["offload_shift"] <= 0.15
    # the same with a reference that does not say its threshold (an older tuned package)
    d = m.to_dict()
    for ref in [d["routing"]["reference"], *d["routing"].get("references", {}).values()]:
        ref.pop("threshold", None)
    old = Manifest.from_dict(d)
    mon = DriftMonitor(window=100)
    for o, c in zip(outs, conf, strict=True):
        a = mon.observe(old, o, offloaded=bool(c < 0.999), variant="fp32")
    assert a is not None
    assert mon.last is not None
    assert mon.last["offload_at"] is None
    assert mon.last["offload_shift"] > 0.15


def _tiny_detector(path: Path) -> Path:
    """A real ONNX detector head: per-box sigmoid scores and box coordinates, no labels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1, (16, 8)).astype(np.float32)
    w2 = rng.normal(0, 1, (16, 32)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["scores"]),
            helper.make_node("MatMul", ["x", "W2"], ["b"]),
            helper.make_node("Reshape", ["b", "shape"], ["boxes"]),
        ],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 8, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 8]),
        ],
        [
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(np.array([-1, 8, 4], np.int64), "shape"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_a_detector_gets_the_reference_of_its_devices_confidence(tmp_path: Path) -> None:
    """No labels, not a classifier: the reference is of the confidence the runtime computes for
    this manifest; with a task-aware policy named in ``routing.confidence``, of that one."""
    from edgecloud.routing.task_confidence import DetectorConfidence

    src = _tiny_detector(tmp_path / "det.onnx")
    x = np.random.default_rng(1).normal(0, 1, (120, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    rep = convert(src, tmp_path / "pkg", ConvertOptions(val=tmp_path / "val.npz", latency_runs=3))
    assert rep.manifest is not None
    assert rep.task == "detection"
    m = rep.manifest
    be = load_backend(tmp_path / "pkg", public_key=None, require_signature=False)
    try:
        outs = be.infer({"x": x})
    finally:
        be.close()
    policy = confidence_from_manifest(m)
    assert policy is not None
    want = cal.drift_reference(np.asarray(policy(outs)), 0.9)
    assert m.routing["reference"] == {**want, "by": "edgecloud convert", "variant": "fp32"}
    # a routing object naming Sedna's IBT rule: the reference follows that policy
    info = inspect_model(src)
    val = load_dataset(tmp_path / "val.npz", info.inputs, what="validation")
    fp32 = VariantReport(name="fp32", precision="fp32", format="onnx", file="fp32.onnx")
    spec = {"confidence": {"kind": "detector", "mode": "ibt", "floor": 0.6, "low": 0.2}}
    got = add_drift_reference(spec, [(fp32, src)], val, inputs=info.inputs,
                              outputs=info.outputs, task="detection", score="scores",
                              confidence="probabilities")  # fmt: skip
    ibt = DetectorConfidence("scores", mode="ibt", floor=0.6, low=0.2)(outs)
    assert got["reference"]["histogram"] == cal.histogram(ibt)
    assert got["reference"]["histogram"] != want["histogram"]


def _nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=12) | st.dictionaries(st.text(max_size=9), inner)


_junk = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=4),
    _nest,
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(
    ref=_junk | st.fixed_dictionaries({"histogram": _junk, "offload": _junk}),
    per=st.none() | _junk | st.dictionaries(st.sampled_from(["fp32", "int8"]), _junk),
    variant=st.sampled_from([None, "fp32", "int8", "trt"]),
)
def test_any_reference_in_a_manifest_is_used_or_refused_by_name(
    ref: Any, per: Any, variant: str | None
) -> None:
    """Whatever a (signed, but hand-written) manifest holds there: a usable reference, none, or
    a PackageError naming the field; the monitor never raises on it."""
    from edgecloud.errors import PackageError
    from edgecloud.package import Manifest, TensorSpec

    routing: dict[str, Any] = {"reference": ref}
    if per is not None:
        routing["references"] = per
    m = Manifest(
        name="m", version="1", inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),), variants=(), routing=routing,
    )  # fmt: skip
    refused = ""
    try:
        got, where = cal.reference_for(m, variant)
    except PackageError as exc:
        refused = str(exc)
    if refused:
        assert "routing.reference" in refused
    else:
        assert where in ("", "routing.reference") or where.startswith("routing.references.")
        if got:
            assert len(got["histogram"]) >= 2
            assert 0.0 <= float(got["offload"]) <= 1.0
    mon = DriftMonitor(window=10)
    logits = np.linspace(-1, 1, 10, dtype=np.float32)[None]
    for _ in range(10):
        a = mon.observe(m, {"logits": logits}, offloaded=True, variant=variant)
    assert a is None or a["alarm"] is True
