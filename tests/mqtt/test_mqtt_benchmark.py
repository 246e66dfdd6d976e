"""The MQTT benchmark runs end to end in its quick form (real broker, real worker processes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.bench import run_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.mqtt
def test_mqtt_benchmark_quick() -> None:
    text = run_benchmark("mqtt", "--quick", "--requests", "100")
    for series in ("raw paho", "MqttTransport", "HybridClient cloud"):
        assert series in text
    ratios = [float(r) for r in re.findall(r"MqttTransport\s+[\d.]+\s+[\d.]+\s+([\d.]+)x", text)]
    assert len(ratios) == 6  # QoS 0/1 x (256 B JSON, 256 B binary, 64 KiB binary)
    assert "worst MqttTransport/raw median ratio" in text
    assert re.findall(r"errors (\d+)", text) == ["0"] * 6
    # workers that hold each request 5 ms: the share group spreads the load over 4 of them
    held = text.split("holding each request")[1]
    rps = [float(x) for x in re.findall(r"worker\(s\):\s+([\d.]+) req/s", held)]
    assert len(rps) == 3
    assert rps[2] > 2.0 * rps[0], rps
