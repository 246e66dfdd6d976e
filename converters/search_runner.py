"""The two operations a quantization search repeats: make a candidate, and judge it.

``TrialQuantizer`` makes a variant for a ``Candidate``. Static candidates calibrate once per
calibration method (onnxruntime's ``quantize_static(calibration_cache_path=...)`` stores the
``TensorsData`` ranges as JSON and reuses them), so a trial that only changes per-channel,
activation symmetry or the nodes kept in float costs a quantizer pass, not a calibration run.
Calibration ranges do not depend on those settings: the calibrator records every tensor of the
quantizable op types whatever is later excluded.

``TrialEvaluator`` runs the FP32 reference once, then scores each variant with the converter's
own gate (``converters.validate``), so "passes the search" and "passes ``edgecloud convert``"
mean the same thing, and measures its latency with the same session settings as the reference.

``prepare`` builds the ``SearchContext`` both share (the search and ``inspect-quant``): the
checked model and data, the pre-processed FP32 graph, the task and the model's profile.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.data import ArrayCalibrationReader, Dataset, load_dataset
from converters.model import inspect_model, preprocess
from converters.quantize import (
    DynamicInt8Settings,
    StaticInt8Settings,
    calibration_cache_name,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from converters.search_space import Candidate, Family, model_profile
from converters.validate import (
    ComparisonMetrics,
    GateResult,
    Task,
    compare,
    gate,
    measure_latency,
    open_session,
    run_model,
    time_interleaved,
)
from edgecloud.errors import ConfigError

__all__ = [
    "Evaluation",
    "Int8Mode",
    "SearchContext",
    "TrialEvaluator",
    "TrialQuantizer",
    "prepare",
    "resolve_task",
]

Int8Mode = Literal["auto", "static", "dynamic"]


class TrialQuantizer:
    """Quantizes the pre-processed FP32 model ``src`` per candidate, sharing calibration."""

    def __init__(self, src: Path, reader: ArrayCalibrationReader, cache_dir: Path) -> None:
        self.src = Path(src)
        self.reader = reader
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.calibrations = 0  # calibration runs actually done (the rest were cache hits)

    def quantize(self, candidate: Candidate, dst: Path) -> Path:
        if candidate.family == "dynamic":
            assert isinstance(candidate.settings, DynamicInt8Settings)
            return self._dynamic(candidate.settings, dst)
        assert isinstance(candidate.settings, StaticInt8Settings)
        return self._static(candidate.settings, dst)

    def _dynamic(self, s: DynamicInt8Settings, dst: Path) -> Path:
        """The converter's own dynamic INT8 (exclusions reach Gemm nodes), kept quiet per trial."""
        with contextlib.redirect_stderr(io.StringIO()):
            return quantize_dynamic_int8(self.src, dst, s)

    def cache_path(self, s: StaticInt8Settings) -> Path:
        return self.cache_dir / calibration_cache_name(s)

    def _static(self, s: StaticInt8Settings, dst: Path) -> Path:
        """The converter's own static INT8 (``quantize_static_int8``), ranges cached per method."""
        done = quantize_static_int8(
            self.src, dst, self.reader, s, calibration_cache=self.cache_path(s), quiet=True
        )
        if done.calibrated:
            self.calibrations += 1
        return dst


@dataclass(frozen=True)
class Evaluation:
    """One variant's figures: the gate's verdict, its comparison metrics, speed and size."""

    gate: GateResult
    metrics: ComparisonMetrics
    latency_ms: float | None
    size: int
    #: speedup over FP32, from rounds interleaved with it (robust on a shared CPU)
    speedup: float | None = None

    @property
    def loss_pct(self) -> float:
        """The gate's drop (percent of the original's value; percent rel. L2 for regression)."""
        return float(self.gate.drop_pct)


