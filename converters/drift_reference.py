"""The drift reference written at convert time, so a package that was never tuned is monitored.

The device agent's drift monitor (device_agent/drift.py) compares each window's confidence
histogram and offload rate with a reference in the manifest. ``edgecloud tune`` writes one; this
module writes the same thing (``edgecloud.calibration.drift_reference``) at convert time, once
the variants are built and calibrated:

- **Which confidence**: the one the device computes. A draft manifest carrying the routing
  object just calibrated (temperature or vector scaling) gives the runtime's own policy
  (``edgecloud.routing.calibrated.confidence_from_manifest``: the softmax measure tempered, or
  the task-aware policy ``routing.confidence`` names), and that policy scores the outputs.
  Labels are not needed: a package whose ``--val`` data has none gets a reference of its raw
  (uncalibrated) confidence, which is what its device computes.
- **Which rows**: with a convert-time calibration, its evaluation split (the rows the
  temperature was not fitted on, like ``tune``'s threshold split); otherwise every ``--val`` row.
  Fewer than ``MIN_REFERENCE_ROWS``: no reference, and a warning says why.
- **Which threshold**: the package's (``metadata.confidence_threshold``, else the runtime
  default 0.9): the offload rate is the fraction of rows below it.
- **Which variant**: a device loads one. Each ONNX variant's reference goes into
  ``routing.references[<variant>]`` (when there are several), and ``routing.reference`` is
  FP32's; the agent reads its own variant's and falls back to the package's (a TensorRT engine,
  which cannot run here, gets FP32's).

``tune`` later writes a new signed version whose ``routing`` replaces this one entirely: the
newer version wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from converters.calibrate import DEFAULT_THRESHOLD, split_rows
from converters.data import Dataset
from edgecloud import calibration as cal
from edgecloud.package.manifest import Manifest, TensorSpec
from edgecloud.routing.calibrated import confidence_from_manifest

__all__ = ["MIN_REFERENCE_ROWS", "add_drift_reference", "reference_lines", "reference_summary"]

MIN_REFERENCE_ROWS = cal.MIN_REFERENCE_ROWS


class _Variant(Protocol):
    name: str
    format: str


def add_drift_reference(
    routing: dict[str, Any],
    written: Sequence[tuple[_Variant, Path]],
    val: Dataset,
    *,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    task: str,
    score: str,
    confidence: str,
    threshold: float | None = None,
    enabled: bool = True,
    threads: int | None = None,
    cache: dict[str, dict[str, np.ndarray]] | None = None,
    warnings: list[str] | None = None,
) -> dict[str, Any]:
    """``routing`` with ``reference`` (and ``references``) added; unchanged when there is none.

    Never raises for data it cannot use: a note goes to ``warnings`` naming why.
    """
    from converters.validate import open_session, run_model

    notes = warnings if warnings is not None else []
    if not enabled or confidence == "none":
        return routing
    try:
        draft = Manifest(
            name="draft",
            version="0",
            inputs=inputs,
            outputs=outputs,
            variants=(),
            task=task,
            confidence=confidence,  # type: ignore[arg-type]
            confidence_output=score,
            routing=routing,
        )
        policy = confidence_from_manifest(draft)
    except Exception as exc:  # a PackageError naming the field
        notes.append(f"no drift reference: {exc}")
        return routing
    if policy is None:
        return routing
    calibrated = routing.get("calibration")
    if isinstance(calibrated, dict) and calibrated.get("by") == "edgecloud convert":
        _, rows = split_rows(len(val), int(calibrated["fit_rows"]), int(calibrated["seed"]))
        which = "the calibration's evaluation rows"
    else:
        rows, which = np.arange(len(val)), "every validation row"
    if len(rows) < MIN_REFERENCE_ROWS:
        notes.append(
            f"no drift reference: {len(rows)} validation rows ({which}), at least "
            f"{MIN_REFERENCE_ROWS} are needed for a {cal.HIST_BINS}-bin confidence histogram"
        )
        return routing
    t = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    refs: dict[str, dict[str, Any]] = {}
    for r, path in written:
        if r.format != "onnx":
            continue
        try:
            outs = (cache or {}).get(r.name)
            if outs is None:
                outs = run_model(open_session(path, threads=threads), val)
            picked = {k: np.asarray(v)[rows] for k, v in outs.items() if len(v) == len(val)}
            conf = np.asarray(policy(picked), dtype=np.float64).reshape(-1)
        except Exception as exc:  # outputs the policy cannot read, rows that do not align
            notes.append(f"no drift reference for {r.name}: its confidence failed: {exc}")
            continue
        if len(conf) != len(rows) or not np.isfinite(conf).all():
            notes.append(
                f"no drift reference for {r.name}: its confidence gave {len(conf)} values for "
                f"{len(rows)} rows (or a NaN)"
            )
            continue
        ref = cal.drift_reference(conf, t)
        ref["by"] = "edgecloud convert"
        ref["variant"] = r.name
        refs[r.name] = ref
    if not refs:
        return routing
    base = refs.get("fp32") or next(iter(refs.values()))
    out = {**routing, "reference": base}
    if len(refs) > 1:
        out["references"] = refs
    return out


def reference_summary(routing: dict[str, Any]) -> dict[str, Any] | None:
    """The ``--json`` report's ``drift_reference``: rows, threshold and each variant's offload
    (None when convert wrote no reference; ``warnings`` then says why)."""
    ref = routing.get("reference") if routing else None
    if not isinstance(ref, dict) or ref.get("by") != "edgecloud convert":
        return None
    per = routing.get("references") or {ref.get("variant", ""): ref}
    return {
        "rows": ref["rows"],
        "threshold": ref["threshold"],
        "offload": {name: r["offload"] for name, r in per.items()},
        "package_reference": ref.get("variant", ""),
    }


def reference_lines(routing: dict[str, Any]) -> list[str]:
    """The convert report's drift-reference lines, empty when convert wrote none."""
    s = reference_summary(routing)
    if s is None:
        return []
    parts = ", ".join(f"{n} {off:.1%}" for n, off in s["offload"].items())
    return [
        f"drift reference: confidence histogram of {s['rows']} validation rows; offload at "
        f"threshold {s['threshold']:g}: {parts} (replaced by `edgecloud tune`)"
    ]
