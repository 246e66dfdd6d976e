"""The edge-path and cascade benchmarks run (``--quick``) and hold their own invariants.

Timing goals are not asserted here (a shared CI machine is too noisy); the benchmarks' figures are
recorded in docs/benchmarks.md. What is asserted: they run, the client answers the benchmark input
locally, and the end-to-end cascade through a real server matches the in-process sweep exactly.
"""

from __future__ import annotations

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
    assert "edge-only 0.9306" in out
    assert "cloud-only 0.9833" in out
    assert "end to end" in out
