"""Calibration at convert time: a temperature for the package, and a routing check per variant.

When the validation data has labels (a classifier whose confidence is read from logits or
probabilities), ``convert`` calls ``calibrate_variants`` once every variant is built and judged:

1. The validation rows are split (seeded permutation): ``fit_fraction`` fit the temperature of
   the FP32 variant (``edgecloud.calibration.fit_temperature``, NLL), the rest *evaluate* it, so
   the ECE after is not measured on the rows that fitted it. The temperature lands in the
   manifest's ``routing.temperature``: the field ``edgecloud tune`` writes and the runtime applies
   to the score output when computing confidence (never to the outputs returned). Per-class
   vector scaling is fitted on the same rows and chosen (``routing.method = "vector"``,
   ``routing.vector``) only when it beats the temperature on the evaluation rows in both ECE and
   NLL; the runtime then reads the vector-scaled probability of the label the model returned.
2. Every written ONNX variant is run on the evaluation rows and scored with *that* temperature
   (what a device running it would compute). At the FP32 variant's threshold (the manifest's
   ``metadata.confidence_threshold``, else the runtime default 0.9) FP32 keeps some answers with
   some accuracy: the accuracy of the answers the device gives itself. For each other variant:
   the least offload at which its own kept answers are at least that accurate. An INT8/FP16
   variant that needs more than ``REGRESSION_POINTS`` more offload than FP32 for the same accuracy
   sends more traffic to the cloud than its gate figures show: a *routing regression*, named in
   the variant's warnings (text report, ``--json`` and the manifest) and in
   ``routing.calibration.variants``.

The accuracy compared is that of the edge's own answers, not of the cascade: at convert time no
cloud model is known. ``edgecloud tune`` does the same comparison on hybrid accuracy when it is
given the cloud side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from converters.data import Dataset
from converters.progress import NullReporter, Reporter
from edgecloud import calibration as cal

__all__ = [
    "DEFAULT_THRESHOLD",
    "MIN_ROWS",
    "REGRESSION_POINTS",
    "calibrate_variants",
    "offload_for_accuracy",
    "split_rows",
    "summary_lines",
]

#: ``HybridClient``'s threshold when neither the config nor the manifest sets one.
DEFAULT_THRESHOLD = 0.9
#: fewer labelled rows than this: no calibration (a temperature from 10 rows is noise).
MIN_ROWS = 40
#: more offload than FP32 by this many points, for the same accuracy: a regression.
REGRESSION_POINTS = 2.0


def offload_for_accuracy(conf: np.ndarray, correct: np.ndarray, accuracy: float) -> float:
    """The least offload at which the answers kept (``conf >= t``) are ``accuracy``-accurate.

    Offload changes only at observed confidences, so every distinct confidence is a candidate
    threshold; 1.0 when no threshold keeps answers that accurate (everything goes upstream).
    """
    c = np.asarray(conf, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    order = np.argsort(-c, kind="stable")
    cs, oks = c[order], ok[order]
    n = len(cs)
    if n == 0:
        return 1.0
    # keeping the top j rows (j = 1..n) is possible only where a tie block ends
    kept = np.arange(1, n + 1)
    ends = np.r_[cs[1:] != cs[:-1], True]
    acc = np.cumsum(oks) / kept
    good = ends & (acc >= accuracy - 1e-12)
    if not good.any():
        return 1.0
    return float(1.0 - kept[good].max() / n)


def split_rows(n: int, n_fit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (fit, evaluation) row indices: a seeded permutation, so the drift reference
    (converters/drift_reference.py) can find the evaluation rows again from the manifest."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_fit], perm[n_fit:]


class _Variant(Protocol):
    """What is read of a built variant (``VariantReport``): its name, format and warnings."""

    name: str
    format: str
    warnings: list[str]


@dataclass(frozen=True)
class _Scored:
    logits: np.ndarray
    correct: np.ndarray


def _logits(outputs: dict[str, np.ndarray], score: str, confidence: str) -> np.ndarray:
    x = np.asarray(outputs[score], dtype=np.float64)
    x = x.reshape(len(x), -1)
    if confidence == "probabilities":
        x = np.log(np.clip(x, 1e-12, 1.0))
    return x


def calibrate_variants(
    written: Sequence[tuple[_Variant, Path]],
    val: Dataset,
    labels: np.ndarray | None,
    *,
    score: str,
    confidence: str,
    enabled: bool = True,
    threshold: float | None = None,
    threads: int | None = None,
    reporter: Reporter | None = None,
    warnings: list[str] | None = None,
    fit_fraction: float = 0.5,
    seed: int = 0,
    outputs: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """The manifest's ``routing`` object for these variants, ``{}`` when nothing is calibrated.

    Appends a warning to each regressing variant's ``warnings`` (and a note to ``warnings`` when
    calibration was wanted but is impossible). ``outputs``, when given, receives each ONNX
    variant's outputs on ``val`` (the drift reference reads them instead of running it again).
    """
    from converters.validate import open_session, run_model

    if not enabled or labels is None or confidence not in ("logits", "probabilities"):
        return {}
    notes = warnings if warnings is not None else []
    y = np.asarray(labels)
    if len(y) < MIN_ROWS:
        notes.append(
            f"no confidence calibration: {len(y)} labelled validation rows, at least "
            f"{MIN_ROWS} are needed to fit a temperature and check it on others"
        )
        return {}
    fp32 = next((p for r, p in written if r.name == "fp32" and r.format == "onnx"), None)
    if fp32 is None:
        return {}
    fit, ev = split_rows(len(y), round(len(y) * fit_fraction), seed)
    scored: dict[str, _Scored] = {}
    onnx = [(r, p) for r, p in written if r.format == "onnx"]
    rep = reporter or NullReporter()
    with rep.stage("calibrating confidence (temperature, offload per variant)", len(onnx)) as adv:
        for r, path in onnx:
            outs = run_model(open_session(path, threads=threads), val)
            if outputs is not None:
                outputs[r.name] = outs
            x = _logits(outs, score, confidence)
            if x.shape[1] < 2 or x.shape[0] != len(y):
                return {}  # not a classifier's scores: nothing to calibrate
            scored[r.name] = _Scored(x, x.argmax(1) == y)
            adv(1)
    base = scored["fp32"]
    try:
        temperature = cal.fit_temperature(base.logits[fit], y[fit])
    except Exception as exc:  # a ConfigError naming what is wrong with the scores
        notes.append(f"no confidence calibration: {exc}")
        return {}
    t0 = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    p_raw = cal.softmax(base.logits[ev])
    p_cal = cal.softmax(base.logits[ev], temperature)
    ok0 = base.correct[ev]
    # per-class vector scaling, fitted on the same rows; kept only if it beats the scalar
    # temperature on the evaluation rows in both ECE (of the returned label) and NLL
    scale, bias = cal.fit_vector(base.logits[fit], y[fit])
    p_vec = cal.vector_probs(base.logits[ev], scale, bias)
    vec_ece = cal.ece_of(cal.vector_confidence(base.logits[ev], scale, bias), ok0)
    vec_nll = float(-np.log(np.clip(p_vec[np.arange(len(ev)), y[ev]], 1e-300, 1.0)).mean())
    t_ece, t_nll = cal.ece(p_cal, y[ev]), cal.nll(base.logits[ev], y[ev], temperature)
    vector = vec_ece < t_ece and vec_nll < t_nll

    def confidence_of(logits: np.ndarray) -> np.ndarray:
        if vector:
            return cal.vector_confidence(logits, scale, bias)
        return np.asarray(cal.softmax(logits, temperature).max(1))

    conf0 = confidence_of(base.logits[ev])
    kept0 = conf0 >= t0
    acc0 = float(ok0[kept0].mean()) if kept0.any() else 1.0
    off0 = float(1.0 - kept0.mean())
    variants: dict[str, dict[str, Any]] = {}
    for name, s in scored.items():
        conf = confidence_of(s.logits[ev])
        ok = s.correct[ev]
        kept = conf >= t0
        need = offload_for_accuracy(conf, ok, acc0)
        row: dict[str, Any] = {
            "edge_accuracy": round(float(ok.mean()), 6),
            "ece": round(cal.ece_of(conf, ok), 6),
            "offload_at_threshold": round(float(1.0 - kept.mean()), 6),
            "kept_accuracy_at_threshold": round(float(ok[kept].mean()) if kept.any() else 1.0, 6),
            "offload_for_fp32_accuracy": round(need, 6),
        }
        if name != "fp32":
            extra = 100.0 * (need - offload_for_accuracy(conf0, ok0, acc0))
            row["extra_offload_points"] = round(extra, 3)
            row["regression"] = bool(extra > REGRESSION_POINTS)
        variants[name] = row
    for r, _ in onnx:
        row = variants.get(r.name, {})
        if row.get("regression"):
            r.warnings.append(
                f"routing regression: needs {row['offload_for_fp32_accuracy']:.1%} offload for "
                f"the accuracy FP32's answers have at threshold {t0:g} ({acc0:.2%}), "
                f"{row['extra_offload_points']:.1f} points more than FP32"
            )
    out: dict[str, Any] = {
        "temperature": round(temperature, 6),
        "method": "vector" if vector else "temperature",
        "measure": "max_probability",
        "ece_before": round(cal.ece(p_raw, y[ev]), 6),
        "ece_after": round(vec_ece if vector else t_ece, 6),
        "rows": {"fit": len(fit), "threshold": len(ev)},
        "calibration": {
            "by": "edgecloud convert",
            "method": "vector" if vector else "temperature",
            "candidates": {
                "temperature": {"ece": round(t_ece, 6), "nll": round(t_nll, 6)},
                "vector": {"ece": round(vec_ece, 6), "nll": round(vec_nll, 6)},
            },
            "fit_rows": len(fit),
            "eval_rows": len(ev),
            "seed": seed,
            "nll_before": round(cal.nll(base.logits[ev], y[ev]), 6),
            "nll_after": round(vec_nll if vector else t_nll, 6),
            "threshold": t0,
            "fp32_kept_accuracy": round(acc0, 6),
            "fp32_offload": round(off0, 6),
            "regression_points": REGRESSION_POINTS,
            "variants": variants,
        },
    }
    if vector:  # the runtime reads it for max-probability routing (edgecloud/calibration.py)
        out["vector"] = {
            "scale": [round(float(v), 6) for v in scale],
            "bias": [round(float(v), 6) for v in bias],
        }
    return out


def summary_lines(routing: dict[str, Any]) -> list[str]:
    """The convert report's calibration lines (rich markup), empty when nothing was calibrated."""
    c = routing.get("calibration") if routing else None
    if not isinstance(c, dict) or c.get("by") != "edgecloud convert":
        return []
    how = "" if routing.get("method") != "vector" else " and per-class vector scaling (chosen)"
    lines = [
        f"calibration: temperature {routing['temperature']:.3f}{how} fitted on {c['fit_rows']} "
        f"validation rows; ECE {routing['ece_before']:.4f} -> {routing['ece_after']:.4f}, NLL "
        f"{c['nll_before']:.4f} -> {c['nll_after']:.4f} on {c['eval_rows']} others",
        f"at threshold {c['threshold']:g} FP32 offloads {c['fp32_offload']:.1%} and its own "
        f"answers are {c['fp32_kept_accuracy']:.2%} right; offload each variant needs for that:",
    ]
    for name, row in c["variants"].items():
        mark = ""
        if row.get("regression"):
            mark = f" [red]REGRESSION[/red] (+{row['extra_offload_points']:.1f} points)"
        elif "extra_offload_points" in row:
            mark = f" ({row['extra_offload_points']:+.1f} points)"
        lines.append(f"  {name}: {row['offload_for_fp32_accuracy']:.1%}{mark}")
    return lines
