"""Writing the package: the warm-up file, the manifest, and the signed folder put in place.

Only variants whose verdict is written (reference, accepted, kept-rejected) go in; the manifest
records how each was made and judged, and never a path of the converting machine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from converters.context import ConversionContext
from converters.data import Dataset
from converters.options import ConvertOptions
from converters.results import ConversionReport, VariantReport
from converters.validate import open_session, run_model
from edgecloud.errors import EdgeCloudError
from edgecloud.package import Manifest, Variant, write_package

__all__ = ["WARMUP_FILE", "safe_name", "write_variants"]

WARMUP_FILE = "warmup.npz"


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "model"
    return name[:128]


def write_variants(
    ctx: ConversionContext,
    built: list[tuple[VariantReport, Path]],
    *,
    routing: dict[str, Any] | None = None,
) -> ConversionReport:
    """The package of every written variant of ``built``, and the conversion's report."""
    opts, info, roles, val, calib = ctx.opts, ctx.info, ctx.roles, ctx.val, ctx.calib
    task, score, eval_labels, calib_batch = ctx.task, ctx.score, ctx.eval_labels, ctx.calib_batch
    confidence, labels, meta = ctx.confidence, ctx.labels, ctx.meta
    written = [(r, p) for r, p in built if r.written]
    variable = any(r.metrics is not None and r.metrics.detection_f1 is not None for r, _ in built)
    files: dict[str, Path] = {}
    warmup: dict[str, Any] = {}
    if variable:
        ctx.warnings.append(
            "outputs vary in length (NMS): no warm-up comparison file; a device checks that one "
            "inference runs"
        )
    else:
        warm_path, warmup = _warmup(ctx.work, ctx.val, ctx.reference, written, opts, ctx.score)
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
                path = _renamed(path, ctx.work / "package" / r.file)
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
        name=safe_name(opts.name or info.path.stem),
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
        routing=routing or {},
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
            **ctx.extra_metadata,
        },
    )
    with ctx.reporter.stage("writing package", 1) as adv:
        final = write_package(
            ctx.out_dir, manifest, files, signing_key=ctx.signing_key, force=opts.force
        )
        adv(1)
    return ConversionReport(
        source=info.path.name,
        package=str(ctx.out_dir),
        task=task,
        tolerance=opts.tolerance,
        variants=[r for r, _ in built],
        manifest=final,
        warnings=ctx.warnings,
        searches=ctx.searches,
        roles=roles.to_dict(),
        device_choice=_device_choice(final),
    )


def _file_name(source: str) -> str:
    """The data's file name only: a manifest never records the converting machine's paths."""
    return Path(source).name if source else source


def _renamed(path: Path, dst: Path) -> Path:
    import onnx

    from converters.model import save_model

    dst.parent.mkdir(parents=True, exist_ok=True)
    save_model(onnx.load(str(path)), dst, large=True)
    return dst


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
