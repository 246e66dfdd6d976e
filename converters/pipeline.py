"""``convert``: one source model in, a validated and signed model package out.

The order of work is chosen so that failures are cheap: options, the output folder, TensorRT's
presence, the model and the data are all checked before the first variant is built. All
intermediate files live in one temporary directory that is removed however the run ends, and the
package itself is written by ``write_package``, which renames a complete folder into place.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from converters.data import ArrayCalibrationReader, Dataset, load_dataset
from converters.model import ModelInfo, inspect_model, preprocess, slim_variant
from converters.progress import NullReporter, Reporter
from converters.quantize import (
    CalibMethod,
    DynamicInt8Settings,
    StaticInt8Settings,
    calibration_cache_name,
    convert_fp16,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from converters.validate import (
    ComparisonMetrics,
    GateResult,
    Task,
    compare,
    gate,
    measure_latency,
    open_session,
    run_model,
)
from edgecloud.errors import ConfigError, ConversionError
from edgecloud.package import Manifest, Variant, load_private_key, write_package

if TYPE_CHECKING:
    from converters.autotune import SearchResult

__all__ = ["ConversionReport", "ConvertOptions", "VariantReport", "convert"]

log = logging.getLogger(__name__)

Verdict = Literal["reference", "accepted", "rejected", "kept-rejected"]
#: a variant is called slower than FP32 only beyond this ratio: timings on a shared CPU are noisy
SLOWER_MARGIN = 1.10
WARMUP_FILE = "warmup.npz"


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``edgecloud convert`` can be told; the CLI maps flags one to one onto these."""

    name: str | None = None
    version: str = "1"
    fp16: bool = False
    int8: tuple[Literal["static", "dynamic", "auto"], ...] = ()
    calib: Path | None = None
    calib_method: CalibMethod = "minmax"
    calib_samples: int | None = None
    calib_batch: int = 16
    #: per-channel weight scales; ``None``: the family's default (static yes, dynamic no)
    per_channel: bool | None = None
    activation_type: Literal["int8", "uint8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool = False
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    tensorrt: bool = False
    trt_batch: tuple[int, int, int] = (1, 8, 32)
    trt_dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    trt_timing_cache: Path | None = None
    trt_hardware_compat: str = "none"
    trt_workspace_mb: int = 2048
    val: Path | None = None
    tolerance: float = 1.0
    sign: Path | None = None
    labels: tuple[str, ...] | None = None
    confidence: Literal["logits", "probabilities", "none"] | None = None
    task: Task | None = None
    force: bool = False
    keep_rejected: bool = False
    latency_runs: int = 20
    threads: int | None = None
    warmup_samples: int = 8
    optimize: bool = True
    #: the accuracy search (``--int8 auto``, and static/dynamic variants that fail the gate)
    search_budget: str = "20"
    search_report: Path | None = None
    search_on_failure: bool = True
    search_exhaustive: bool = False

    def check(self) -> None:
        bad = [m for m in self.int8 if m not in ("static", "dynamic", "auto")]
        if bad:
            raise ConfigError(f"--int8 must be 'static', 'dynamic' or 'auto', got {bad}")
        for mode in ("static", "auto"):
            if mode in self.int8 and self.calib is None:
                raise ConfigError(f"--int8 {mode} needs calibration data: --calib DATA")
        if self.searches:
            from converters.search_space import parse_budget

            parse_budget(self.search_budget)  # a bad budget fails now, not after the first variant
        if self.tolerance < 0:
            raise ConfigError(f"--tolerance must be >= 0 (percent), got {self.tolerance}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.calib_method not in ("minmax", "entropy", "percentile"):
            raise ConfigError(
                f"--calib-method must be minmax, entropy or percentile, got {self.calib_method!r}"
            )
        if self.val is None and self.calib is None:
            raise ConfigError(
                "edgecloud convert needs validation data to check variants and to write the "
                "warm-up file: --val DATA (or at least --calib DATA)"
            )
        if self.warmup_samples < 1:
            raise ConfigError(f"warmup_samples must be >= 1, got {self.warmup_samples}")

    @property
    def searches(self) -> bool:
        """Whether this run may start an accuracy search at all."""
        return "auto" in self.int8 or (self.search_on_failure and bool(self.int8))


@dataclass
class VariantReport:
    """One row of the summary: what was built, how it compared, and what happened to it."""

    name: str
    precision: str
    format: str
    file: str
    size: int = 0
    size_ratio: float = 1.0
    metrics: ComparisonMetrics | None = None
    gate: GateResult | None = None
    latency_ms_b1: float | None = None
    latency_ms_b32: float | None = None
    speedup_b1: float | None = None
    speedup_b32: float | None = None
    warnings: list[str] = field(default_factory=list)
    verdict: Verdict = "accepted"
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "format": self.format,
            "file": self.file,
            "size": self.size,
            "size_ratio": self.size_ratio,
            "metrics": self.metrics.to_dict() if self.metrics else None,
            "gate": self.gate.to_dict() if self.gate else None,
            "latency_ms_b1": self.latency_ms_b1,
            "latency_ms_b32": self.latency_ms_b32,
            "speedup_b1": self.speedup_b1,
            "speedup_b32": self.speedup_b32,
            "warnings": list(self.warnings),
            "verdict": self.verdict,
            "settings": self.settings,
            "extra": self.extra,
        }

    def manifest_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.metrics.to_dict() if self.metrics else {})
        out.update(
            {
                k: v
                for k, v in {
                    "latency_ms_b1": self.latency_ms_b1,
                    "latency_ms_b32": self.latency_ms_b32,
                    "speedup_b1": self.speedup_b1,
                    "speedup_b32": self.speedup_b32,
                    "size_ratio": self.size_ratio,
                }.items()
                if v is not None
            }
        )
        if self.gate is not None:
            out["gate"] = self.gate.to_dict()
        return out

    @property
    def written(self) -> bool:
        return self.verdict in ("reference", "accepted", "kept-rejected")


