"""Calibrated confidence and thresholds chosen from targets (``edgecloud tune``).

Raw softmax scores of a small edge model are usually over-confident, so a threshold set by hand
means something different for every model and every variant. This module gives the router a
confidence it can trust and a threshold that follows from what the operator asked for:

- **Temperature scaling** (Guo et al. 2017): one scalar ``T`` per model, fitted on labelled
  validation data by minimising the negative log-likelihood of ``softmax(logits / T)``. The NLL is
  convex in ``1/T``, so a golden-section search on a bounded interval finds the optimum without
  scipy (the device imports this module). Accuracy never changes: the arg-max is the same.
- **ECE** (expected calibration error): the top-1 reliability gap averaged over equal-width bins,
  reported before and after.
- **Threshold sweep**: for every candidate threshold, the fraction offloaded and the hybrid
  accuracy (edge answer when confident, cloud answer otherwise).
- **Targets**, each a function of the sweep:

  * ``offload``: about X of the requests offloaded (a smoothed quantile of the confidence,
    computed on every tune row: it needs neither labels nor the cloud), at most X of the tune
    rows;
  * ``accuracy``: within Y points of cloud-only accuracy with the least offload;
  * ``conformal``: split-conformal, marginal. With calibration and test rows exchangeable,
    ``P(edge answers and is wrong) <= alpha`` for a new request (equivalently: the prediction set
    "the edge's label if it answers, any label if it defers" covers the true label with
    probability ``>= 1 - alpha``; at most ``1 - alpha + 1/(n+1)`` without ties). The guarantee is
    over the draw of the calibration set and the new row, not conditional on the edge answering;
  * ``selective``: Learn-then-Test with fixed-sequence binomial tests. With probability
    ``>= 1 - delta`` over the calibration set, ``P(edge is wrong | edge answers) <= alpha``. This
    is the conditional statement ("an answer from the edge is right with probability
    ``>= 1 - alpha``"), paid for with more offload.

  None of these bounds hold under distribution shift; the drift monitor (device_agent/drift.py)
  exists to notice when the live confidence histogram leaves the one recorded here.

What ``tune`` stores in the manifest's optional ``routing`` object (all keys optional; an old
manifest without it behaves as before): ``temperature``, ``measure``, ``threshold``, ``target``,
``ece_before``/``ece_after``, ``curve`` (thresholds, offload, accuracy) and ``reference`` (the
confidence histogram and offload rate the drift monitor compares against, ``drift_reference``).
``edgecloud convert`` writes the same ``reference`` for a package never tuned, plus one per
variant in ``references`` (converters/drift_reference.py); ``reference_for`` picks the one of
the variant a device loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecloud.errors import ConfigError, PackageError
from edgecloud.thresholds import (
    Curve,
    Target,
    conformal_threshold,
    hd_quantile,
    hybrid,
    parse_target,
    pick,
    pick_accuracy,
    pick_offload,
    selective_threshold,
    sweep,
)

if TYPE_CHECKING:
    from edgecloud.package.manifest import Manifest

__all__ = [
    "HIST_BINS",
    "Curve",
    "Target",
    "apply_temperature",
    "conformal_threshold",
    "drift_reference",
    "ece",
    "ece_of",
    "fit_temperature",
    "fit_vector",
    "hd_quantile",
    "histogram",
    "hybrid",
    "measure_scores",
    "nll",
    "parse_target",
    "pick",
    "pick_accuracy",
    "pick_offload",
    "reference_for",
    "routing_of",
    "selective_threshold",
    "softmax",
    "sweep",
    "vector_confidence",
    "vector_probs",
]

#: Equal-width bins of the confidence histogram stored as the drift reference.
HIST_BINS = 10
#: Fewer rows than this give no drift reference: with 10 bins and fewer than 50 rows a bin
#: holds a handful of rows, and a 200-request window would differ from it by chance alone.
MIN_REFERENCE_ROWS = 50
_T_MIN, _T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1) / temperature
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1) / temperature
    m = x.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    return float((lse - x[np.arange(len(x)), labels]).mean())


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"calibration needs logits of shape [N, classes], got {x.shape}")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"calibration needs one integer label per row: {x.shape[0]} rows, labels {y.shape} "
            f"{y.dtype}"
        )
    if y.min() < 0 or y.max() >= x.shape[1]:
        raise ConfigError(
            f"labels must be in [0, {x.shape[1] - 1}] for {x.shape[1]} classes, "
            f"got [{y.min()}, {y.max()}]"
        )
    if not np.isfinite(x).all():
        raise ConfigError("calibration logits contain NaN or Inf")
    return x, y.astype(np.int64)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, tol: float = 1e-4) -> float:
    """The temperature minimising NLL, searched on ``1/T`` in [1/20, 1/0.05].

    Golden-section search needs only a unimodal objective; NLL(beta) with beta = 1/T is a
    log-sum-exp of lines minus a line, hence convex. Returns a value in [0.05, 20].
    """
    x, y = _check(logits, labels)
    lo, hi = 1.0 / _T_MAX, 1.0 / _T_MIN
    g = (math.sqrt(5) - 1) / 2

    def f(beta: float) -> float:
        return nll(x, y, 1.0 / beta)

    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(1.0 / ((a + b) / 2))


def fit_vector(
    logits: np.ndarray, labels: np.ndarray, *, steps: int = 600, lr: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Vector scaling (Guo et al. 2017): per-class ``scale`` and ``bias``, ``softmax(x*w + b)``.

    The NLL is convex in (w, b); full-batch Adam from the scalar fit (w = 1/T, b = 0) with a
    small L2 pull towards it (a per-class parameter fitted on a few rows per class overfits).
    Deterministic: no sampling. It can change the arg-max, so the runtime reads it only as the
    probability of the label the model returned (``VectorScaledConfidence``).
    """
    x, y = _check(logits, labels)
    n, k = x.shape
    w0 = 1.0 / fit_temperature(x, y)
    w, b = np.full(k, w0), np.zeros(k)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = 1.0
    lam = 1e-2
    mw, vw, mb, vb = (np.zeros(k) for _ in range(4))
    for i in range(1, steps + 1):
        p = softmax(x * w + b)
        g = (p - onehot) / n
        gw = (g * x).sum(axis=0) + lam * (w - w0)
        gb = g.sum(axis=0) + lam * b
        for m, v, grad, par in ((mw, vw, gw, w), (mb, vb, gb, b)):
            m *= 0.9
            m += 0.1 * grad
            v *= 0.999
            v += 0.001 * grad * grad
            par -= lr * (m / (1 - 0.9**i)) / (np.sqrt(v / (1 - 0.999**i)) + 1e-8)
    return w, b


