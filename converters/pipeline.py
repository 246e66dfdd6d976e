"""``convert``: one source model in, a validated and signed model package out.

The order of work is chosen so that failures are cheap: options, the output folder, TensorRT's
presence, the model and the data are all checked before the first variant is built. All
intermediate files live in one temporary directory that is removed however the run ends, and the
package itself is written by ``write_package``, which renames a complete folder into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from converters.calibrate import calibrate_variants
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
from converters.roles import Roles, infer_roles
from converters.validate import (
    ComparisonMetrics,
    GateResult,
    Task,
    compare,
    gate,
    open_session,
    run_model,
    time_interleaved,
)
from edgecloud.errors import ConfigError, ConversionError, EdgeCloudError
from edgecloud.package import Manifest, Variant, load_private_key, write_package

if TYPE_CHECKING:
    from converters.autotune import SearchResult

__all__ = ["ConversionReport", "ConvertOptions", "VariantReport", "convert"]

log = logging.getLogger(__name__)

Verdict = Literal["reference", "accepted", "rejected", "kept-rejected", "failed", "dropped"]
#: an INT8 variant must be smaller than this fraction of FP32's size, or faster, to be shipped
NO_GAIN_SIZE = 0.9
NO_GAIN_SPEEDUP = 1.1
#: below this share of int8 weights an "int8" variant is a float model with extra conversions
MIN_QUANTIZED_FRACTION = 0.05
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
    #: calibration batch size; capped at a fixed batch dimension (a batch-1-only model)
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
    #: the output confidence and the gate's main metric read (default: inferred by role)
    score_output: str | None = None
    force: bool = False
    keep_rejected: bool = False
    latency_runs: int = 20
    threads: int | None = None
    warmup_samples: int = 8
    optimize: bool = True
    #: the accuracy search (``--int8 auto``, and static/dynamic variants that fail the gate)
    #: a total a user accepts for ``--int8 auto``: 20 trials or 2 minutes, whichever first
    search_budget: str = "20,120s"
    search_report: Path | None = None
    search_on_failure: bool = True
    search_exhaustive: bool = False
    #: fit a temperature on labelled validation data (converters/calibrate.py)
    calibrate: bool = True

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
        if self.calib_batch < 1:
            raise ConfigError(f"--calib-batch must be >= 1, got {self.calib_batch}")

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
    #: share of the weights of compute ops (Conv, MatMul, Gemm, LSTM, ...) stored as int8
    quantized_fraction: float | None = None
    #: min..max of the per-round batch-1 speedups (interleaved timing)
    speedup_b1_range: tuple[float, float] | None = None
    #: why a variant was not written ("failed": an error, "dropped": no gain)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized_fraction": self.quantized_fraction,
            "speedup_b1_range": self.speedup_b1_range,
            "error": self.error,
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
                    "speedup_b1_range": (
                        list(self.speedup_b1_range) if self.speedup_b1_range else None
                    ),
                    "size_ratio": self.size_ratio,
                    "quantized_fraction": self.quantized_fraction,
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
    #: the task and output roles inferred, with the reasons
    roles: dict[str, Any] = field(default_factory=dict)
    #: device kind -> {"variant": name, "why": reason}: what a device would load automatically
    device_choice: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(v.verdict not in ("rejected", "failed") for v in self.variants)

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
            "roles": self.roles,
            "device_choice": self.device_choice,
            "seconds": self.seconds,
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


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """An output folder that cannot be written is found now, not after all the work."""
    if out_dir.exists() and not force:
        raise ConfigError(f"output folder {out_dir} already exists; use --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    parent = out_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out_dir}: {parent} is not a folder")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".edgecloud-probe-", dir=parent))
        probe.rmdir()
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot write in {parent} ({exc.strerror})") from exc


def _absolute(opts: ConvertOptions) -> ConvertOptions:
    """Paths made absolute: the work runs with the temporary folder as working directory."""
    from dataclasses import replace

    def a(p: Path | None) -> Path | None:
        return None if p is None else Path(p).expanduser().absolute()

    return replace(
        opts,
        calib=a(opts.calib),
        val=a(opts.val),
        sign=a(opts.sign),
        search_report=a(opts.search_report),
        trt_timing_cache=a(opts.trt_timing_cache),
    )


@contextlib.contextmanager
def _contained(work: Path) -> Iterator[None]:
    """Run with ``work`` as the working directory and the temporary folder of this process.

    onnxruntime's tools write into the current directory (symbolic shape inference's
    ``sym_shape_infer_temp.onnx``) and into ``tempfile``'s folder (``ort.quant.*``); inside
    ``work`` they are removed with it however the conversion ends (also Ctrl-C).
    """
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    old_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        with contextlib.chdir(work):
            yield
    finally:
        tempfile.tempdir = old_tempdir


def convert(
    model_path: Path,
    out_dir: Path,
    options: ConvertOptions | None = None,
    *,
    reporter: Reporter | None = None,
) -> ConversionReport:
    """Convert ``model_path`` into a package at ``out_dir``; see docs/converters.md."""
    started = time.monotonic()
    opts = _absolute(options or ConvertOptions())
    rep = reporter or NullReporter()
    model_path = Path(model_path).expanduser().absolute()
    out_dir = Path(out_dir).expanduser().absolute()
    opts.check()
    _check_out_dir(out_dir, opts.force)
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
    roles = infer_roles(
        info,
        meta,
        task=opts.task,
        score_output=opts.score_output,
        has_labels=val.labels is not None,
        labels_given=bool(opts.labels),
        confidence=opts.confidence,
    )
    task, score = roles.task, roles.score_output
    labels = _labels(opts, meta)
    confidence = (
        opts.confidence
        or meta.get("confidence")
        or (
            ("probabilities" if roles.probabilities else "logits")
            if task in ("classification", "detection")
            else "none"
        )
    )
    if confidence not in ("logits", "probabilities", "none"):
        raise ConfigError(f"--confidence must be logits or probabilities, got {confidence!r}")
    if labels and task == "classification":
        n_classes = info.output(score).shape[-1]
        if isinstance(n_classes, int) and n_classes != len(labels):
            raise ConfigError(
                f"--labels has {len(labels)} labels, but output '{score}' has {n_classes} classes"
            )
    for name, was in info.rewritten_outputs:
        warnings.append(
            f"output '{name}' was a {was} (a list of {{class: probability}} maps); the package "
            "outputs the probability tensor it wraps instead"
        )
    eval_labels = val.labels if task == "classification" else None
    rep.note(f"task: {task} ({roles.task_reason}); score output '{score}' ({roles.score_reason})")

    work = Path(tempfile.mkdtemp(prefix="edgecloud-convert-"))
    try:
        with _contained(work):
            report = _run(
                opts,
                rep,
                info,
                calib,
                val,
                eval_labels,
                roles,
                labels,
                confidence,
                meta,
                work,
                out_dir,
                signing_key,
                warnings,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def _calib_batch(opts: ConvertOptions, info: ModelInfo) -> int:
    """``--calib-batch``, capped at a fixed batch dimension (a batch-1-only model)."""
    fixed = [s.shape[0] for s in info.inputs if s.shape and isinstance(s.shape[0], int)]
    return min([opts.calib_batch, *fixed])


def quantized_fraction(path: Path) -> float:
    """The share of weight elements of compute ops stored as 8-bit integers.

    Weights are what INT8 kernels read; a file whose big weights are still float runs float
    kernels, whatever its precision label says. Counts initializers of 16 elements or more (so
    scales and zero points do not count).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    small_int = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    q = f = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        if n < 16:
            continue
        if t.data_type in small_int:
            q += n
        elif t.data_type in floats:
            f += n
    return q / (q + f) if q + f else 0.0


