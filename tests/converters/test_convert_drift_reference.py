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

import numpy as np
import pytest

from converters import ConversionReport, ConvertOptions, VariantReport, convert
from converters.calibrate import split_rows
from converters.data import load_dataset
from converters.drift_reference import MIN_REFERENCE_ROWS, add_drift_reference, reference_lines
from converters.model import inspect_model
from device_agent.drift import DriftMonitor
from edgecloud import calibration as cal
from edgecloud.package import read_manifest, verify_package
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
    assert report.to_dict()["manifest"]["routing"]["reference"]["rows"] == 180  # --json


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
    note = next(w for w in rep.warnings if w.startswith("no drift reference"))
    assert "30 validation rows" in note
    assert f"at least {MIN_REFERENCE_ROWS}" in note
    # labelled: 90 rows calibrate (>= 40), but the 45 evaluation rows are too few for it
    val = load_dataset(S / "data/edge_val.npz", inspect_model(SRC).inputs, what="validation")
    few = val.take(90)
    fp32 = VariantReport(name="fp32", precision="fp32", format="onnx", file="fp32.onnx")
    notes: list[str] = []
    routing = {"temperature": 0.8, "calibration": {"by": "edgecloud convert", "fit_rows": 45,
                                                   "seed": 0}}  # fmt: skip
    kw = {"inputs": inspect_model(SRC).inputs, "outputs": inspect_model(SRC).outputs}
    got = add_drift_reference(routing, [(fp32, SRC)], few, task="classification",
                              score="logits", confidence="logits", warnings=notes, **kw)  # fmt: skip
    assert got == routing
    assert "45 validation rows (the calibration's evaluation rows)" in notes[0]
    # a confidence the policy cannot read is a note too, never a crash
    notes.clear()
    got = add_drift_reference({}, [(fp32, SRC)], val, task="classification", score="logits",
                              confidence="logits", warnings=notes,
                              inputs=kw["inputs"],
                              outputs=(dataclasses.replace(kw["outputs"][0], name="probs"),))  # fmt: skip
    assert got == {}
    assert notes and notes[0].startswith("no drift reference")
    notes.clear()  # the spec names an output the model does not give: the variant is skipped
    got = add_drift_reference({}, [(fp32, SRC)], val, task="classification", score="probs",
                              confidence="logits", warnings=notes,
                              inputs=kw["inputs"],
                              outputs=(dataclasses.replace(kw["outputs"][0], name="probs"),))  # fmt: skip
    assert got == {}
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
