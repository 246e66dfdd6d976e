"""The demo's measurements: drive the held-out digits through a client, sweep the threshold, plot.

What the demo prints (accuracy, offload rate, latency percentiles by path) and the PNG of the
threshold sweep are computed here from real runs of HybridClient; matplotlib is imported only
by _plot.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.errors import EdgeCloudError


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


@dataclass
class _Run:
    """What one pass of inputs through the client produced."""

    correct: int = 0
    total: int = 0
    sources: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    errors: int = 0
    latency: dict[str, list[float]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def offloaded(self) -> float:
        cloud = sum(n for s, n in self.sources.items() if s.startswith("cloud:"))
        return cloud / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "n": self.total,
            "offloaded": self.offloaded,
            "sources": dict(self.sources),
            "reasons": dict(self.reasons),
            "degraded": self.degraded,
            "errors": self.errors,
            "latency_ms": {
                k: {"p50": _pct(v, 50), "p95": _pct(v, 95), "n": len(v)}
                for k, v in sorted(self.latency.items())
            },
        }


def _drive(client: Any, xs: np.ndarray, ys: np.ndarray, *, mode: str | None = None) -> _Run:
    run = _Run()
    for x, y in zip(xs, ys, strict=True):
        t0 = time.perf_counter()
        try:
            r = client.infer({"input": x[None, :]}, mode=mode)
        except EdgeCloudError:
            run.errors += 1
            run.total += 1
            continue
        dt = time.perf_counter() - t0
        run.total += 1
        pred = int(np.argmax(r.outputs["logits"][0]))
        run.correct += int(pred == int(y))
        run.sources[r.source] += 1
        run.reasons[str(r.reason)] += 1
        run.degraded += int(r.degraded)
        run.latency.setdefault(r.source, []).append(dt)
    return run


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _sweep(
    edge_logits: np.ndarray, cloud_pred: np.ndarray, labels: np.ndarray
) -> list[dict[str, float]]:
    conf = _softmax(edge_logits.astype(np.float64)).max(axis=1)
    edge_pred = edge_logits.argmax(axis=1)
    rows = []
    for t in [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]:
        off = conf < t
        pred = np.where(off, cloud_pred, edge_pred)
        rows.append(
            {
                "threshold": t,
                "accuracy": float((pred == labels).mean()),
                "offloaded": float(off.mean()),
            }
        )
    return rows


def _plot(rows: list[dict[str, float]], edge_acc: float, cloud_acc: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [r["threshold"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax1.plot(
        t, [100 * r["accuracy"] for r in rows], "o-", color="tab:blue", label="hybrid accuracy"
    )
    ax1.axhline(100 * cloud_acc, color="tab:green", ls="--", label="cloud only")
    ax1.axhline(100 * edge_acc, color="tab:red", ls=":", label="edge only")
    ax1.set_xlabel("edge confidence threshold (max softmax probability)")
    ax1.set_ylabel("accuracy on held-out digits (%)")
    ax2 = ax1.twinx()
    ax2.plot(t, [100 * r["offloaded"] for r in rows], "s-", color="tab:orange", label="offloaded")
    ax2.set_ylabel("requests sent to the cloud (%)")
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    ax1.set_title("edgecloud demo: hybrid accuracy and offload vs threshold")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
