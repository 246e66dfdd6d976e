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
confidence histogram and offload rate the drift monitor compares against).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecloud.errors import ConfigError, InputError, PackageError
from edgecloud.routing.confidence import ConfidencePolicy, _ProbabilityPolicy

if TYPE_CHECKING:
    from edgecloud.package.manifest import Manifest

__all__ = [
    "HIST_BINS",
    "Curve",
    "Target",
    "TemperedConfidence",
    "VectorScaledConfidence",
    "apply_temperature",
    "conformal_threshold",
    "ece",
    "ece_of",
    "fit_temperature",
    "fit_vector",
    "hd_quantile",
    "histogram",
    "measure_scores",
    "nll",
    "parse_target",
    "pick",
    "pick_accuracy",
    "pick_offload",
    "routing_of",
    "selective_threshold",
    "softmax",
    "sweep",
    "tempered",
    "vector_confidence",
    "vector_probs",
]

#: Equal-width bins of the confidence histogram stored as the drift reference.
HIST_BINS = 10
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


# -- thresholds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Accuracy vs offload over a threshold sweep (rows offloaded when ``conf < threshold``)."""

    thresholds: np.ndarray
    offload: np.ndarray
    accuracy: np.ndarray
    edge_accuracy: float
    cloud_accuracy: float

    def at(self, t: float) -> tuple[float, float]:
        """(offload, accuracy) at the swept threshold closest to ``t``."""
        i = int(np.abs(self.thresholds - t).argmin())
        return float(self.offload[i]), float(self.accuracy[i])

    def to_dict(self, points: int = 41) -> dict[str, Any]:
        """A thinned copy for the manifest (at most ``points`` rows, the ends kept)."""
        idx = np.unique(np.linspace(0, len(self.thresholds) - 1, points).round().astype(int))
        return {
            "threshold": [round(float(v), 6) for v in self.thresholds[idx]],
            "offload": [round(float(v), 6) for v in self.offload[idx]],
            "accuracy": [round(float(v), 6) for v in self.accuracy[idx]],
            "edge_accuracy": round(self.edge_accuracy, 6),
            "cloud_accuracy": round(self.cloud_accuracy, 6),
        }


def hybrid(
    conf: np.ndarray, t: float, edge_ok: np.ndarray, cloud_ok: np.ndarray
) -> tuple[float, float]:
    """(accuracy, offload fraction) of the cascade at threshold ``t``."""
    off = np.asarray(conf) < t
    return float(np.where(off, cloud_ok, edge_ok).mean()), float(off.mean())


