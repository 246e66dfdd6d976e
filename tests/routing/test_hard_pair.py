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
