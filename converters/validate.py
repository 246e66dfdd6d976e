"""The validation gate: run a variant against the original on validation data and judge it.

Shaped after Polygraphy's comparator: ``compare`` returns every figure (agreement, accuracy,
cosine, relative L2, max abs error, latency, size), and ``judge`` turns them into a ``GateResult``
that says which metric decided, the original's and the variant's value, by how much it dropped
relative to the original, what was allowed, and in words why a variant failed, so a refusal is
actionable and an accuracy search can rank candidates without parsing messages.

The metric fits the task: accuracy drop when the data has labels (classifiers), else top-1
agreement with the original (classifiers), mean cosine similarity (embeddings), for detectors the
scores' and the boxes' cosine when their shapes are fixed, or the F1 of matched detections (same
label, IoU >= 0.5) when NMS makes their number vary, else relative L2 error (regression). Every
gated output is checked, not only the first. The tolerance is relative and in percent: 1.0 lets
the metric drop by at most 1 % of the original's value (for relative L2, whose ideal is 0, the
error may reach 1 % of the output's norm).

Latency is timed interleaved (``time_interleaved``): every variant and the FP32 reference run in
alternating rounds, so a load spike on a shared machine hits them all alike, and each speedup is
the median of per-round ratios with its spread (min..max), which is what a device may trust.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.data import Dataset
from converters.timing import Timing, measure_latency, time_interleaved
from edgecloud.errors import ConversionError

__all__ = [
    "ComparisonMetrics",
    "GateResult",
    "Task",
    "Timing",
    "compare",
    "gate",
    "judge",
    "judge_rel_l2",
    "measure_latency",
    "open_session",
    "run_model",
    "time_interleaved",
]

Task = Literal["classification", "embedding", "regression", "detection"]
TASKS: tuple[str, ...] = ("classification", "embedding", "regression", "detection")


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
    #: other gated outputs (a detector's boxes): name -> {"cosine": .., "rel_l2": ..}
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    #: detectors with a variable number of detections: F1 of matched detections
    detection_f1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}


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
            chunks[n].append(np.atleast_1d(np.asarray(o)))
        if on_batch is not None:
            on_batch(int(next(iter(batch.values())).shape[0]))
    out = Outputs({n: np.concatenate(c) for n, c in chunks.items()})
    out.splits = {n: [len(x) for x in c] for n, c in chunks.items()}
    return out


class Outputs(dict[str, np.ndarray]):
    """Output name -> outputs of all samples; ``splits``: rows each batch gave (NMS varies)."""

    splits: dict[str, list[int]]


def _pieces(arrs: Mapping[str, np.ndarray], name: str) -> list[np.ndarray]:
    splits = getattr(arrs, "splits", {}).get(name)
    a = np.asarray(arrs[name])
    if not splits:
        return [a]
    return np.split(a, np.cumsum(splits)[:-1])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes [n,4] x [m,4] (x1, y1, x2, y2)."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def detection_f1(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    scores: str,
    boxes: str,
    labels: str | None,
) -> float:
    """F1 of the candidate's detections against the reference's, per batch, greedy by score.

    A reference detection is matched by an unmatched candidate one with the same label (when
    the model outputs labels) and IoU >= 0.5. No detections on both sides counts as a match.
    """
    matched = n_ref = n_got = 0
    rb, gb = _pieces(reference, boxes), _pieces(candidate, boxes)
    rs = _pieces(reference, scores)
    rl = _pieces(reference, labels) if labels else [None] * len(rb)
    gl = _pieces(candidate, labels) if labels else [None] * len(gb)
    if len(rb) != len(gb):
        return 0.0
    for i in range(len(rb)):
        a = np.asarray(rb[i], dtype=np.float64).reshape(-1, 4)
        b = np.asarray(gb[i], dtype=np.float64).reshape(-1, 4)
        n_ref += len(a)
        n_got += len(b)
        if not len(a) or not len(b):
            continue
        iou = _iou(a, b)
        if rl[i] is not None and gl[i] is not None:
            same = np.asarray(rl[i]).reshape(-1)[:, None] == np.asarray(gl[i]).reshape(-1)[None]
            iou = np.where(same, iou, 0.0)
        used = np.zeros(len(b), dtype=bool)
        order = np.argsort(-np.asarray(rs[i], dtype=np.float64).reshape(-1)[: len(a)])
        for j in order:
            cand = np.where(~used & (iou[j] >= 0.5))[0]
            if len(cand):
                k = cand[np.argmax(iou[j, cand])]
                used[k] = True
                matched += 1
    if n_ref + n_got == 0:
        return 1.0
    return 2.0 * matched / (n_ref + n_got)


def _cos_rel(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    n = ref.shape[0] if ref.ndim else 1
    r2 = np.asarray(ref, dtype=np.float64).reshape(n, -1)
    g2 = np.asarray(got, dtype=np.float64).reshape(n, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dots = (r2 * g2).sum(axis=1)
        norms = np.linalg.norm(r2, axis=1) * np.linalg.norm(g2, axis=1)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
        rn = float(np.linalg.norm(r2))
        rel = float(np.linalg.norm(r2 - g2) / rn) if rn > 0 else float(np.linalg.norm(g2))
    return float(np.mean(np.nan_to_num(cos, nan=0.0))), rel


def compare(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    score_output: str,
    task: Task,
    labels: np.ndarray | None = None,
    gated: tuple[str, ...] = (),
    roles: Mapping[str, str] | None = None,
) -> ComparisonMetrics:
    """Figures of ``candidate`` against ``reference`` (both: output name -> array).

    ``gated``: more outputs to compare besides ``score_output`` (a detector's boxes);
    ``roles``: output name -> role, for a detector whose outputs vary in length (NMS).
    """
    missing = [k for k in reference if k not in candidate]
    if missing:
        raise ConversionError(f"the variant lacks output(s) {missing}")
    ref = np.asarray(reference[score_output], dtype=np.float64)
    got = np.asarray(candidate[score_output], dtype=np.float64)
    nonfinite = int(
        sum(
            np.size(v) - np.isfinite(np.asarray(v, dtype=np.float64)).sum()
            for v in candidate.values()
        )
    )
    roles = roles or {}
    boxes = next((k for k, r in roles.items() if r == "boxes"), None)
    # boxes as a list of detections ([K, 4], K varying with NMS) rather than per anchor
    listed = task == "detection" and boxes is not None and np.ndim(reference[boxes]) == 2
    if ref.shape != got.shape or listed:
        if not listed or boxes is None:
            raise ConversionError(
                f"output '{score_output}': variant shape {list(got.shape)}, original "
                f"{list(ref.shape)}"
            )
        # a variable number of detections (NMS): match them instead
        f1 = detection_f1(
            reference,
            candidate,
            scores=score_output,
            boxes=boxes,
            labels=next((k for k, r in roles.items() if r == "labels"), None),
        )
        return ComparisonMetrics(
            samples=len(_pieces(reference, boxes)),
            top1_agreement=None,
            accuracy=None,
            reference_accuracy=None,
            cosine=0.0,
            rel_l2=float("nan"),
            max_abs_error=float("nan"),
            nonfinite=nonfinite,
            detection_f1=f1,
        )
    others: dict[str, dict[str, float]] = {}
    for name in gated:
        if name == score_output:
            continue
        a, b = np.asarray(reference[name]), np.asarray(candidate[name])
        if a.shape != b.shape:
            others[name] = {"cosine": 0.0, "rel_l2": float("inf")}
            continue
        c, r = _cos_rel(a, b)
        others[name] = {"cosine": c, "rel_l2": r}
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
    for k in (score_output, *gated) if not nonfinite else ():
        a = np.asarray(reference[k], dtype=np.float64)
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
        outputs=others,
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
    elif m.detection_f1 is not None:
        metric, ref, val = "detection_f1", 1.0, m.detection_f1
    else:
        metric, ref, val = "cosine", 1.0, m.cosine
    drop_pct = 100.0 * (ref - val) / ref if ref > 0 else 0.0
    if drop_pct > tolerance_pct + 1e-9:
        failures.append(
            f"{metric} {val:.4f} vs original {ref:.4f}: dropped {drop_pct:.2f} % of the "
            f"original's value, more than the {tolerance_pct:g} % allowed "
            f"(by {drop_pct - tolerance_pct:.2f} percentage points)"
        )
    for name, figs in m.outputs.items():
        drop = 100.0 * (1.0 - figs["cosine"])
        if drop > tolerance_pct + 1e-9:
            failures.append(
                f"output '{name}': cosine {figs['cosine']:.4f} to the original dropped "
                f"{drop:.2f} %, more than the {tolerance_pct:g} % allowed"
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
    if task in ("embedding", "detection"):
        m = replace(m, top1_agreement=None, accuracy=None)
    return judge(m, tolerance_pct)
