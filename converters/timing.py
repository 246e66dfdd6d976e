"""Latency of variants: one session alone (``measure_latency``) or several interleaved with FP32.

On a shared CPU a variant timed alone against an FP32 figure from a minute earlier is noise (a
byte-identical file measured at 0.87x and 1.13x); ``time_interleaved`` alternates the sessions in
rounds and reports each one's median speedup over FP32 and its spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from edgecloud.errors import ConversionError

__all__ = ["Timing", "measure_latency", "time_interleaved"]


def measure_latency(
    session: Any,
    sample: Mapping[str, np.ndarray],
    batch: int,
    *,
    runs: int = 20,
    budget_s: float = 3.0,
) -> float | None:
    """Median wall time in milliseconds of one ``run`` at ``batch`` (None: model has fixed batch).

    Bounded by ``runs`` and by ``budget_s`` seconds, so a slow model on a loaded machine cannot
    stall a conversion; two warm-up runs first (allocations, kernel selection).
    """
    first = session.get_inputs()[0].shape
    if first and isinstance(first[0], int) and first[0] != batch:
        return None
    feed = {}
    for k, v in sample.items():
        reps = int(np.ceil(batch / v.shape[0]))
        feed[k] = np.ascontiguousarray(np.concatenate([v] * reps)[:batch])
    try:
        for _ in range(2):
            session.run(None, feed)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < runs and (len(times) < 3 or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
    except Exception as exc:
        raise ConversionError(f"latency run at batch {batch} failed: {exc}") from exc
    return 1000.0 * statistics.median(times)


@dataclass(frozen=True)
class Timing:
    """Interleaved latency of one variant: median ms, and its speedup over the reference."""

    median_ms: float
    spread_ms: tuple[float, float]
    speedup: float | None = None
    #: interquartile range of the per-round speedups: what the noise allows it to be
    speedup_range: tuple[float, float] | None = None
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _feed(sample: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    feed = {}
    for k, v in sample.items():
        reps = int(np.ceil(batch / v.shape[0]))
        feed[k] = np.ascontiguousarray(np.concatenate([v] * reps)[:batch])
    return feed


def time_interleaved(
    sessions: Mapping[str, Any],
    sample: Mapping[str, np.ndarray],
    batch: int,
    *,
    reference: str = "fp32",
    rounds: int = 15,
    runs: int = 1,
    budget_s: float = 20.0,
) -> dict[str, Timing]:
    """Time every session at ``batch`` in alternating rounds; speedups against ``reference``.

    Each round runs every session ``runs`` times, in an order that rotates from round to round
    (after three warm-up runs each: arena allocation, kernel selection); a variant's speedup is
    the median over rounds of the reference's time divided by its own in the same round, so a
    load spike that hits one round moves one ratio, not the answer. The spread is the
    interquartile range of those ratios. Sessions whose first input has a fixed batch other
    than ``batch`` are left out. Bounded by ``budget_s`` (at least 3 rounds).
    """
    feed = _feed(sample, batch)
    usable = {}
    for name, sess in sessions.items():
        first = sess.get_inputs()[0].shape
        if first and isinstance(first[0], int) and first[0] != batch:
            continue
        try:
            for _ in range(3):
                sess.run(None, feed)
        except Exception as exc:
            raise ConversionError(f"{name}: latency run at batch {batch} failed: {exc}") from exc
        usable[name] = sess
    per_round: dict[str, list[float]] = {n: [] for n in usable}
    deadline = time.perf_counter() + budget_s
    items = list(usable.items())
    for r in range(rounds):
        if r >= 3 and time.perf_counter() > deadline:
            break
        k = r % max(1, len(items))
        for name, sess in items[k:] + items[:k]:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t0)
            per_round[name].append(1000.0 * statistics.median(times))
    out: dict[str, Timing] = {}
    ref = per_round.get(reference)
    for name, ms in per_round.items():
        if not ms:
            continue
        t = Timing(statistics.median(ms), _iqr(ms), rounds=len(ms))
        if ref and name != reference:
            ratios = [a / b for a, b in zip(ref, ms, strict=False) if b > 0]
            if ratios:
                t = replace(t, speedup=statistics.median(ratios), speedup_range=_iqr(ratios))
        out[name] = t
    return out


def _iqr(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return (min(xs), max(xs))
    q = statistics.quantiles(xs, n=4)
    return (q[0], q[2])