@dataclass
class ConversionReport:
    """What ``convert`` did; ``ok`` is False when a variant was refused by the gate."""

    source: str
    package: str | None
    task: str
    tolerance: float
    variants: list[VariantReport]
    manifest: Manifest | None = None
    warnings: list[str] = field(default_factory=list)
    #: variant name -> the accuracy search run for it (``--int8 auto`` or after a gate failure)
    searches: dict[str, SearchResult] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v.verdict != "rejected" for v in self.variants)

    @property
    def rejected(self) -> list[VariantReport]:
        return [v for v in self.variants if v.verdict in ("rejected", "kept-rejected")]

    def variant(self, name: str) -> VariantReport:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source": self.source,
            "package": self.package,
            "task": self.task,
            "tolerance_pct": self.tolerance,
            "variants": [v.to_dict() for v in self.variants],
            "warnings": list(self.warnings),
            "manifest": self.manifest.to_dict() if self.manifest else None,
            "searches": {name: r.to_dict() for name, r in self.searches.items()},
        }


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"
    return name[:128]


def _source_metadata(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if model.doc_string:
        meta["doc_string"] = model.doc_string
    return meta


def _decide_task(
    opts: ConvertOptions, meta: dict[str, str], data: Dataset, info: ModelInfo, score: str
) -> Task:
    if opts.task is not None:
        return opts.task
    if meta.get("task") in ("classification", "embedding", "regression"):
        return meta["task"]  # type: ignore[return-value]
    out = next(o for o in info.outputs if o.name == score)
    two_d = len(out.shape) == 2
    if two_d and (data.labels is not None or opts.labels or opts.confidence not in (None, "none")):
        return "classification"
    return "regression"


def _labels(opts: ConvertOptions, meta: dict[str, str]) -> tuple[str, ...]:
    if opts.labels is not None:
        return tuple(opts.labels)
    raw = meta.get("labels")
    if raw:
        try:
            val = json.loads(raw)
            if isinstance(val, list):
                return tuple(str(x) for x in val)
        except json.JSONDecodeError:
            return tuple(x.strip() for x in raw.split(",") if x.strip())
    return ()


def _warnings_for(
    report: VariantReport, info: ModelInfo, ref_b1: float | None, ref_b32: float | None
) -> None:
    if report.name == "int8_dynamic" and info.op_types & {"Conv", "ConvTranspose"}:
        report.warnings.append(
            "dynamic INT8 quantizes Conv to ConvInteger, which onnxruntime runs far slower than "
            "FP32 on CPUs; use --int8 static for convolutional models"
        )
    cpu_timed = report.format == "onnx"  # engines are timed on the GPU: not comparable
    for batch, ref, got in (
        (1, ref_b1 if cpu_timed else None, report.latency_ms_b1),
        (32, ref_b32 if cpu_timed else None, report.latency_ms_b32),
    ):
        if ref and got and got > ref * SLOWER_MARGIN:
            report.warnings.append(
                f"runs slower than FP32 on this CPU at batch {batch}: {got:.3f} ms vs "
                f"{ref:.3f} ms ({ref / got:.2f}x)"
            )
    if report.precision == "fp16" and report.format == "onnx":
        report.warnings.append(
            "FP16 ONNX is meant for GPUs (CUDA/TensorRT execution providers); on CPU "
            "onnxruntime inserts casts and it is usually not faster than FP32"
        )


def convert(
    model_path: Path,
    out_dir: Path,
    options: ConvertOptions | None = None,
    *,
    reporter: Reporter | None = None,
) -> ConversionReport:
    """Convert ``model_path`` into a package at ``out_dir``; see docs/converters.md."""
    opts = options or ConvertOptions()
    rep = reporter or NullReporter()
    model_path = Path(model_path)
    out_dir = Path(out_dir)
    opts.check()
    if out_dir.exists() and not opts.force:
        raise ConfigError(f"output folder {out_dir} already exists; use --force to replace it")
    if opts.tensorrt:
        from converters.tensorrt import check_tensorrt

        check_tensorrt()  # before any other work: a missing TensorRT or GPU fails in a second
    signing_key = load_private_key(opts.sign) if opts.sign is not None else None
    info = inspect_model(model_path, need_quant_opset=bool(opts.int8))
    calib = (
        load_dataset(opts.calib, info.inputs, what="calibration data")
        if opts.calib is not None
        else None
    )
    val = (
        load_dataset(opts.val, info.inputs, what="validation data")
        if opts.val is not None
        else None
    )
    warnings: list[str] = []
    if val is None:
        assert calib is not None
        val = calib
        warnings.append(
            "no --val data: variants were validated on the calibration data, which flatters "
            "INT8 variants; pass held-out data with --val"
        )
    meta = _source_metadata(model_path)
    score = info.outputs[0].name
    task = _decide_task(opts, meta, val, info, score)
    labels = _labels(opts, meta)
    confidence = (
        opts.confidence
        or meta.get("confidence")
        or ("logits" if task == "classification" else "none")
    )
    if confidence not in ("logits", "probabilities", "none"):
        raise ConfigError(f"--confidence must be logits or probabilities, got {confidence!r}")
    if labels and task == "classification":
        n_classes = next(o for o in info.outputs if o.name == score).shape[-1]
        if isinstance(n_classes, int) and n_classes != len(labels):
            raise ConfigError(
                f"--labels has {len(labels)} labels, but output '{score}' has {n_classes} classes"
            )
    eval_labels = val.labels if task == "classification" else None

    work = Path(tempfile.mkdtemp(prefix="edgecloud-convert-"))
    try:
        return _run(
            opts,
            rep,
            info,
            calib,
            val,
            eval_labels,
            task,
            labels,
            confidence,
            meta,
            score,
            work,
            out_dir,
            signing_key,
            warnings,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    opts: ConvertOptions,
    rep: Reporter,
    info: ModelInfo,
    calib: Dataset | None,
    val: Dataset,
    eval_labels: np.ndarray | None,
    task: Task,
    labels: tuple[str, ...],
    confidence: str,
    meta: dict[str, str],
    score: str,
    work: Path,
    out_dir: Path,
    signing_key: Any,
    warnings: list[str],
) -> ConversionReport:
    with rep.stage("pre-processing (shape inference, Conv+BN fusion)", 1) as adv:
        fp32 = preprocess(info.path, work / "fp32.onnx", optimize=opts.optimize)
        adv(1)
    ref_sess = open_session(fp32, threads=opts.threads)
    with rep.stage("validating fp32 (reference)", len(val)) as adv:
        reference = run_model(ref_sess, val, on_batch=adv)
    one = val.take(1).inputs
    many = val.take(32).inputs
    ref_b1 = measure_latency(ref_sess, one, 1, runs=opts.latency_runs)
    ref_b32 = measure_latency(ref_sess, many, 32, runs=max(3, opts.latency_runs // 3))
    ref_metrics = compare(reference, reference, score_output=score, task=task, labels=eval_labels)
    built: list[tuple[VariantReport, Path]] = []
    fp32_report = VariantReport(
        name="fp32",
        precision="fp32",
        format="onnx",
        file="fp32.onnx",
        metrics=ref_metrics,
        latency_ms_b1=ref_b1,
        latency_ms_b32=ref_b32,
        verdict="reference",
        settings={"preprocess": "quant_pre_process", "optimize": opts.optimize},
    )
    built.append((fp32_report, fp32))

    jobs: list[tuple[str, str, dict[str, Any]]] = []
    if opts.fp16:
        jobs.append(("fp16", "fp16", {"keep_io_types": True}))
    reader: ArrayCalibrationReader | None = None
    static = StaticInt8Settings(
        calib_method=opts.calib_method,
        per_channel=opts.per_channel is not False,
        activation_type=opts.activation_type,
        weight_type=opts.weight_type,
        reduce_range=opts.reduce_range,
        exclude_nodes=opts.exclude_nodes,
        exclude_ops=opts.exclude_ops,
    )
    dynamic = DynamicInt8Settings(
        per_channel=opts.per_channel is True,
        weight_type=opts.weight_type,
        reduce_range=opts.reduce_range,
        exclude_nodes=opts.exclude_nodes,
        exclude_ops=opts.exclude_ops,
    )
    if "static" in opts.int8:
        jobs.append(("int8_static", "int8", static.describe()))
    if "dynamic" in opts.int8:
        jobs.append(("int8_dynamic", "int8", dynamic.describe()))
    if "auto" in opts.int8:
        jobs.append(("int8_auto", "int8", {}))
    calib_used = calib.take(opts.calib_samples or len(calib)) if calib is not None else None
    # Calibration ranges shared by the static variant and every search (one run per method).
    calib_cache = work / "calibration"
    calib_cache.mkdir()
    searches: dict[str, SearchResult] = {}

    def search(
        family: Literal["auto", "static", "dynamic"], name: str, dst: Path
    ) -> dict[str, Any]:
        """Run the accuracy search for variant ``name``; its chosen (or best) file goes to dst."""
        from converters.autotune import autotune

        wd = work / f"search-{name}"
        (wd / "calib").mkdir(parents=True)
        if opts.calib_batch == 16:  # the search calibrates in batches of 16 too
            for f in calib_cache.glob("*.json"):
                shutil.copyfile(f, wd / "calib" / f.name)
        result = autotune(
            fp32,
            calib_used or val,
            val,
            preprocessed=True,
            int8=family,
            tolerance=opts.tolerance,
            task=task,
            score_output=score,
            output=dst,
            budget=opts.search_budget,
            threads=opts.threads or 1,
            check=False,
            emit_best=True,
            exhaustive=opts.search_exhaustive,
            work_dir=wd,
            reporter=rep,
        )
        result.model = str(info.path)  # the user's model, not the pre-processed copy
        for f in (wd / "calib").glob("*.json"):
            if opts.calib_batch == 16 and not (calib_cache / f.name).exists():
                shutil.copyfile(f, calib_cache / f.name)
        searches[name] = result
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

    def evaluate(name: str, path: Path, settings: dict[str, Any]) -> VariantReport:
        return _evaluate(
            name,
            "int8" if name.startswith("int8") else name,
            path,
            settings,
            opts,
            rep,
            val,
            reference,
            eval_labels,
            task,
            score,
            ref_b1,
            ref_b32,
            info,
        )

    for name, _precision, settings in jobs:
        path = work / f"{name}.onnx"
        if name == "fp16":
            with rep.stage("converting to fp16", 1) as adv:
                convert_fp16(fp32, path)
                adv(1)
        elif name == "int8_auto":
            settings = search("auto", name, path)
        elif name == "int8_static":
            assert calib is not None
            cache = calib_cache / calibration_cache_name(static)
            if reader is None:
                total = min(len(calib), opts.calib_samples or len(calib))
                with rep.stage("calibrating int8 (static QDQ)", total) as adv:
                    reader = ArrayCalibrationReader(
                        calib,
                        batch_size=opts.calib_batch,
                        limit=opts.calib_samples,
                        on_batch=adv,
                    )
                    quantize_static_int8(fp32, path, reader, static, calibration_cache=cache)
                reader.on_batch = None
            else:
                quantize_static_int8(fp32, path, reader, static, calibration_cache=cache)
        else:
            with rep.stage("quantizing int8 (dynamic)", 1) as adv:
                quantize_dynamic_int8(fp32, path, dynamic)
                adv(1)
        report = evaluate(name, path, settings)
        failed = report.gate is not None and not report.gate.passed
        if name == "int8_auto" and not searches[name].passed:
            report.warnings.append(searches[name].failure_message())
        elif failed and opts.search_on_failure and name in ("int8_static", "int8_dynamic"):
            family: Literal["static", "dynamic"] = "static" if name == "int8_static" else "dynamic"
            why = report.gate.reason if report.gate else ""
            rep.note(f"[yellow]{name}[/yellow] failed the gate ({why}); searching {family} INT8")
            found_path = work / f"{name}.searched.onnx"
            found = search(family, name, found_path)
            again = evaluate(name, found_path, {"requested": settings, **found})
            if again.gate is not None and (
                again.gate.passed
                or report.gate is None
                or again.gate.drop_pct < report.gate.drop_pct
            ):
                report, path = again, found_path
            if not searches[name].passed:
                report.warnings.append(searches[name].failure_message())
        built.append((report, path))
    _write_search_report(opts.search_report, searches)

    if opts.tensorrt:
        from converters.tensorrt import build_variants

        built += build_variants(
            opts, rep, info, work, built, val, reference, eval_labels, task, score, calib=calib
        )

    # Slim files (names, duplicated metadata) before sizes are taken for the report.
    fp32_size = 0
    for r, path in built:
        if r.format == "onnx":
            slim_variant(path)
        r.size = path.stat().st_size
        if r.name == "fp32":
            fp32_size = r.size
    for r, _ in built:
        r.size_ratio = r.size / fp32_size if fp32_size else 1.0
        if r.metrics is not None and r.gate is None and r.verdict != "reference":
            r.gate = gate(r.metrics, task, opts.tolerance)
        if r.verdict == "accepted" and r.gate is not None and not r.gate.passed:
            r.verdict = "kept-rejected" if opts.keep_rejected else "rejected"
        if r.verdict != "reference":
            _warnings_for(r, info, ref_b1, ref_b32)
        for w in r.warnings:
            rep.note(f"[yellow]{r.name}[/yellow]: {w}")
        if r.verdict in ("rejected", "kept-rejected") and r.gate is not None:
            rep.note(f"[red]{r.name} refused[/red]: {r.gate.reason}")

    written = [(r, p) for r, p in built if r.written]
    warm_path, warmup = _warmup(work, val, reference, written, opts, info)
    variants = []
    files: dict[str, Path] = {WARMUP_FILE: warm_path}
    for r, path in written:
        extra = dict(r.extra)
        extra["settings"] = r.settings
        if r.warnings:
            extra["warnings"] = list(r.warnings)
        if r.verdict == "kept-rejected":
            extra["rejected"] = True
            extra["rejected_reason"] = r.gate.reason if r.gate else ""
        target = "gpu" if r.format == "tensorrt" or r.precision == "fp16" else "cpu"
        variants.append(
            Variant(
                name=r.name,
                file=r.file,
                format=r.format,  # type: ignore[arg-type]
                precision=r.precision,
                target=target,
                size=r.size,
                sha256="",
                metrics=r.manifest_metrics(),
                extra=extra,
            )
        )
        files[r.file] = path
    manifest = Manifest(
        name=_safe_name(opts.name or info.path.stem),
        version=opts.version,
        inputs=info.inputs,
        outputs=info.outputs,
        variants=tuple(variants),
        task=task,
        confidence=confidence,  # type: ignore[arg-type]
        confidence_output=score,
        labels=labels,
        source_sha256=info.sha256,
        warmup=warmup,
        metadata={
            "source_file": info.path.name,
            "source_opset": info.opset,
            "onnx_metadata": meta,
            "tolerance_pct": opts.tolerance,
            "validation": {
                "source": val.source,
                "samples": len(val),
                "labels": eval_labels is not None,
            },
            "calibration": (
                {
                    "source": calib.source,
                    "samples": min(len(calib), opts.calib_samples or len(calib)),
                    "method": opts.calib_method,
                }
                if calib is not None and {"static", "auto"} & set(opts.int8)
                else None
            ),
            "converter": "edgecloud convert",
        },
    )
    with rep.stage("writing package", 1) as adv:
        final = write_package(out_dir, manifest, files, signing_key=signing_key, force=opts.force)
        adv(1)
    return ConversionReport(
        source=str(info.path),
        package=str(out_dir),
        task=task,
        tolerance=opts.tolerance,
        variants=[r for r, _ in built],
        manifest=final,
        warnings=warnings,
        searches=searches,
    )


def _write_search_report(path: Path | None, searches: dict[str, SearchResult]) -> None:
    """``--search-report``: one search's JSON as ``python -m converters.autotune`` writes it
    (plus ``variant``), or ``{"searches": [...]}`` when several variants were searched."""
    if path is None or not searches:
        return
    from converters.search_runner import dump_json

    docs = [{"variant": name, **r.to_dict()} for name, r in searches.items()]
    dump_json(docs[0] if len(docs) == 1 else {"searches": docs}, Path(path))


def _evaluate(
    name: str,
    precision: str,
    path: Path,
    settings: dict[str, Any],
    opts: ConvertOptions,
    rep: Reporter,
    val: Dataset,
    reference: dict[str, np.ndarray],
    eval_labels: np.ndarray | None,
    task: Task,
    score: str,
    ref_b1: float | None,
    ref_b32: float | None,
    info: ModelInfo,
) -> VariantReport:
    """Run one ONNX variant through the gate (metrics, verdict, latency)."""
    sess = open_session(path, threads=opts.threads)
    with rep.stage(f"validating {name}", len(val)) as adv:
        outputs = run_model(sess, val, on_batch=adv)
    metrics = compare(reference, outputs, score_output=score, task=task, labels=eval_labels)
    verdict = gate(metrics, task, opts.tolerance)
    b1 = measure_latency(sess, val.take(1).inputs, 1, runs=opts.latency_runs)
    b32 = measure_latency(sess, val.take(32).inputs, 32, runs=max(3, opts.latency_runs // 3))
    return VariantReport(
        name=name,
        precision=precision,
        format="onnx",
        file=f"{name}.onnx",
        metrics=metrics,
        gate=verdict,
        latency_ms_b1=b1,
        latency_ms_b32=b32,
        speedup_b1=(ref_b1 / b1) if ref_b1 and b1 else None,
        speedup_b32=(ref_b32 / b32) if ref_b32 and b32 else None,
        settings=settings,
    )


def _warmup(
    work: Path,
    val: Dataset,
    reference: dict[str, np.ndarray],
    written: list[tuple[VariantReport, Path]],
    opts: ConvertOptions,
    info: ModelInfo,
) -> tuple[Path, dict[str, Any]]:
    """The warm-up file and the rule a device applies to it (docs/package.md, "Warm-up").

    The thresholds come from what every accepted ONNX variant achieved on these very samples, with
    slack for a device's different CPU/GPU kernels: one flipped top-1 is tolerated, and the
    relative L2 error may be twice the worst seen (never below 1e-3).
    """
    n = min(opts.warmup_samples, len(val))
    sub = val.take(n)
    ref_sub = {k: v[:n] for k, v in reference.items()}
    arrays: dict[str, np.ndarray] = {f"input.{k}": v for k, v in sub.inputs.items()}
    arrays.update({f"output.{k}": v for k, v in ref_sub.items()})
    score = info.outputs[0].name
    agreements: list[float] = []
    rel_l2s: list[float] = []
    per_variant: dict[str, dict[str, float]] = {}
    for r, path in written:
        if r.format != "onnx" or r.verdict == "kept-rejected":
            continue
        outs = run_model(open_session(path, threads=opts.threads), sub)
        ref = np.asarray(ref_sub[score], dtype=np.float64).reshape(n, -1)
        got = np.asarray(outs[score], dtype=np.float64).reshape(n, -1)
        norm = float(np.linalg.norm(ref))
        rel = float(np.linalg.norm(ref - got) / norm) if norm else float(np.linalg.norm(got))
        entry = {"rel_l2": rel}
        rel_l2s.append(rel)
        if ref.shape[1] >= 2:
            agree = float((ref.argmax(1) == got.argmax(1)).mean())
            agreements.append(agree)
            entry["top1_agreement"] = agree
        per_variant[r.name] = entry
    path = work / WARMUP_FILE
    np.savez(path, **arrays)  # type: ignore[arg-type]
    warmup: dict[str, Any] = {
        "file": WARMUP_FILE,
        "samples": n,
        "inputs": [f"input.{k}" for k in sub.inputs],
        "outputs": [f"output.{k}" for k in ref_sub],
        "compare_output": score,
        "max_rel_l2": max(1e-3, 2.0 * max(rel_l2s, default=0.0)),
        "per_variant": per_variant,
    }
    if agreements:
        warmup["min_top1_agreement"] = max(0.0, min(agreements) - 1.0 / n)
    return path, warmup
