"""``ConversionContext``: what every variant builder of one conversion shares.

One object instead of a dozen parameters handed from function to function: the checked options,
the model and its data, the inferred roles, the pre-processed FP32 graph with its reference
outputs, the work folder, the calibration that static INT8 and every search share, and the
searches run so far. Builders (``converters.builders``, ``converters.trt_builder``) read it and
return ``VariantReport``s; only ``compare``/``evaluate`` judge a variant, so every variant is
judged by the same gate.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.data import ArrayCalibrationReader, Dataset
from converters.model import ModelInfo, preprocess
from converters.options import ConvertOptions
from converters.progress import Reporter
from converters.quantize import (
    QuantizeResult,
    StaticInt8Settings,
    calibration_cache_name,
    quantize_static_int8,
)
from converters.results import VariantReport
from converters.roles import Roles
from converters.search_result import SearchResult
from converters.validate import ComparisonMetrics, Task, compare, gate, open_session, run_model
from edgecloud.errors import ConversionError

__all__ = ["ConversionContext", "PriorTrial"]


@dataclass(frozen=True)
class PriorTrial:
    """Settings a variant already quantized and judged: a search does not try them again."""

    variant: str
    settings: dict[str, Any]
    passed: bool


@dataclass
class ConversionContext:
    opts: ConvertOptions
    reporter: Reporter
    info: ModelInfo
    val: Dataset
    calib: Dataset | None
    roles: Roles
    labels: tuple[str, ...]
    confidence: str
    meta: dict[str, str]
    work: Path
    out_dir: Path
    signing_key: Any
    warnings: list[str]
    #: the pre-processed FP32 graph and its outputs on ``val`` (set by ``prepare_reference``)
    fp32: Path = field(default_factory=Path)
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    #: variant name -> the accuracy search run for it
    searches: dict[str, SearchResult] = field(default_factory=dict)
    #: settings already judged by a variant (``int8_static``, ``int8_dynamic``)
    prior: list[PriorTrial] = field(default_factory=list)
    #: merged into the manifest's ``metadata`` (a convert-time step's record, e.g. calibration)
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    _reader: ArrayCalibrationReader | None = None

    @property
    def task(self) -> Task:
        return self.roles.task

    @property
    def score(self) -> str:
        return self.roles.score_output

    @property
    def eval_labels(self) -> np.ndarray | None:
        return self.val.labels if self.task == "classification" else None

    @property
    def calib_batch(self) -> int:
        """``--calib-batch``, capped at a fixed batch dimension (a batch-1-only model)."""
        fixed = [s.shape[0] for s in self.info.inputs if s.shape and isinstance(s.shape[0], int)]
        return min([self.opts.calib_batch, *fixed])

    @property
    def calib_used(self) -> Dataset | None:
        if self.calib is None:
            return None
        return self.calib.take(self.opts.calib_samples or len(self.calib))

    @property
    def calib_cache(self) -> Path:
        """Calibration ranges shared by the static variant and every search (one per method)."""
        path = self.work / "calibration"
        path.mkdir(exist_ok=True)
        return path

    def prepare_reference(self) -> None:
        """Pre-process the source model and run the FP32 reference on the validation data."""
        opts, rep = self.opts, self.reporter
        with rep.stage("pre-processing (shape inference, Conv+BN fusion)", 1) as adv:
            self.fp32 = preprocess(
                self.info.path,
                self.work / "fp32.onnx",
                optimize=opts.optimize,
                large=self.info.large,
            )
            adv(1)
        sess = open_session(self.fp32, threads=opts.threads)
        with rep.stage("validating fp32 (reference)", len(self.val)) as adv:
            self.reference = run_model(sess, self.val, on_batch=adv)

    def compare(self, outputs: dict[str, np.ndarray]) -> ComparisonMetrics:
        return compare(
            self.reference,
            outputs,
            score_output=self.score,
            task=self.task,
            labels=self.eval_labels,
            gated=self.roles.gated,
            roles=self.roles.output_roles,
        )

    def evaluate(
        self, name: str, path: Path, settings: dict[str, Any], *, precision: str
    ) -> VariantReport:
        """Run variant ``path`` on the validation data and judge it with the gate."""
        sess = open_session(path, threads=self.opts.threads)
        with self.reporter.stage(f"validating {name}", len(self.val)) as adv:
            outputs = run_model(sess, self.val, on_batch=adv)
        metrics = self.compare(outputs)
        return VariantReport(
            name=name,
            precision=precision,
            format="onnx",
            file=f"{name}.onnx",
            metrics=metrics,
            gate=gate(metrics, self.task, self.opts.tolerance),
            settings=settings,
        )

    def quantize_static(self, settings: StaticInt8Settings, dst: Path) -> QuantizeResult:
        """Static INT8 of the FP32 graph with the run's calibration data (ranges cached)."""
        if self.calib is None:
            raise ConversionError("static INT8 needs calibration data: --calib DATA")
        cache = self.calib_cache / calibration_cache_name(settings)
        if self._reader is not None:
            return quantize_static_int8(
                self.fp32, dst, self._reader, settings, calibration_cache=cache
            )
        total = min(len(self.calib), self.opts.calib_samples or len(self.calib))
        self._reader = ArrayCalibrationReader(
            self.calib, batch_size=self.calib_batch, limit=self.opts.calib_samples
        )
        with self.reporter.stage("calibrating int8 (static QDQ)", total) as adv:
            self._reader.on_batch = adv
            try:
                return quantize_static_int8(
                    self.fp32, dst, self._reader, settings, calibration_cache=cache
                )
            finally:
                self._reader.on_batch = None

    def search(
        self, family: Literal["auto", "static", "dynamic"], name: str, dst: Path
    ) -> dict[str, Any] | None:
        """Run the accuracy search for variant ``name``; its chosen (or best) file goes to dst.

        Settings a variant already judged (``prior``) are not tried again. Returns the
        variant's ``settings["search"]`` record, or ``None`` when nothing the search tried beat
        a variant that already passes with its settings (that variant is the answer); the whole
        result lands in ``searches``.
        """
        from converters.autotune import autotune

        opts = self.opts
        wd = self.work / f"search-{name}"
        (wd / "calib").mkdir(parents=True)
        for f in self.calib_cache.glob("*.json"):
            shutil.copyfile(f, wd / "calib" / f.name)
        result = autotune(
            self.fp32,
            self.calib_used or self.val,
            self.val,
            preprocessed=True,
            int8=family,
            tolerance=opts.tolerance,
            task=self.task,
            score_output=self.score,
            gated=self.roles.gated,
            roles=self.roles.output_roles,
            output=dst,
            budget=opts.search_budget,
            threads=opts.threads or 1,
            check=False,
            emit_best=True,
            exhaustive=opts.search_exhaustive,
            work_dir=wd,
            reporter=self.reporter,
            calib_batch_size=self.calib_batch,
            latency_batch=1,
            prior=tuple((p.settings, p.passed, p.variant) for p in self.prior),
        )
        result.model = self.info.path.name  # the user's model, not the pre-processed copy
        for f in (wd / "calib").glob("*.json"):
            if not (self.calib_cache / f.name).exists():
                shutil.copyfile(f, self.calib_cache / f.name)
        self.searches[name] = result
        if result.chosen is None and result.reused is not None:
            return None
        best = result.best
        if best is None or not dst.is_file():
            raise ConversionError(f"the INT8 search for {name} made no variant")
        return {
            "search": {
                "trials": len(result.trials),
                "passed": result.passed,
                "calibrations": result.calibrations,
                "seconds": round(result.seconds, 3),
                "chosen": best.to_dict(),
            }
        }
