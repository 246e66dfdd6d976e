"""benchmarks.int8_cnn --quick: the figures behind docs/benchmarks.md's MobileNet INT8 section.

The benchmark's numbers are timings (never asserted here); what is asserted is that it still
builds a full-size MobileNetV3-Small, converts it with the converter's defaults, and reports the
three things the docs cite: the interleaved ratios at 1 and 2 threads, the convolution totals
from onnxruntime's profiler, and the cost of the QuantizeLinear/DequantizeLinear islands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.bench import run_benchmark

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_int8_cnn_benchmark_reports_where_the_time_goes() -> None:
    pytest.importorskip("torchvision", reason="the zoo extra (installed by ./dev.sh test)")
    out = run_benchmark("int8_cnn", "--quick", timeout=600)
    assert "## mobilenet_v3 (224x224, batch 1): INT8 gate top1_agreement" in out
    for t in (1, 2):
        line = re.search(rf"threads={t}: fp32 ([0-9.]+) ms, int8 ([0-9.]+) ms \(([0-9.]+)x\)", out)
        assert line, out
        fp32, int8, ratio = (float(g) for g in line.groups())
        assert ratio == pytest.approx(fp32 / int8, abs=0.01)
    assert "int8, stem float" in out
    conv = re.search(r"fp32 Conv ([0-9]+) us vs int8 QLinearConv ([0-9]+) us", out)
    assert conv, out
    assert int(conv.group(1)) > 0
    assert int(conv.group(2)) > 0
    assert re.search(r"float islands \(QuantizeLinear \+ DequantizeLinear\): [0-9]+ us", out)
