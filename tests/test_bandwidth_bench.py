"""benchmarks/bandwidth.py runs against its real regions and prints what docs/benchmarks.md
records: per task and transport, FP32/FP16/INT8 bytes per offload with ratios, accuracies and
the INT8 answers' agreement with FP32; and the codec's bytes for an image-sized tensor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import bandwidth as bench

pytestmark = pytest.mark.slow

_ROW = re.compile(
    r"  (HTTP JSON|HTTP binary|MQTT JSON|MQTT binary|gRPC) +([\d.]+) +([\d.]+) \(x([\d.]+)\) +"
    r"([\d.]+) \(x([\d.]+)\) +([\d.]+) / ([\d.]+) / ([\d.]+) +([\d.]+)"
)


def test_the_bandwidth_benchmark_measures_all_three_encodings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench.regions(tmp_path, rows=12)
    bench.image_codec()
    out = capsys.readouterr().out
    rows = _ROW.findall(out)
    assert len(rows) == 10, out  # 2 tasks x 5 transports
    for label, b32, b16, _, b8, _, a32, _, a8, agree in rows:
        if label not in ("HTTP JSON", "MQTT JSON"):
            assert float(b8) < float(b16) < float(b32), label  # binary: bytes shrink with dtype
        else:
            assert float(b8) < float(b32), label  # JSON: shorter integers, FP16 no gain
        assert abs(float(a8) - float(a32)) <= 1 / 12 + 1e-9
        assert float(agree) >= 11 / 12
    sizes = [int(n) for _, n in re.findall(r"(FP32|FP16|INT8): +(\d+) B", out)]
    assert len(sizes) == 3
    assert sizes[0] > 600_000
    assert sizes[1] < 0.51 * sizes[0]
    assert sizes[2] < 0.26 * sizes[0]