def _run(
    opts: ConvertOptions,
    rep: Reporter,
    info: ModelInfo,
    calib: Dataset | None,
    val: Dataset,
    eval_labels: np.ndarray | None,
    roles: Roles,
    labels: tuple[str, ...],
    confidence: str,
    meta: dict[str, str],
    work: Path,
    out_dir: Path,
    signing_key: Any,
    warnings: list[str],
) -> ConversionReport:
    task, score = roles.task, roles.score_output
    with rep.stage("pre-processing (shape inference, Conv+BN fusion)", 1) as adv:
        fp32 = preprocess(info.path, work / "fp32.onnx", optimize=opts.optimize, large=info.large)
        adv(1)
    ref_sess = open_session(fp32, threads=opts.threads)
    with rep.stage("validating fp32 (reference)", len(val)) as adv:
        reference = run_model(ref_sess, val, on_batch=adv)
    del ref_sess

    def cmp(outputs: dict[str, np.ndarray]) -> ComparisonMetrics:
        return compare(
            reference,
            outputs,
            score_output=score,
            task=task,
            labels=eval_labels,
            gated=roles.gated,
            roles=roles.output_roles,
        )

    built: list[tuple[VariantReport, Path]] = []
    fp32_report = VariantReport(
        name="fp32",
        precision="fp32",
        format="onnx",
        file="fp32.onnx",
        metrics=cmp(reference),
        verdict="reference",
        settings={"preprocess": "quant_pre_process", "optimize": opts.optimize},
    )
    built.append((fp32_report, fp32))

    jobs: list[tuple[str, str, dict[str, Any]]] = []
    if opts.fp16:
        jobs.append(("fp16", "fp16", {"keep_io_types": True}))
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
    calib_batch = _calib_batch(opts, info)
    # Calibration ranges shared by the static variant and every search (one run per method).
    calib_cache = work / "calibration"
    calib_cache.mkdir()
    searches: dict[str, SearchResult] = {}
    reader: ArrayCalibrationReader | None = None

    def search(
        family: Literal["auto", "static", "dynamic"], name: str, dst: Path
    ) -> dict[str, Any]:
        """Run the accuracy search for variant ``name``; its chosen (or best) file goes to dst."""
        from converters.autotune import autotune

        wd = work / f"search-{name}"
        (wd / "calib").mkdir(parents=True)
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
            gated=roles.gated,
            roles=roles.output_roles,
            output=dst,
            budget=opts.search_budget,
            threads=opts.threads or 1,
            check=False,
            emit_best=True,
            exhaustive=opts.search_exhaustive,
            work_dir=wd,
            reporter=rep,
            calib_batch_size=calib_batch,
            latency_batch=1,
        )
        result.model = info.path.name  # the user's model, not the pre-processed copy
        for f in (wd / "calib").glob("*.json"):
            if not (calib_cache / f.name).exists():
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
        sess = open_session(path, threads=opts.threads)
        with rep.stage(f"validating {name}", len(val)) as adv:
            outputs = run_model(sess, val, on_batch=adv)
        metrics = cmp(outputs)
        return VariantReport(
            name=name,
            precision="int8" if name.startswith("int8") else name,
            format="onnx",
            file=f"{name}.onnx",
            metrics=metrics,
            gate=gate(metrics, task, opts.tolerance),
            settings=settings,
        )

    def build(name: str, settings: dict[str, Any]) -> tuple[VariantReport, Path]:
        nonlocal reader
        path = work / f"{name}.onnx"
        extra_warnings: list[str] = []
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
                reader = ArrayCalibrationReader(
                    calib, batch_size=calib_batch, limit=opts.calib_samples
                )
                with rep.stage("calibrating int8 (static QDQ)", total) as adv:
                    reader.on_batch = adv
                    done = quantize_static_int8(fp32, path, reader, static, calibration_cache=cache)
                reader.on_batch = None
            else:
                done = quantize_static_int8(fp32, path, reader, static, calibration_cache=cache)
            if done.nonfinite_nodes:
                settings = {**settings, "nonfinite_nodes_in_float": list(done.nonfinite_nodes)}
                extra_warnings.append(
                    f"{len(done.nonfinite_nodes)} node(s) around tensors with a non-finite "
                    "calibrated range (an attention mask's -inf) kept in float"
                )
        else:
            with rep.stage("quantizing int8 (dynamic)", 1) as adv:
                quantize_dynamic_int8(fp32, path, dynamic)
                adv(1)
        report = evaluate(name, path, settings)
        report.warnings += extra_warnings
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
        return report, path

    for name, precision, settings in jobs:
        try:
            built.append(build(name, settings))
        except (KeyboardInterrupt, ConfigError):
            raise  # a wrong option is the user's to fix, not one variant's failure
        except Exception as exc:  # one variant failing never loses the others
            why = str(exc) if isinstance(exc, EdgeCloudError) else f"{type(exc).__name__}: {exc}"
            log.debug("variant %s failed", name, exc_info=True)
            rep.note(f"[red]{name} failed[/red]: {why}")
            built.append(
                (
                    VariantReport(
                        name=name,
                        precision=precision,
                        format="onnx",
                        file=f"{name}.onnx",
                        verdict="failed",
                        settings=settings,
                        error=why,
                    ),
                    work / f"{name}.onnx",
                )
            )
    _write_search_report(opts.search_report, searches)
    _dedupe_auto(built)

    if opts.tensorrt:
        from converters.tensorrt import build_variants

        built += build_variants(
            opts, rep, info, work, built, val, reference, eval_labels, task, score, calib=calib
        )

    # Slim files (names, duplicated metadata) before sizes are taken for the report.
    fp32_size = 0
    for r, path in built:
        if r.verdict == "failed":
            continue
        if r.format == "onnx":
            slim_variant(path)
            if r.precision == "int8":
                r.quantized_fraction = quantized_fraction(path)
        r.size = _file_size(path)
        if r.name == "fp32":
            fp32_size = r.size
    _time_variants(built, val, opts, rep)
    for r, _ in built:
        if r.verdict == "failed":
            continue
        r.size_ratio = r.size / fp32_size if fp32_size else 1.0
        if r.metrics is not None and r.gate is None and r.verdict != "reference":
            r.gate = gate(r.metrics, task, opts.tolerance)
        if r.verdict == "accepted" and r.gate is not None and not r.gate.passed:
            r.verdict = "kept-rejected" if opts.keep_rejected else "rejected"
        if r.verdict != "reference":
            _warnings_for(r, info, fp32_report.latency_ms_b1, fp32_report.latency_ms_b32)
        _drop_if_no_gain(r)

    written = [(r, p) for r, p in built if r.written]
    routing = calibrate_variants(  # converters/calibrate.py: temperature, offload per variant
        written, val, eval_labels, score=score, confidence=confidence, enabled=opts.calibrate,
        threads=opts.threads, reporter=rep, warnings=warnings,
    )  # fmt: skip
    variable = any(r.metrics is not None and r.metrics.detection_f1 is not None for r, _ in built)
    files: dict[str, Path] = {}
    warmup: dict[str, Any] = {}
    if variable:
        warnings.append(
            "outputs vary in length (NMS): no warm-up comparison file; a device checks that one "
            "inference runs"
        )
    else:
        warm_path, warmup = _warmup(work, val, reference, written, opts, score)
        files[WARMUP_FILE] = warm_path
    variants = []
    for r, path in written:
        extra = dict(r.extra)
        extra["settings"] = r.settings
        if r.warnings:
            extra["warnings"] = list(r.warnings)
        if r.verdict == "kept-rejected":
            extra["rejected"] = True
            extra["rejected_reason"] = r.gate.reason if r.gate else ""
        if r.quantized_fraction is not None:
            extra["quantized_fraction"] = round(r.quantized_fraction, 4)
        target = "gpu" if r.format == "tensorrt" or r.precision == "fp16" else "cpu"
        data = path.with_name(path.name + ".data")
        if data.is_file():
            if path.name != r.file:  # the .data file is named after the model file
                path = _renamed(path, work / "package" / r.file)
                data = path.with_name(path.name + ".data")
            files[r.file + ".data"] = data
            extra["external_data"] = r.file + ".data"
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
        output_roles=roles.output_roles,
        labels=labels,
        source_sha256=info.sha256,
        warmup=warmup,
        routing=routing,
        metadata={
            "source_file": info.path.name,
            "source_opset": info.opset,
            "source_external_data": info.external_bytes > 0,
            "onnx_metadata": meta,
            "tolerance_pct": opts.tolerance,
            "task_inference": {"task": task, "reason": roles.task_reason},
            "score_output_inference": {"output": score, "reason": roles.score_reason},
            "gated_outputs": list(roles.gated),
            "validation": {
                "source": _file_name(val.source),
                "samples": len(val),
                "labels": eval_labels is not None,
            },
            "calibration": (
                {
                    "source": _file_name(calib.source),
                    "samples": min(len(calib), opts.calib_samples or len(calib)),
                    "method": opts.calib_method,
                    "batch": calib_batch,
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
        source=info.path.name,
        package=str(out_dir),
        task=task,
        tolerance=opts.tolerance,
        variants=[r for r, _ in built],
        manifest=final,
        warnings=warnings,
        searches=searches,
        roles=roles.to_dict(),
        device_choice=_device_choice(final),
    )


def _file_name(source: str) -> str:
    """The data's file name only: a manifest never records the converting machine's paths."""
    return Path(source).name if source else source


def _file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _renamed(path: Path, dst: Path) -> Path:
    import onnx

    from converters.model import save_model

    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(onnx.load(str(path)), dst, large=True)
    return dst


def _dedupe_auto(built: list[tuple[VariantReport, Path]]) -> None:
    """``int8_auto`` that chose exactly ``int8_static``'s (or dynamic's) settings is that file.

    Two variants with the same settings would be two files with different bytes (quantizer
    runs differ in names only) and two timings of the same thing; the auto variant is dropped
    and the report says which variant it is.
    """
    by_name = {r.name: (r, p) for r, p in built}
    auto = by_name.get("int8_auto")
    if auto is None or auto[0].verdict == "failed":
        return
    chosen = auto[0].settings.get("search", {}).get("chosen", {})
    for other in ("int8_static", "int8_dynamic"):
        o = by_name.get(other)
        if o is None or o[0].verdict == "failed" or "search" in o[0].settings:
            continue
        family = "static" if other == "int8_static" else "dynamic"
        same = chosen.get("family") == family and all(
            chosen.get("settings", {}).get(k) == v
            for k, v in o[0].settings.items()
            if k not in ("nonfinite_nodes_in_float",)
        )
        if same and not chosen.get("excluded_nodes"):
            auto[0].verdict = "dropped"
            auto[0].error = f"the search chose {other}'s settings: see {other}"
            return


def _time_variants(
    built: list[tuple[VariantReport, Path]], val: Dataset, opts: ConvertOptions, rep: Reporter
) -> None:
    """Interleaved batch-1 and batch-32 timing of every ONNX variant against FP32."""
    onnx_built = [(r, p) for r, p in built if r.format == "onnx" and r.verdict != "failed"]
    sessions = {r.name: open_session(p, threads=opts.threads) for r, p in onnx_built}
    rounds = max(5, opts.latency_runs)
    with rep.stage("timing variants (interleaved with fp32)", 2) as adv:
        b1 = time_interleaved(sessions, val.take(1).inputs, 1, rounds=rounds, runs=3)
        adv(1)
        b32 = time_interleaved(sessions, val.take(32).inputs, 32, rounds=max(3, rounds // 3))
        adv(1)
    for r, _ in onnx_built:
        t1, t32 = b1.get(r.name), b32.get(r.name)
        if t1 is not None:
            r.latency_ms_b1, r.speedup_b1 = t1.median_ms, t1.speedup
            r.speedup_b1_range = t1.speedup_range
        if t32 is not None:
            r.latency_ms_b32, r.speedup_b32 = t32.median_ms, t32.speedup


def _drop_if_no_gain(r: VariantReport) -> None:
    """An INT8 variant that is neither smaller nor faster than FP32 is not shipped."""
    if r.precision != "int8" or r.format != "onnx" or not r.written:
        return
    if r.quantized_fraction is not None and r.quantized_fraction == 0.0:
        r.verdict = "dropped"
        r.error = "nothing was quantized (0 % of the compute ops' weights are int8)"
        return
    if r.quantized_fraction is not None and r.quantized_fraction < MIN_QUANTIZED_FRACTION:
        r.verdict = "dropped"
        r.error = (
            f"only {100 * r.quantized_fraction:.1f} % of the compute ops' weights are int8: "
            "this is a float model with conversions, not an INT8 variant"
        )
        return
    smaller = r.size_ratio <= NO_GAIN_SIZE
    speeds = [x for x in (r.speedup_b1, r.speedup_b32) if x is not None]
    faster = any(x >= NO_GAIN_SPEEDUP for x in speeds)
    if not smaller and not faster:
        frac = "" if r.quantized_fraction is None else f", {100 * r.quantized_fraction:.1f} % int8"
        r.verdict = "dropped"
        r.error = (
            f"neither smaller ({100 * r.size_ratio:.1f} % of FP32's size{frac}) nor faster "
            f"({', '.join(f'{x:.2f}x' for x in speeds) or 'not timed'}) than FP32"
        )


def _device_choice(manifest: Manifest) -> dict[str, dict[str, str]]:
    from edgecloud.runtime.loader import explain_selection

    out = {}
    for kind, providers in (
        ("cpu", ["CPUExecutionProvider"]),
        ("gpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ):
        try:
            v, why = explain_selection(manifest, providers=providers, trt_ok=False)
        except EdgeCloudError as exc:
            out[kind] = {"variant": "", "why": str(exc)}
            continue
        out[kind] = {"variant": v.name, "why": why}
    return out


def _write_search_report(path: Path | None, searches: dict[str, SearchResult]) -> None:
    """``--search-report``: one search's JSON as ``python -m converters.autotune`` writes it
    (plus ``variant``), or ``{"searches": [...]}`` when several variants were searched."""
    if path is None or not searches:
        return
    from converters.search_runner import dump_json

    docs = [{"variant": name, **r.to_dict()} for name, r in searches.items()]
    dump_json(docs[0] if len(docs) == 1 else {"searches": docs}, Path(path))


def _warmup(
    work: Path,
    val: Dataset,
    reference: dict[str, np.ndarray],
    written: list[tuple[VariantReport, Path]],
    opts: ConvertOptions,
    score: str,
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
    agreements: list[float] = []
    rel_l2s: list[float] = []
    per_variant: dict[str, dict[str, float]] = {}
    for r, path in written:
        if r.format != "onnx" or r.verdict == "kept-rejected":
            continue
        outs = run_model(open_session(path, threads=opts.threads), sub)
        ref = np.asarray(ref_sub[score], dtype=np.float64).reshape(n, -1)
        got = np.asarray(outs[score], dtype=np.float64)
        if got.size != ref.size:
            continue
        got = got.reshape(n, -1)
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
