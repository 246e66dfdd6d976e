"""The HTTP and server benchmarks run end to end in short modes (figures: docs/benchmarks.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_http_benchmark_prints_ratios() -> None:
    out = _run("benchmarks.http", "--requests", "60")
    # Exit 1 only means the 1.2x goal was missed on a noisy machine; anything else is a failure.
    assert out.returncode in (0, 1), out.stderr
    ratios = re.findall(r"ratio (\d+\.\d+)x", out.stdout)
    assert len(ratios) == 2, out.stdout
    assert all(float(r) > 0 for r in ratios)


@pytest.mark.slow
def test_server_benchmark_runs_without_errors() -> None:
    out = _run("benchmarks.server", "--clients", "4", "--seconds", "0.5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "batching on / off" in out.stdout
    assert re.search(r"batching on \(max 32\):\s+\d+\.\d req/s", out.stdout), out.stdout
