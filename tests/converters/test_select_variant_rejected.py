"""A variant kept by ``edgecloud convert --keep-rejected`` is never loaded unless asked for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from converters import ConvertOptions, convert
from edgecloud.package import verify_package
from edgecloud.runtime.loader import load_backend, select_variant

pytestmark = pytest.mark.slow


def test_rejected_variant_is_skipped_by_auto_choice(tmp_path: Path, samples_dir: Path) -> None:
    pkg = tmp_path / "pkg"
    convert(
        samples_dir / "models/digits_edge.onnx",
        pkg,
        ConvertOptions(
            int8=("dynamic",),
            val=samples_dir / "data/edge_val.npz",
            task="regression",
            tolerance=0.0,  # any INT8 error fails: the variant is refused and kept, marked
            keep_rejected=True,
            search_on_failure=False,
            latency_runs=2,
        ),
    )
    m = verify_package(pkg, None, require_signature=False).manifest
    assert m.variant("int8_dynamic").extra["rejected"] is True
    assert select_variant(m, providers=["CPUExecutionProvider"]).name == "fp32"
    # asked for by name it still loads: that is what keeping it is for
    assert select_variant(m, "int8_dynamic").name == "int8_dynamic"
    # the same manifest without the mark (and without the CPU timings, which on this tiny model
    # would also steer the choice away from INT8) picks INT8 first, so the mark is what decides
    unmarked = dataclasses.replace(
        m,
        variants=tuple(
            dataclasses.replace(
                v,
                extra={k: x for k, x in v.extra.items() if k != "rejected"},
                metrics={k: x for k, x in v.metrics.items() if not k.startswith("speedup")},
            )
            for v in m.variants
        ),
    )
    assert select_variant(unmarked, providers=["CPUExecutionProvider"]).name == "int8_dynamic"
    with load_backend(pkg, public_key=None, require_signature=False) as backend:
        assert backend.loaded.variant.name == "fp32"
