"""Judging the built variants: sizes, interleaved timing, the gate's verdict, no-gain drops.

Runs once every builder is done, so that all variants are timed in the same rounds against FP32
(on a shared CPU a variant timed alone is noise) and every verdict is taken with every figure.
"""

from __future__ import annotations

from pathlib import Path

from converters.context import ConversionContext
from converters.data import Dataset
from converters.model import ModelInfo, slim_variant
from converters.options import ConvertOptions
from converters.progress import Reporter
from converters.results import VariantReport
from converters.validate import gate, open_session, time_interleaved

__all__ = ["file_size", "judge_variants", "quantized_fraction"]

#: an INT8 variant must be smaller than this fraction of FP32's size, or faster, to be shipped
NO_GAIN_SIZE = 0.9
NO_GAIN_SPEEDUP = 1.1
#: below this share of int8 weights an "int8" variant is a float model with extra conversions
MIN_QUANTIZED_FRACTION = 0.05
#: a variant is called slower than FP32 only beyond this ratio: timings on a shared CPU are noisy
SLOWER_MARGIN = 1.10


def judge_variants(ctx: ConversionContext, built: list[tuple[VariantReport, Path]]) -> None:
    """Fill in sizes, latencies and final verdicts of ``built`` (the FP32 reference first)."""
    opts = ctx.opts
    # Slim files (names, duplicated metadata) before sizes are taken for the report.
    fp32_size = 0
    for r, path in built:
        if r.verdict in ("failed", "dropped"):
            continue  # no file: nothing to slim, size or time
        if r.format == "onnx":
            slim_variant(path)
            if r.precision == "int8":
                r.quantized_fraction = quantized_fraction(path)
        r.size = file_size(path)
        if r.name == "fp32":
            fp32_size = r.size
    _time_variants(built, ctx.val, opts, ctx.reporter)
    fp32_report = built[0][0]
    for r, _ in built:
        if r.verdict in ("failed", "dropped"):
            continue
        r.size_ratio = r.size / fp32_size if fp32_size else 1.0
        if r.metrics is not None and r.gate is None and r.verdict != "reference":
            r.gate = gate(r.metrics, ctx.task, opts.tolerance)
        if r.verdict == "accepted" and r.gate is not None and not r.gate.passed:
            r.verdict = "kept-rejected" if opts.keep_rejected else "rejected"
        if r.verdict != "reference":
            _warnings_for(r, ctx.info, fp32_report.latency_ms_b1, fp32_report.latency_ms_b32)
        _drop_if_no_gain(r)


def file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


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


def _time_variants(
    built: list[tuple[VariantReport, Path]], val: Dataset, opts: ConvertOptions, rep: Reporter
) -> None:
    """Interleaved batch-1 and batch-32 timing of every ONNX variant against FP32."""
    onnx_built = [
        (r, p) for r, p in built if r.format == "onnx" and r.verdict not in ("failed", "dropped")
    ]
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
