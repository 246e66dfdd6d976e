"""The edge-path and cascade benchmarks run (``--quick``) and hold their own invariants.

Timing goals are not asserted here (a shared CI machine is too noisy); the benchmarks' figures are
recorded in docs/benchmarks.md. What is asserted: they run, the client answers the benchmark input
locally, and the end-to-end cascade through a real server matches the in-process sweep exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cascade, edge_path


def test_edge_path_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert edge_path.main(["--quick", "--iterations", "300"]) == 0
    out = capsys.readouterr().out
    assert "HybridClient.infer" in out
    assert "added median" in out


def test_cascade_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert cascade.main(["--quick"]) == 0  # exits 1 if end-to-end and in-process disagree
    out = capsys.readouterr().out
    meta = json.loads((Path(__file__).parents[2] / "samples/data/digits_meta.json").read_text())
    assert f"edge-only {meta['edge']['val_accuracy']:.4f}" in out
    assert f"cloud-only {meta['cloud']['val_accuracy']:.4f}" in out
    # The sample models are trained so the cascade goal holds: hybrid within 0.3 point of
    # cloud-only while offloading at most 20 % of requests, at some threshold.
    assert "reachable at any threshold: yes" in out
    assert "end to end" in out
