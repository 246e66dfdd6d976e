"""Thresholds chosen from targets: the sweep, and one rule per target of ``edgecloud tune``.

The targets and their guarantees are described in ``edgecloud.calibration``'s docstring, which
re-exports everything here; this module holds the arithmetic on confidences, correctness flags
and quantiles, with numpy only (the device imports it through calibration).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecloud.errors import ConfigError

__all__ = [
    "Curve",
    "Target",
    "conformal_threshold",
    "hd_quantile",
    "hybrid",
    "parse_target",
    "pick",
    "pick_accuracy",
    "pick_offload",
    "selective_threshold",
    "sweep",
]


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
