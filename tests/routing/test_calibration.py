"""Calibration, thresholds from targets, ``edgecloud tune`` on real packages, drift.

Real parts: the digits edge/cloud ONNX pair, signed packages, onnxruntime sessions and the real
CLI. The statistical claims are checked on seeded synthetic data where the truth is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecloud import calibration as cal
from edgecloud.cli.main import main
from edgecloud.errors import ConfigError, PackageError
from edgecloud.package import (
    Manifest,
    TensorSpec,
    Variant,
    generate_keypair,
    load_private_key,
    load_public_key,
    verify_package,
    write_package,
)
from edgecloud.routing.calibrated import confidence_from_manifest

ROOT = Path(__file__).resolve().parents[2]
S = ROOT / "samples"


def _synthetic(n: int, t_true: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / t_true): calibrated at t_true."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, 5))
    p = cal.softmax(logits, t_true)
    labels = np.array([rng.choice(5, p=row) for row in p])
    return logits, labels


def test_temperature_fit_recovers_the_true_temperature_and_lowers_ece() -> None:
    logits, labels = _synthetic(4000, 2.5, seed=1)
    t = cal.fit_temperature(logits, labels)
    assert 2.2 < t < 2.8
    before = cal.ece(cal.softmax(logits), labels)
    after = cal.ece(cal.softmax(logits, t), labels)
    assert after < before / 3
    assert cal.nll(logits, labels, t) < cal.nll(logits, labels)


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        (np.zeros((0, 3)), "shape"),
        (np.full((4, 3), np.nan), "NaN"),
    ],
)
def test_temperature_fit_names_bad_input(bad: np.ndarray, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        cal.fit_temperature(bad, np.zeros(len(bad), dtype=np.int64))
    with pytest.raises(ConfigError, match="labels must be in"):
        cal.fit_temperature(np.zeros((2, 3)), np.array([0, 7]))


def test_offload_and_accuracy_targets_hold_on_the_rows_they_were_picked_on() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(50, 400))
        conf = rng.random(n)
        edge_ok = rng.random(n) < conf  # surer rows are more often right
        cloud_ok = rng.random(n) < 0.97
        x = float(rng.uniform(0, 0.6))
        t = cal.pick_offload(conf, x)
        assert cal.hybrid(conf, t, edge_ok, cloud_ok)[1] <= x + 1e-12
        y = float(rng.uniform(0, 0.05))
        t = cal.pick_accuracy(conf, edge_ok, cloud_ok, y)
        acc, off = cal.hybrid(conf, t, edge_ok, cloud_ok)
        assert acc >= cloud_ok.mean() - y - 1e-12
        # the least offload that does it: one step lower no longer does (or offloads nothing)
        lower = conf[conf < t]
        if len(lower):
            acc2, _ = cal.hybrid(conf, float(lower.max()), edge_ok, cloud_ok)
            assert acc2 < cloud_ok.mean() - y - 1e-12 or off == 0


def test_split_conformal_coverage_holds_on_average_over_draws() -> None:
    """E[P(edge answers wrongly)] <= alpha over calibration draws (the stated guarantee)."""
    rng = np.random.default_rng(7)
    alpha, n = 0.1, 200
    miscover = []
    for _ in range(300):
        conf = rng.random(2 * n)
        ok = rng.random(2 * n) < 0.4 + 0.6 * conf
        t = cal.conformal_threshold(conf[:n], ok[:n], alpha)
        answered = conf[n:] >= t
        miscover.append(float((answered & ~ok[n:]).mean()))
    assert np.mean(miscover) <= alpha + 0.01
    assert np.mean(miscover) >= alpha - 0.03  # not vacuous: close to the target


def test_selective_threshold_bounds_the_error_among_answered_rows() -> None:
    rng = np.random.default_rng(11)
    alpha, failures = 0.05, 0
    for _ in range(100):
        conf = rng.random(4000)
        ok = rng.random(4000) < 0.5 + 0.5 * conf
        t = cal.selective_threshold(conf[:1000], ok[:1000], alpha, delta=0.1)
        ans = conf[1000:] >= t
        if ans.any() and (~ok[1000:][ans]).mean() > alpha:
            failures += 1
    assert failures <= 15  # at most delta of the draws (10 %), with slack for 100 trials


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("offload=0.2", "offload", 0.2),
        ("offload=15%", "offload", 0.15),
        ("accuracy=0.5pt", "accuracy", 0.005),
        ("conformal=0.05", "conformal", 0.05),
        ("selective=0.02,delta=0.2", "selective", 0.02),
    ],
)
def test_parse_target(text: str, kind: str, value: float) -> None:
    t = cal.parse_target(text)
    assert (t.kind, t.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text", ["offload", "speed=1", "offload=2", "conformal=0", "offload=x"])
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="target"):
        cal.parse_target(text)


# -- real packages ----------------------------------------------------------------------------


def _digits_package(tmp: Path, routing: dict[str, object] | None = None) -> tuple[Path, Path, Path]:
    priv, pub = generate_keypair(tmp / "pub.key")
    m = Manifest(
        name="digits_edge",
        version="1.0.0",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),),
        routing=dict(routing or {}),
    )
    pkg = tmp / "pkg"
    write_package(pkg, m, {"model.onnx": S / "models" / "digits_edge.onnx"},
                  signing_key=load_private_key(priv))  # fmt: skip
    return pkg, priv, pub


def _rows(tmp: Path) -> tuple[Path, Path]:
    e = [np.load(S / "data" / f"edge_{s}.npz") for s in ("calib", "val")]
    c = [np.load(S / "data" / f"cloud_{s}.npz") for s in ("calib", "val")]
    labels = np.concatenate([d["labels"] for d in e])
    np.savez(tmp / "edge.npz", input=np.concatenate([d["input"] for d in e]), labels=labels)
    np.savez(tmp / "cloud.npz", input=np.concatenate([d["input"] for d in c]), labels=labels)
    return tmp / "edge.npz", tmp / "cloud.npz"


def test_tune_cli_writes_a_new_signed_version_the_runtime_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgecloud.runtime.loader import load_backend

    pkg, priv, pub = _digits_package(tmp_path)
    edge, cloud = _rows(tmp_path)
    out = tmp_path / "tuned"
    plot = tmp_path / "curve.png"
    rc = main([
        "tune", str(pkg), "--data", str(edge), "--cloud", str(S / "models" / "digits_cloud.onnx"),
        "--cloud-data", str(cloud), "--public-key", str(pub), "--key", str(priv),
        "--out", str(out), "--target", "offload=0.1", "--target", "accuracy=1pt",
        "--target", "conformal=0.05", "--use", "1", "--plot", str(plot), "--json",
    ])  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == "1.0.0-tuned"
    tuned = verify_package(out, load_public_key(pub))  # signed by the publisher's key
    r = tuned.manifest.routing
    assert r == report["routing"]
    assert r["target"]["kind"] == "accuracy"
    assert tuned.manifest.metadata["confidence_threshold"] == r["threshold"]
    assert r["ece_after"] < r["ece_before"]
    assert r["temperature"] != 1.0
    assert len(r["curve"]["threshold"]) == len(r["curve"]["offload"]) >= 10
    assert sum(r["reference"]["histogram"]) == pytest.approx(1.0)
    offload_target = next(t for t in r["targets"] if t["kind"] == "offload")
    assert offload_target["offload"] <= 0.1
    assert plot.stat().st_size > 1000
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # the runtime's confidence is the calibrated one, the outputs stay raw
    be = load_backend(out, public_key=load_public_key(pub))
    try:
        x = np.load(edge)["input"][:5]
        logits = be.infer({"input": x})["logits"]
        policy = confidence_from_manifest(tuned.manifest)
        assert policy is not None
        want = cal.softmax(logits, r["temperature"]).max(1)
        assert np.allclose(policy(be.infer({"input": x})), want, atol=1e-5)
        assert policy.lowest({"logits": logits[:1]})[0] == pytest.approx(want[0], abs=1e-5)
        assert not np.allclose(want, cal.softmax(logits).max(1))
    finally:
        be.close()
    # the old package (no routing) still reads and signs to the same bytes as before
    assert "routing" not in json.loads((pkg / "manifest.json").read_text())


def test_tune_cli_bad_input_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg, priv, pub = _digits_package(tmp_path)
    np.savez(tmp_path / "nolabels.npz", input=np.zeros((30, 64), np.float32))
    cloud = str(S / "models" / "digits_cloud.onnx")
    base = ["tune", str(pkg), "--public-key", str(pub), "--key", str(priv),
            "--out", str(tmp_path / "o"), "--cloud", cloud]  # fmt: skip
    assert main([*base, "--data", str(tmp_path / "nolabels.npz")]) == 2
    assert "no 'labels' array" in capsys.readouterr().err
    edge, _ = _rows(tmp_path)
    assert main([*base, "--data", str(edge), "--target", "speed=3"]) == 2
    assert "KIND=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_manifest_routing_is_checked(tmp_path: Path) -> None:
    pkg, _, pub = _digits_package(tmp_path, {"temperature": -1})
    m = verify_package(pkg, load_public_key(pub)).manifest
    with pytest.raises(PackageError, match=r"routing\.temperature"):
        confidence_from_manifest(m)
    d = json.loads((pkg / "manifest.json").read_text())
    d["routing"] = [1]
    with pytest.raises(PackageError, match="'routing' must be an object"):
        Manifest.from_dict(d)


def test_drift_monitor_alarms_on_a_shifted_window_only(tmp_path: Path) -> None:
    import onnxruntime as ort

    from device_agent.drift import DriftMonitor

    sess = ort.InferenceSession(str(S / "models" / "digits_edge.onnx"))
    x = np.load(S / "data" / "edge_val.npz")["input"]
    conf = cal.softmax(sess.run(None, {"input": x})[0]).max(1)
    ref = {"histogram": cal.histogram(conf), "offload": 0.1}
    pkg, _, pub = _digits_package(tmp_path, {"reference": ref})
    m = verify_package(pkg, load_public_key(pub)).manifest
    mon = DriftMonitor(window=100, max_distance=0.3, max_offload_shift=0.2)
    rng = np.random.default_rng(0)
    alarms = []
    for i in range(200):  # same data: no alarm
        row = x[i % len(x) : i % len(x) + 1]
        out = {"logits": sess.run(None, {"input": row})[0]}
        alarms.append(mon.observe(m, out, offloaded=conf[i % len(x)] < 0.8))
    assert alarms == [None] * 200
    assert mon.windows == 2
    for _ in range(100):  # noise: the model becomes unsure everywhere
        row = rng.random((1, 64)).astype(np.float32) * 0.3
        out = {"logits": sess.run(None, {"input": row})[0]}
        a = mon.observe(m, out, offloaded=True)
    assert a is not None
    assert a["alarm"]
    assert a["distance"] > 0.3
    assert mon.report()["alarms"] == 1


def test_tune_compares_variants_and_flags_one_that_needs_more_offload(tmp_path: Path) -> None:
    """A variant that needs more offload for the same target is a regression (exit 1 with
    --fail-on-regression). The "int8" here is a genuinely weaker model with the same interface
    (the harder pair's 4x4 edge), standing in for a quantisation that hurt."""
    from samples.build_hard_pair import build

    build(tmp_path / "hard")
    priv, pub = generate_keypair(tmp_path / "pub.key")
    m = Manifest(
        name="digits_edge",
        version="2.0.0",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(
            Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),
            Variant("int8", "model.int8.onnx", "onnx", "int8", "cpu", 0, ""),
        ),
    )
    pkg = tmp_path / "pkg"
    files = {"model.onnx": S / "models" / "digits_edge.onnx",
             "model.int8.onnx": tmp_path / "hard" / "edge.onnx"}  # fmt: skip
    write_package(pkg, m, files, signing_key=load_private_key(priv))
    edge, cloud = _rows(tmp_path)
    args = [
        "tune", str(pkg), "--data", str(edge), "--cloud", str(S / "models" / "digits_cloud.onnx"),
        "--cloud-data", str(cloud), "--public-key", str(pub), "--key", str(priv),
        "--out", str(tmp_path / "tuned"), "--variant", "fp32", "--target", "accuracy=1pt",
    ]  # fmt: skip
    assert main([*args, "--fail-on-regression"]) == 1
    v = verify_package(tmp_path / "tuned", load_public_key(pub)).manifest.routing["variants"]
    assert v["int8"]["regression"] is True
    assert v["int8"]["offload"] > v["fp32"]["offload"] + 0.02
    assert "regression" not in v["fp32"]
    assert main([*args, "--force"]) == 0  # reported, not failed, without the flag


