"""The harder edge/cloud pair (samples/build_hard_pair.py) and its calibration benchmark.

Built in the test run from real data scikit-learn ships (load_digits), never committed: the edge
must be clearly weaker and over-confident, temperature scaling must fix most of that, and the
thresholds picked on the tune split must hold on the held-out split as docs/benchmarks.md says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import calibration as bench
from edgecloud import calibration as cal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return bench.hard(tmp_path_factory.mktemp("hard"))


def test_the_edge_is_clearly_weaker_and_over_confident(pair: dict[str, object]) -> None:
    te, tc, ty = pair["test"]  # type: ignore[misc]
    edge_acc = float((te.argmax(1) == ty).mean())
    cloud_acc = float((tc == ty).mean())
    assert cloud_acc - edge_acc >= 0.05
    le, _, y = pair["tune"]  # type: ignore[misc]
    t = cal.fit_temperature(le, y)
    assert t > 1.5  # over-confident: the fitted temperature softens it
    before, after = cal.ece(cal.softmax(te), ty), cal.ece(cal.softmax(te, t), ty)
    assert after < 0.6 * before


def test_tuned_thresholds_hold_on_held_out_rows(
    pair: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    bench.FAILED.clear()
    ok = bench.report(pair, ["offload=0.2", "accuracy=1pt", "conformal=0.05"], 100, None)
    out = capsys.readouterr().out
    assert ok, bench.FAILED
    assert "mean coverage" in out
    assert "within 2 pt: True" in out


def test_the_pair_is_real_onnx(tmp_path: Path) -> None:
    import onnxruntime as ort

    from samples.build_hard_pair import build

    meta = build(tmp_path)
    x = np.load(tmp_path / "test.npz")["input"][:3]
    for name in ("edge", "cloud"):
        s = ort.InferenceSession(str(tmp_path / f"{name}.onnx"))
        assert s.run(None, {"input": x})[0].shape == (3, 10)
    assert meta["rows"]["test"] == 450


def test_digits_targets_hold_cross_fitted(capsys: pytest.CaptureFixture[str]) -> None:
    """The digits pair: every row held out once (one 224-row split is too small to judge)."""
    bench.FAILED.clear()
    ok = bench.report(bench.digits(), ["offload=0.1", "accuracy=1pt", "conformal=0.05"], 50, None)
    out = capsys.readouterr().out
    assert ok, bench.FAILED
    assert "all 560 rows held out once each" in out
    assert "within 2 pt of 0.100: True" in out


def test_cross_fit_catches_a_biased_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that offloads too much on unseen rows must fail the cross-fitted check."""
    import dataclasses

    from edgecloud import tuning

    real = tuning.tune

    def biased(*a: object, **kw: object) -> tuning.TuneResult:
        res = real(*a, **kw)  # type: ignore[arg-type]
        shifted = [dataclasses.replace(r, threshold=r.threshold + 0.1) for r in res.targets]
        return dataclasses.replace(res, targets=shifted)

    monkeypatch.setattr(tuning, "tune", biased)
    d = bench.digits()
    logits = np.concatenate([d["tune"][0], d["test"][0]])
    cloud = np.concatenate([d["tune"][1], d["test"][1]])
    labels = np.concatenate([d["tune"][2], d["test"][2]])
    bench.FAILED.clear()
    assert not bench.cross_fit("digits", logits, cloud, labels, [cal.parse_target("offload=0.1")])
    assert any("cross-fitted offload" in f for f in bench.FAILED)
