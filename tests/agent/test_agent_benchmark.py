"""The device-agent benchmark runs end to end in quick mode and prints every figure it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.mqtt
def test_agent_benchmark_quick_run() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.agent", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name in ("raw session.run", "agent.client.infer", "agent.infer"):
        m = re.search(rf"{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out)
        assert m, out
        assert float(m.group(1)) > 0
    assert re.search(r"agent endpoint\s+[\d.]+", out), out
    assert re.search(r"cloud server\s+[\d.]+", out), out
    assert re.search(r"endpoint / cloud server round trip: [\d.]+x", out), out
    rates = [float(x) for x in re.findall(r"(\d+) /s", out)]
    assert len(rates) == 2
    assert all(r > 0 for r in rates)