class TrialEvaluator:
    """Scores variants against the FP32 reference on the validation data."""

    def __init__(
        self,
        reference: Path,
        val: Dataset,
        *,
        task: Task,
        tolerance_pct: float,
        score_output: str | None = None,
        threads: int = 1,
        latency_batch: int = 32,
        latency_runs: int = 20,
        latency_budget_s: float = 1.0,
        gated: tuple[str, ...] = (),
        roles: dict[str, str] | None = None,
    ) -> None:
        if tolerance_pct < 0:
            raise ConfigError(f"tolerance must be >= 0 (percent), got {tolerance_pct}")
        self.val = val
        self.task = task
        self.tolerance_pct = float(tolerance_pct)
        self.threads = threads
        self.latency_batch = latency_batch
        self.latency_runs = latency_runs
        self.latency_budget_s = latency_budget_s
        self.gated = gated
        self.roles = roles
        session = open_session(reference, threads=threads)
        self.reference_session = session
        first = session.get_inputs()[0].shape
        if first and isinstance(first[0], int):
            self.latency_batch = int(first[0])  # a fixed-batch model is timed at its batch
        names = [o.name for o in session.get_outputs()]
        self.score_output = score_output or names[0]
        if self.score_output not in names:
            raise ConfigError(f"score output {self.score_output!r} is not one of {names}")
        self.reference_outputs = run_model(session, val)
        self.reference_latency_ms = self._latency(session)
        data = Path(reference).with_name(Path(reference).name + ".data")
        self.reference_size = Path(reference).stat().st_size + (
            data.stat().st_size if data.is_file() else 0
        )
        ref = self.reference_outputs[self.score_output]
        self.reference_accuracy: float | None = None
        if val.labels is not None and task == "classification" and ref.ndim == 2:
            self.reference_accuracy = float((ref.argmax(1) == val.labels).mean())

    def _latency(self, session: Any) -> float | None:
        sample = self.val.take(self.latency_batch).inputs
        return measure_latency(
            session,
            sample,
            self.latency_batch,
            runs=self.latency_runs,
            budget_s=self.latency_budget_s,
        )

    def _interleaved(self, session: Any) -> tuple[float | None, float | None]:
        """The trial's latency and its speedup, timed in rounds alternating with FP32's."""
        sample = self.val.take(self.latency_batch).inputs
        t = time_interleaved(
            {"fp32": self.reference_session, "trial": session},
            sample,
            self.latency_batch,
            rounds=7,
            runs=2,
            budget_s=3.0 * self.latency_budget_s,
        ).get("trial")
        return (None, None) if t is None else (t.median_ms, t.speedup)

    def evaluate(self, path: Path, *, latency: bool = True) -> Evaluation:
        session = open_session(path, threads=self.threads)
        outputs = run_model(session, self.val)
        metrics = compare(
            self.reference_outputs,
            outputs,
            score_output=self.score_output,
            task=self.task,
            labels=self.val.labels if self.task == "classification" else None,
            gated=self.gated,
            roles=self.roles,
        )
        verdict = gate(metrics, self.task, self.tolerance_pct)
        lat, speedup = self._interleaved(session) if latency else (None, None)
        data = Path(path).with_name(Path(path).name + ".data")
        size = Path(path).stat().st_size + (data.stat().st_size if data.is_file() else 0)
        return Evaluation(verdict, metrics, lat, size, speedup)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||a||, the scale-free output error used to rank single-node sensitivity."""
    a64 = np.asarray(a, dtype=np.float64)
    n = float(np.linalg.norm(a64))
    return float(np.linalg.norm(a64 - np.asarray(b, dtype=np.float64)) / n) if n else 0.0


def dump_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON atomically (a half-written report is worse than none)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{time.monotonic_ns()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


_TASK_ALIASES = {
    "classification": "classification",
    "classifier": "classification",
    "embedding": "embedding",
    "embeddings": "embedding",
    "feature-extraction": "embedding",
    "sentence-similarity": "embedding",
    "regression": "regression",
    "detection": "detection",
    "object-detection": "detection",
    "segmentation": "regression",
}


@dataclass
class SearchContext:
    """What every trial shares: the pre-processed FP32 model, data, quantizer and evaluator."""

    source: Path
    fp32: Path
    task: Task
    profile: Literal["conv", "matmul"]
    families: tuple[Family, ...]
    quantizer: TrialQuantizer
    evaluator: TrialEvaluator
    work_dir: Path


def _model_task(path: Path) -> str | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for p in model.metadata_props:
        if p.key == "task":
            return str(p.value)
    return None


def resolve_task(task: str | None, model_path: Path) -> Task:
    """The gate's task: the argument, else the model's ``task`` metadata, else classification."""
    raw = task if task is not None else (_model_task(model_path) or "classification")
    key = _TASK_ALIASES.get(raw.lower())
    if key is None:
        raise ConfigError(
            f"task {raw!r} is not known; use classification, embedding, regression or detection "
            f"(or one of {sorted(_TASK_ALIASES)})"
        )
    return key  # type: ignore[return-value]


def prepare(
    model_path: Path,
    calib: Path | Dataset,
    val: Path | Dataset,
    *,
    work_dir: Path,
    task: str | None = None,
    tolerance_pct: float = 1.0,
    int8: Int8Mode = "auto",
    preprocessed: bool = False,
    score_output: str | None = None,
    threads: int = 1,
    calib_batch_size: int = 16,
    latency_batch: int = 32,
    gated: tuple[str, ...] = (),
    roles: dict[str, str] | None = None,
) -> SearchContext:
    """Check the model and data, pre-process, run the FP32 reference once."""
    model_path = Path(model_path)
    if int8 not in ("auto", "static", "dynamic"):
        raise ConfigError(f"--int8 {int8!r}: expected auto, static or dynamic")
    info = inspect_model(model_path, need_quant_opset=True)
    calib_ds = (
        calib
        if isinstance(calib, Dataset)
        else load_dataset(Path(calib), info.inputs, what="calibration data")
    )
    val_ds = (
        val
        if isinstance(val, Dataset)
        else load_dataset(Path(val), info.inputs, what="validation data")
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = model_path if preprocessed else preprocess(model_path, work_dir / "fp32.onnx")
    resolved = resolve_task(task, model_path)
    profile = model_profile(fp32)
    families: tuple[Family, ...]
    if int8 == "auto":
        families = ("static",) if profile == "conv" else ("dynamic", "static")
    else:
        families = (int8,)
    quantizer = TrialQuantizer(
        fp32, ArrayCalibrationReader(calib_ds, batch_size=calib_batch_size), work_dir / "calib"
    )
    evaluator = TrialEvaluator(
        fp32,
        val_ds,
        task=resolved,
        tolerance_pct=tolerance_pct,
        score_output=score_output,
        threads=threads,
        latency_batch=latency_batch,
        gated=gated,
        roles=roles,
    )
    return SearchContext(
        model_path, fp32, resolved, profile, families, quantizer, evaluator, work_dir
    )