def sweep(
    conf: np.ndarray,
    edge_ok: np.ndarray,
    cloud_ok: np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> Curve:
    """The cascade's accuracy and offload at each threshold.

    Default thresholds: 0, the 201 quantiles of ``conf`` and just above 1, so over-confident
    scores bunched near 1 still give an evenly spaced curve in offload."""
    c = np.asarray(conf, dtype=np.float64)
    e = np.asarray(edge_ok, dtype=bool)
    k = np.asarray(cloud_ok, dtype=bool)
    if not c.shape == e.shape == k.shape or c.ndim != 1:
        raise ConfigError(f"sweep needs aligned 1-D arrays, got {c.shape}, {e.shape}, {k.shape}")
    if thresholds is None:
        q = np.quantile(c, np.linspace(0.0, 1.0, 201)) if len(c) else np.empty(0)
        ts = np.unique(np.concatenate([[0.0], q, [np.nextafter(1.0, 2.0)]]))
    else:
        ts = np.asarray(thresholds, np.float64)
    off = c[None, :] < ts[:, None]
    acc = np.where(off, k[None, :], e[None, :]).mean(axis=1)
    return Curve(ts, off.mean(axis=1), acc, float(e.mean()), float(k.mean()))


def hd_quantile(values: np.ndarray, q: float) -> float:
    """Harrell-Davis estimate of the ``q``-quantile of ``values``.

    A weighted mean of *every* order statistic, weights from Beta((n+1)q, (n+1)(1-q)) over the
    n cells of [0, 1] (integrated on a fine midpoint grid: numpy only). Where the confidence
    has gaps between neighbouring rows, one order statistic jumps across them from sample to
    sample; the weighted mean does not, so a threshold from it varies less between samples.
    """
    s = np.sort(np.asarray(values, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise ConfigError("a quantile needs at least one value")
    if n == 1 or n > 200_000:  # one row; or so many that one order statistic is as good
        return float(np.quantile(s, q))
    a, b = q * (n + 1), (1.0 - q) * (n + 1)
    k = max(4, math.ceil(4000 / n))  # sub-cells per order statistic
    x = (np.arange(n * k) + 0.5) / (n * k)
    lp = (a - 1.0) * np.log(x) + (b - 1.0) * np.log1p(-x)
    w = np.exp(lp - lp.max()).reshape(n, k).sum(axis=1)
    return float(w @ s / w.sum())


def pick_offload(conf: np.ndarray, max_offload: float) -> float:
    """A threshold offloading about ``max_offload`` of new rows, and at most that of these.

    The threshold is the Harrell-Davis estimate of the ``max_offload``-quantile of ``conf``
    (``hd_quantile``), so the expected offload on new rows is the target (not below it by
    up to 1/(n+1), as the k-th order statistic with k = floor(X (n+1)) is), with less spread
    from one sample of rows to the next. It is capped at the (floor(X n)+1)-th smallest
    confidence, so on these rows at most X are offloaded. The remaining spread on a held-out
    set is sampling noise of order sqrt(X(1-X)(1/n + 1/m)); docs/benchmarks.md measures it.
    """
    if not 0.0 <= max_offload <= 1.0:
        raise ConfigError(f"offload target must be a fraction in [0, 1], got {max_offload!r}")
    c = np.sort(np.asarray(conf, dtype=np.float64))
    if max_offload >= 1.0:
        return 1.0
    if max_offload * (len(c) + 1) < 1.0 - 1e-9:
        return 0.0  # fewer than one row in expectation: nothing is offloaded
    m = math.floor(max_offload * len(c) + 1e-9)
    t = hd_quantile(c, max_offload)
    return float(min(t, c[m])) if m < len(c) else t  # rows strictly below c[m] number <= m


def pick_accuracy(
    conf: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, within: float
) -> float:
    """The least-offload threshold whose hybrid accuracy is within ``within`` of cloud-only.

    Candidates are the observed confidences (the offload changes only there), so the result is
    exact on these rows; a held-out split may land a little either side.
    """
    if not 0.0 <= within <= 1.0:
        raise ConfigError(f"accuracy target must be a fraction in [0, 1], got {within!r}")
    c = np.asarray(conf, dtype=np.float64)
    cands = np.concatenate([[0.0], np.unique(c), [np.nextafter(1.0, 2.0)]])
    curve = sweep(c, edge_ok, cloud_ok, cands)
    ok = curve.accuracy >= curve.cloud_accuracy - within - 1e-12
    return float(min(cands[ok].min(), 1.0)) if ok.any() else 1.0


def conformal_threshold(conf: np.ndarray, edge_ok: np.ndarray, alpha: float) -> float:
    """Split-conformal threshold: ``P(edge answers and is wrong) <= alpha`` (module docstring).

    Nonconformity of a calibration row: its confidence when the edge is wrong, -inf when right.
    ``q`` is the ceil((n+1)(1-alpha))-th smallest; the edge answers only above ``q``.
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    c = np.asarray(conf, dtype=np.float64)
    e = np.asarray(edge_ok, dtype=bool)
    n = len(c)
    k = math.ceil((n + 1) * (1.0 - alpha))
    if k > n:
        return float(np.nextafter(1.0, 2.0))  # too few rows for this alpha: offload everything
    scores = np.sort(np.where(e, -np.inf, c))
    q = scores[k - 1]
    if q == -np.inf:
        return 0.0
    return float(np.nextafter(q, np.inf))


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (k is small here: the errors)."""
    if k >= n:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]  # fmt: skip
    m = max(terms)
    return float(min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms)))