def test_tune_cli_against_a_live_region(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--region: the cloud's answers come over HTTP from a real V2 server."""
    from tests.fixtures.servers import make_repository, running_cloud_server

    pkg, priv, pub = _digits_package(tmp_path)
    edge, _ = _rows(tmp_path)
    repo = make_repository(tmp_path, {"digits_cloud": S / "models" / "digits_cloud.onnx"})
    with running_cloud_server(repo, region="r", subprocess=False, threads=1) as server:
        rc = main([
            "tune", str(pkg), "--data", str(edge), "--region", server.url,
            "--cloud-model", "digits_cloud", "--cloud-input-shape", "1,8,8",
            "--public-key", str(pub), "--key", str(priv), "--out", str(tmp_path / "t"),
            "--target", "accuracy=1pt",
        ])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "cloud 97.50%" in out  # the CNN's accuracy on these 560 rows, as served
    r = verify_package(tmp_path / "t", load_public_key(pub)).manifest.routing
    assert r["curve"]["cloud_accuracy"] > r["curve"]["edge_accuracy"]


def test_temperature_on_a_probabilities_model(tmp_path: Path) -> None:
    from dataclasses import replace

    pkg, _, pub = _digits_package(tmp_path, {"temperature": 2.0})
    m = replace(verify_package(pkg, load_public_key(pub)).manifest, confidence="probabilities")
    p = cal.softmax(np.random.default_rng(0).normal(0, 3, (4, 10)))
    policy = confidence_from_manifest(m)
    assert policy is not None
    want = cal.softmax(np.log(p), 2.0).max(1)
    assert np.allclose(policy({"logits": p.astype(np.float32)}), want, atol=1e-5)
    assert np.allclose(cal.apply_temperature({"logits": p}, m)["logits"].max(1), want, atol=1e-5)