def vector_confidence(logits: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per row: the vector-scaled probability of the model's own top label (not the new one)."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    p = softmax(x * np.asarray(scale) + np.asarray(bias))
    return np.asarray(p[np.arange(len(x)), x.argmax(axis=1)])


def vector_probs(logits: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``softmax(logits * scale + bias)``, row-wise."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    return softmax(x * np.asarray(scale) + np.asarray(bias))


def ece_of(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE from a confidence and a correctness per row (for a confidence that is not a max)."""
    c = np.asarray(conf, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    idx = np.minimum((c * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(ok[m].mean() - c[m].mean())
    return float(total)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-1 expected calibration error over ``bins`` equal-width confidence bins."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def measure_scores(probs: np.ndarray, measure: str = "max_probability") -> np.ndarray:
    """The router's confidence per row (same definitions as edgecloud.routing.confidence)."""
    p = np.asarray(probs, dtype=np.float64)
    if measure == "max_probability":
        return np.asarray(p.max(axis=1))
    if measure == "margin":
        s = np.sort(p, axis=1)
        return np.asarray(s[:, -1] - (s[:, -2] if p.shape[1] > 1 else 0.0))
    if measure == "entropy":
        k = p.shape[1]
        if k < 2:
            return np.ones(len(p))
        h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
        return np.asarray(1.0 - h / math.log(k))
    raise ConfigError(
        f"confidence measure must be max_probability, margin or entropy, got {measure!r}"
    )


def histogram(conf: np.ndarray, bins: int = HIST_BINS) -> list[float]:
    """Normalised histogram of confidences over equal-width bins of [0, 1]."""
    c = np.clip(np.asarray(conf, dtype=np.float64), 0.0, 1.0)
    idx = np.minimum((c * bins).astype(np.int64), bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    return [float(v) for v in counts / max(1, len(c))]


def drift_reference(
    conf: np.ndarray, threshold: float, *, offload: float | None = None
) -> dict[str, Any]:
    """The drift monitor's reference: the histogram of ``conf`` and the offload rate.

    One definition for ``tune`` and ``convert``, so that the two references mean the same: the
    offload is the fraction of rows below ``threshold`` (the router's rule), unless the caller
    measured it otherwise (``tune``'s offload target is picked and reported on every row).
    """
    c = np.asarray(conf, dtype=np.float64)
    off = float((c < threshold).mean()) if offload is None else float(offload)
    return {
        "histogram": histogram(c),
        "bins": HIST_BINS,
        "offload": round(off, 6),
        "threshold": round(float(threshold), 6),
        "rows": len(c),
    }


# -- runtime side -----------------------------------------------------------------------------


def routing_of(manifest: Manifest) -> dict[str, Any]:
    """The manifest's ``routing`` object, checked (a bad value is a PackageError naming it)."""
    r = getattr(manifest, "routing", None) or {}
    if not isinstance(r, Mapping):
        raise PackageError(f"manifest '{manifest.name}': 'routing' must be an object")
    t = r.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise PackageError(
            f"manifest '{manifest.name}': routing.temperature must be a finite number > 0, "
            f"got {t!r}"
        )
    th = r.get("threshold")
    if th is not None and (
        isinstance(th, bool) or not isinstance(th, int | float) or not 0.0 <= th <= 1.0 + 1e-9
    ):
        raise PackageError(
            f"manifest '{manifest.name}': routing.threshold must be in [0, 1], got {th!r}"
        )
    return dict(r)


def apply_temperature(
    outputs: Mapping[str, np.ndarray], manifest: Manifest
) -> dict[str, np.ndarray]:
    """Calibrated probabilities of the score output (the "unless asked" path for callers)."""
    t = float(routing_of(manifest).get("temperature", 1.0))
    out = dict(outputs)
    x = np.asarray(outputs[manifest.score_output], dtype=np.float64)
    x = x.reshape(len(x), -1) if x.ndim > 1 else x[None, :]
    if manifest.confidence == "probabilities":
        x = np.log(np.clip(x, 1e-12, 1.0))
    out[manifest.score_output] = softmax(x, t).astype(np.float32)
    return out


def reference_for(manifest: Manifest, variant: str | None = None) -> tuple[dict[str, Any], str]:
    """The drift reference for the variant a device loaded, and where it came from.

    ``convert`` stores one per ONNX variant in ``routing.references`` (an INT8 variant's
    confidences are not FP32's); ``routing.reference`` is the package's (FP32's from convert,
    the tuned variant's from ``tune``). Returns ``({}, "")`` when there is none; a malformed one
    is a PackageError naming it.
    """
    r = routing_of(manifest)
    per = r.get("references")
    if per is not None and not isinstance(per, Mapping):
        raise PackageError(f"manifest '{manifest.name}': routing.references must be an object")
    if variant and per and variant in per:
        ref, where = per[variant], f"routing.references.{variant}"
    else:
        ref, where = r.get("reference"), "routing.reference"
    if not ref:
        return {}, ""
    try:
        if not isinstance(ref, Mapping):
            raise TypeError(where)
        h = np.asarray(ref.get("histogram"), dtype=np.float64)
        off = float(ref.get("offload", 0.0))
    except (TypeError, ValueError):
        h, off = np.zeros(0), math.nan
    if h.ndim != 1 or len(h) < 2 or not np.isfinite(h).all() or not 0.0 <= off <= 1.0:
        raise PackageError(
            f"manifest '{manifest.name}': {where} must be {{'histogram': [numbers], "
            f"'offload': a number in [0, 1]}}"
        )
    return dict(ref), where
