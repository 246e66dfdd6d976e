"""The validation gate: run a variant against the original on validation data and judge it.

Shaped after Polygraphy's comparator: ``compare`` returns every figure (agreement, accuracy,
cosine, relative L2, max abs error, latency, size), and ``judge`` turns them into a ``GateResult``
that says which metric decided, the original's and the variant's value, by how much it dropped
relative to the original, what was allowed, and in words why a variant failed, so a refusal is
actionable and an accuracy search can rank candidates without parsing messages.

The metric: accuracy drop when the data has labels (classifiers), else top-1 agreement with the
original (classifiers), else cosine similarity (embeddings), else relative L2 error. The tolerance
is relative and in percent: 1.0 lets the metric drop by at most 1 % of the original's value (for
relative L2, whose ideal is 0, the error may reach 1 % of the output's norm).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.data import Dataset
from edgecloud.errors import ConversionError

__all__ = [
    "ComparisonMetrics",
    "GateResult",
    "Task",
    "compare",
    "gate",
    "judge",
    "judge_rel_l2",
    "measure_latency",
    "open_session",
    "run_model",
]

Task = Literal["classification", "embedding", "regression"]


@dataclass(frozen=True)
class ComparisonMetrics:
    """A variant's figures against the original (reference) on the same inputs."""

    samples: int
    top1_agreement: float | None
    accuracy: float | None
    reference_accuracy: float | None
    cosine: float
    rel_l2: float
    max_abs_error: float
    nonfinite: int

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict; ``reason`` explains a failure in one sentence."""

    passed: bool
    metric: str
    reference: float
    value: float
    drop_pct: float
    allowed_pct: float
    reason: str = ""
    failures: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_session(path: Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session; onnxruntime's errors become ConversionError."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionError(f"onnxruntime cannot load {path.name}: {exc}") from exc


def _batch_size(session: Any, want: int) -> int:
    dim0 = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return want if not isinstance(dim0, int) else dim0


def run_model(
    session: Any,
    data: Dataset,
    *,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run every sample through ``session``; outputs concatenated along the batch axis."""
    bs = _batch_size(session, batch_size)
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in data.batches(bs):
        try:
            outs = session.run(names, batch)
        except Exception as exc:
            raise ConversionError(f"inference failed on the validation data: {exc}") from exc
        for n, o in zip(names, outs, strict=True):
            chunks[n].append(np.asarray(o))
        if on_batch is not None:
            on_batch(int(next(iter(batch.values())).shape[0]))
    return {n: np.concatenate(c) for n, c in chunks.items()}


def compare(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    score_output: str,
    task: Task,
    labels: np.ndarray | None = None,
) -> ComparisonMetrics:
    """Figures of ``candidate`` against ``reference`` (both: output name -> array)."""
    missing = [k for k in reference if k not in candidate]
    if missing:
        raise ConversionError(f"the variant lacks output(s) {missing}")
    ref = np.asarray(reference[score_output], dtype=np.float64)
    got = np.asarray(candidate[score_output], dtype=np.float64)
    if ref.shape != got.shape:
        raise ConversionError(
            f"output '{score_output}': variant shape {list(got.shape)}, original {list(ref.shape)}"
        )
    nonfinite = int(sum(np.size(v) - np.isfinite(np.asarray(v)).sum() for v in candidate.values()))
    n = ref.shape[0] if ref.ndim else 1
    r2 = ref.reshape(n, -1)
    g2 = got.reshape(n, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dots = (r2 * g2).sum(axis=1)
        norms = np.linalg.norm(r2, axis=1) * np.linalg.norm(g2, axis=1)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
        ref_norm = float(np.linalg.norm(r2))
        rel_l2 = (
            float(np.linalg.norm(r2 - g2) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(g2))
        )
    max_abs = 0.0
    for k, v in reference.items() if not nonfinite else ():
        a = np.asarray(v, dtype=np.float64)
        b = np.asarray(candidate[k], dtype=np.float64)
        if a.shape == b.shape and a.size:
            max_abs = max(max_abs, float(np.max(np.abs(a - b))))
    agreement = accuracy = ref_accuracy = None
    if task == "classification" and r2.shape[1] >= 2:
        top_ref = r2.argmax(axis=1)
        top_got = g2.argmax(axis=1)
        agreement = float((top_ref == top_got).mean())
        if labels is not None:
            accuracy = float((top_got == labels).mean())
            ref_accuracy = float((top_ref == labels).mean())
    if nonfinite:
        cos = np.nan_to_num(cos, nan=0.0)
        rel_l2 = float("inf")
        max_abs = float("inf")
    return ComparisonMetrics(
        samples=int(n),
        top1_agreement=agreement,
        accuracy=accuracy,
        reference_accuracy=ref_accuracy,
        cosine=float(np.mean(cos)),
        rel_l2=rel_l2,
        max_abs_error=max_abs,
        nonfinite=nonfinite,
    )


def judge(m: ComparisonMetrics, tolerance_pct: float) -> GateResult:
    """Apply the gate's metric and relative tolerance (percent) to ``m``."""
    failures: list[str] = []
    if m.nonfinite:
        failures.append(f"the variant produced {m.nonfinite} NaN/Inf output values")
    if m.accuracy is not None and m.reference_accuracy is not None:
        metric, ref, val = "accuracy", m.reference_accuracy, m.accuracy
    elif m.top1_agreement is not None:
        metric, ref, val = "top1_agreement", 1.0, m.top1_agreement
    else:
        metric, ref, val = "cosine", 1.0, m.cosine
    drop_pct = 100.0 * (ref - val) / ref if ref > 0 else 0.0
    if drop_pct > tolerance_pct + 1e-9:
        failures.append(
            f"{metric} {val:.4f} vs original {ref:.4f}: dropped {drop_pct:.2f} % of the "
            f"original's value, more than the {tolerance_pct:g} % allowed "
            f"(by {drop_pct - tolerance_pct:.2f} percentage points)"
        )
    return GateResult(
        passed=not failures,
        metric=metric,
        reference=ref,
        value=val,
        drop_pct=drop_pct,
        allowed_pct=tolerance_pct,
        reason="; ".join(failures),
        failures=tuple(failures),
    )


def judge_rel_l2(m: ComparisonMetrics, tolerance_pct: float) -> GateResult:
    """The gate for plain regression outputs: relative L2 error at most ``tolerance_pct`` %."""
    err_pct = 100.0 * m.rel_l2
    failures = []
    if m.nonfinite:
        failures.append(f"the variant produced {m.nonfinite} NaN/Inf output values")
    if err_pct > tolerance_pct + 1e-9:
        failures.append(
            f"relative L2 error {err_pct:.3f} % of the output's norm, more than the "
            f"{tolerance_pct:g} % allowed (by {err_pct - tolerance_pct:.3f} points)"
        )
    return GateResult(
        passed=not failures,
        metric="rel_l2",
        reference=0.0,
        value=m.rel_l2,
        drop_pct=err_pct,
        allowed_pct=tolerance_pct,
        reason="; ".join(failures),
        failures=tuple(failures),
    )


def gate(m: ComparisonMetrics, task: Task, tolerance_pct: float) -> GateResult:
    """Pick the metric for ``task`` (see module docstring) and judge ``m`` with it."""
    if task == "regression":
        return judge_rel_l2(m, tolerance_pct)
    if task == "embedding":
        m = ComparisonMetrics(**{**asdict(m), "top1_agreement": None, "accuracy": None})
    return judge(m, tolerance_pct)


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