def selective_threshold(
    conf: np.ndarray, edge_ok: np.ndarray, alpha: float, delta: float = 0.1, grid: int = 200
) -> float:
    """Learn-then-Test threshold: w.p. >= 1-delta, ``P(wrong | edge answers) <= alpha``.

    Thresholds are tested from the strictest down (fixed-sequence testing needs no multiplicity
    correction); H0 "selective error > alpha" is rejected at ``t`` when the binomial tail of the
    errors seen among the answered rows is <= delta. The lowest threshold reached is returned.
    """
    if not 0.0 < alpha < 1.0 or not 0.0 < delta < 1.0:
        raise ConfigError(f"alpha and delta must be in (0, 1), got {alpha!r}, {delta!r}")
    c = np.asarray(conf, dtype=np.float64)
    e = np.asarray(edge_ok, dtype=bool)
    cands = np.unique(np.quantile(c, np.linspace(1.0, 0.0, grid + 1)))[::-1]
    best = float(np.nextafter(1.0, 2.0))
    for t in cands:
        answered = c >= t
        n = int(answered.sum())
        if n == 0:
            continue
        errors = int((~e[answered]).sum())
        if _binom_cdf(errors, n, alpha) > delta:
            break
        best = float(t)
    return best


@dataclass(frozen=True)
class Target:
    """One routing target: ``kind`` in offload|accuracy|conformal|selective and its value."""

    kind: str
    value: float
    delta: float = 0.1

    def describe(self) -> str:
        if self.kind == "offload":
            return f"at most {self.value:.1%} offloaded"
        if self.kind == "accuracy":
            return f"within {self.value * 100:.2g} points of cloud-only accuracy"
        if self.kind == "conformal":
            return (
                f"P(edge answers wrongly) <= {self.value:g} (split conformal, marginal: "
                f"coverage >= {1 - self.value:g})"
            )
        return (
            f"P(edge correct | edge answers) >= {1 - self.value:g} with probability "
            f">= {1 - self.delta:g} (Learn-then-Test)"
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "value": self.value, "text": self.describe()}
        if self.kind == "selective":
            d["delta"] = self.delta
        return d


_KINDS = ("offload", "accuracy", "conformal", "selective")


def parse_target(text: str) -> Target:
    """``offload=0.2``, ``accuracy=0.5pt`` / ``accuracy=0.005``, ``conformal=0.05``,
    ``selective=0.02`` (optionally ``,delta=0.1``). Percent signs and ``pt`` are understood."""
    head, _, rest = text.partition(",")
    kind, sep, raw = head.partition("=")
    kind = kind.strip()
    if not sep or kind not in _KINDS:
        raise ConfigError(f"target {text!r}: expected KIND=VALUE with KIND one of {list(_KINDS)}")
    raw = raw.strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1]) / 100
        elif raw.endswith("pt"):
            value = float(raw[:-2]) / 100
        else:
            value = float(raw)
    except ValueError:
        raise ConfigError(f"target {text!r}: {raw!r} is not a number") from None
    delta = 0.1
    if rest:
        k, _, v = rest.partition("=")
        if k.strip() != "delta":
            raise ConfigError(f"target {text!r}: unknown option {k.strip()!r} (only delta=)")
        try:
            delta = float(v)
        except ValueError:
            raise ConfigError(f"target {text!r}: delta {v!r} is not a number") from None
    lo_ok = value >= 0.0 if kind in ("offload", "accuracy") else value > 0.0
    if not (lo_ok and value <= 1.0) or not 0.0 < delta < 1.0:
        raise ConfigError(f"target {text!r}: value must be a fraction in [0, 1]")
    return Target(kind, value, delta)


def pick(target: Target, conf: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray) -> float:
    """The threshold that meets ``target`` on these rows."""
    if target.kind == "offload":
        return pick_offload(conf, target.value)
    if target.kind == "accuracy":
        return pick_accuracy(conf, edge_ok, cloud_ok, target.value)
    if target.kind == "conformal":
        return conformal_threshold(conf, edge_ok, target.value)
    return selective_threshold(conf, edge_ok, target.value, target.delta)


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


