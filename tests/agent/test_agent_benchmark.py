"""The device-agent benchmark runs end to end in quick mode and prints every figure it promises."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.bench import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.mqtt
def test_agent_benchmark_quick_run() -> None:
    out = run_benchmark("agent", "--quick")
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
