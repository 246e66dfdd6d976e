"""TensorRT variants of a conversion: engines from the FP16 and static INT8 variants that passed.

The engine machinery (building, features, compatibility) is ``converters.tensorrt``; this is its
builder in the conversion pipeline, reading the ``ConversionContext`` like the ONNX builders.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.context import ConversionContext
from converters.data import Dataset
from converters.quantize import convert_fp16
from converters.results import VariantReport
from converters.tensorrt import (
    EngineSettings,
    build_engine,
    check_tensorrt,
    derive_profiles,
    quantize_for_tensorrt,
)
from converters.validate import compare, gate

__all__ = ["build_tensorrt_variants"]


def _latency_ms(backend: Any, val: Dataset, batch: int, runs: int) -> float:
    """Median wall time of one engine run at ``batch`` (copies in and out included)."""
    feed = {
        k: np.ascontiguousarray(np.concatenate([v] * -(-batch // v.shape[0]))[:batch])
        for k, v in val.take(batch).inputs.items()
    }
    backend.infer(feed)
    times = []
    for _ in range(max(3, runs)):
        t0 = time.perf_counter()
        backend.infer(feed)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def build_tensorrt_variants(
    ctx: ConversionContext, built: list[tuple[VariantReport, Path]]
) -> list[tuple[VariantReport, Path]]:
    """Engines for the FP16 and static INT8 variants that passed the gate (FP16 if none).

    The INT8 engine is not built from the CPU variant's file: TensorRT's explicit quantization
    takes only signed, symmetric Q/DQ (zero point 0), while the CPU default is uint8 asymmetric
    activations. So the model is quantized again for TensorRT with int8 symmetric activations
    and weights (same calibration data, method, per-channel and exclusions), and the engine is
    then validated on its own against the FP32 reference.
    """
    from edgecloud.runtime.tensorrt import TensorRTBackend

    opts, rep, info, work, val, calib = (
        ctx.opts,
        ctx.reporter,
        ctx.info,
        ctx.work,
        ctx.val,
        ctx.calib,
    )
    reference, eval_labels, task, score = ctx.reference, ctx.eval_labels, ctx.task, ctx.score

    trt, gpu = check_tensorrt()
    profiles = derive_profiles(info.inputs, opts.trt_batch, opts.trt_dims)
    fp32 = next(p for r, p in built if r.name == "fp32")
    sources: list[tuple[str, Path]] = []
    for r, p in built:
        if r.gate is not None and not r.gate.passed:
            continue
        if r.name == "fp16":
            sources.append(("fp16", p))
        elif r.name == "int8_static" and calib is not None:
            qdq = work / "trt_source_int8.onnx"
            with rep.stage("quantizing int8 for TensorRT (symmetric QDQ)", 1) as adv:
                quantize_for_tensorrt(fp32, qdq, calib, opts)
                adv(1)
            sources.append(("int8", qdq))
    if not sources:
        fp16 = work / "trt_source_fp16.onnx"
        convert_fp16(fp32, fp16)
        sources = [("fp16", fp16)]
    out: list[tuple[VariantReport, Path]] = []
    for precision, src in sources:
        name = f"trt_{precision}"
        engine = work / f"{name}.engine"
        settings = EngineSettings(
            precision=precision,
            profiles=profiles,
            timing_cache=opts.trt_timing_cache,
            hardware_compat=opts.trt_hardware_compat,
            workspace_mb=opts.trt_workspace_mb,
        )
        with rep.stage(f"building TensorRT engine ({precision})", 1) as adv:
            facts = build_engine(src, engine, settings, trt=trt, gpu=gpu)
            adv(1)
        backend = TensorRTBackend(engine, info.inputs, info.outputs)
        lo, _, hi = opts.trt_batch
        try:
            chunks: dict[str, list[np.ndarray]] = {}
            with rep.stage(f"validating {name}", len(val)) as adv:
                for batch in val.batches(hi):
                    n = int(next(iter(batch.values())).shape[0])
                    if n < lo:  # below the profile's minimum: pad by repetition, trim after
                        reps = -(-lo // n)
                        batch = {k: np.concatenate([v] * reps)[:lo] for k, v in batch.items()}
                    for k, v in backend.infer(batch).items():
                        chunks.setdefault(k, []).append(v[:n])
                    adv(n)
            latency = {
                b: _latency_ms(backend, val, b, opts.latency_runs) for b in (1, 32) if lo <= b <= hi
            }
        finally:
            backend.close()
        outputs = {k: np.concatenate(v) for k, v in chunks.items()}
        metrics = compare(reference, outputs, score_output=score, task=task, labels=eval_labels)
        out.append(
            (
                VariantReport(
                    name=name,
                    precision=precision,
                    format="tensorrt",
                    file=f"{name}.engine",
                    metrics=metrics,
                    gate=gate(metrics, task, opts.tolerance),
                    # GPU latency; no speedup figure, FP32 was timed on the CPU
                    latency_ms_b1=latency.get(1),
                    latency_ms_b32=latency.get(32),
                    settings={"source": src.name, "workspace_mb": opts.trt_workspace_mb},
                    extra=facts,
                ),
                engine,
            )
        )
    return out