def _vector_of(manifest: Manifest, r: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    if r.get("method") != "vector":
        return None
    v = r.get("vector")
    try:
        scale = np.asarray(v["scale"], dtype=np.float64)  # type: ignore[index]
        bias = np.asarray(v["bias"], dtype=np.float64)  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise PackageError(
            f"manifest '{manifest.name}': routing.method is 'vector' but routing.vector is not "
            "{'scale': [numbers], 'bias': [numbers]}"
        ) from None
    if scale.ndim != 1 or scale.shape != bias.shape or not np.isfinite([scale, bias]).all():
        raise PackageError(
            f"manifest '{manifest.name}': routing.vector scale and bias must be finite lists of "
            f"one number per class, got {scale.shape} and {bias.shape}"
        )
    return scale, bias


def tempered(policy: ConfidencePolicy, manifest: Manifest) -> ConfidencePolicy:
    """``policy`` reading ``softmax(logits / T)`` when the manifest carries a temperature.

    With ``routing.method = "vector"`` a max-probability policy reads the vector-scaled
    probability of the returned label instead; other measures keep the scalar temperature."""
    r = routing_of(manifest)
    vec = _vector_of(manifest, r)
    if (
        vec is not None
        and manifest.confidence != "none"
        and type(policy).__name__ == ("MaxProbability")
    ):
        return VectorScaledConfidence(
            policy.output or manifest.score_output,
            *vec,
            from_probabilities=manifest.confidence == "probabilities",
        )
    t = float(r.get("temperature", 1.0))
    if t == 1.0 or manifest.confidence == "none":
        return policy
    if manifest.confidence == "probabilities" and isinstance(policy, _ProbabilityPolicy):
        policy = type(policy)(policy.output or manifest.score_output, "logits")
        return TemperedConfidence(policy, t, from_probabilities=True)
    return TemperedConfidence(policy, t)


class TemperedConfidence(ConfidencePolicy):
    """Scores ``softmax(logits / T)`` with an inner policy; the outputs themselves stay raw.

    Only the score output is divided (a copy of one small array per request); the caller gets
    the model's own outputs back, so calibration changes the routing decision and nothing else.
    """

    def __init__(
        self, inner: ConfidencePolicy, temperature: float, *, from_probabilities: bool = False
    ) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.inner = inner
        self.output = inner.output
        self.temperature = float(temperature)
        self.from_probabilities = from_probabilities

    def _scaled(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            x = outputs[self.output]  # type: ignore[index]
        except KeyError:
            raise InputError(
                f"confidence output '{self.output}' is not among the outputs {sorted(outputs)}"
            ) from None
        if self.from_probabilities:
            x = np.log(np.clip(x, 1e-12, 1.0))
        return {self.output: x / self.temperature}  # type: ignore[dict-item]

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.inner(self._scaled(outputs))

    def lowest(self, outputs: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray | None]:
        return self.inner.lowest(self._scaled(outputs))

    def __repr__(self) -> str:
        return f"TemperedConfidence({self.inner!r}, T={self.temperature:.4g})"


class VectorScaledConfidence(ConfidencePolicy):
    """The vector-scaled probability of the label the model returned (its own arg-max).

    Vector scaling may move the arg-max; the caller still gets the model's outputs, so the
    confidence must describe *that* label, not the rescaled one."""

    def __init__(
        self, output: str, scale: np.ndarray, bias: np.ndarray, *, from_probabilities: bool = False
    ) -> None:
        self.output = output
        self.scale = np.asarray(scale, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        self.from_probabilities = from_probabilities

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.asarray(self._scores(outputs), dtype=np.float64)
        if x.shape[1] != len(self.scale):
            raise InputError(
                f"confidence output '{self.output}' has {x.shape[1]} classes, the manifest's "
                f"vector scaling {len(self.scale)}"
            )
        if self.from_probabilities:
            x = np.log(np.clip(x, 1e-12, 1.0))
        return vector_confidence(x, self.scale, self.bias)

    def __repr__(self) -> str:
        return f"VectorScaledConfidence({self.output!r}, classes={len(self.scale)})"
