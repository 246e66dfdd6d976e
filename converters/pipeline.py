"""``convert``: one source model in, a validated and signed model package out.

The order of work is chosen so that failures are cheap: options, the output folder, TensorRT's
presence, the model and the data are all checked before the first variant is built. All
intermediate files live in one temporary directory that is removed however the run ends, and the
package itself is written by ``write_package``, which renames a complete folder into place.

The stages, one module each: ``ConversionContext`` (``converters.context``) carries what they
share; ``converters.builders`` makes and gates the ONNX variants, ``converters.trt_builder`` the
TensorRT engines; ``converters.judge`` times and judges them all together; ``converters.writer``
writes the warm-up file, the manifest and the package.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from converters.builders import build_all
from converters.calibrate import calibrate_variants
from converters.context import ConversionContext
from converters.data import load_dataset
from converters.drift_reference import add_drift_reference
from converters.judge import judge_variants, quantized_fraction
from converters.model import inspect_model
from converters.options import ConvertOptions
from converters.progress import NullReporter, Reporter
from converters.results import ConversionReport, VariantReport
from converters.roles import infer_roles
from converters.writer import write_variants
from edgecloud.errors import ConfigError
from edgecloud.package import load_private_key

__all__ = ["ConversionReport", "ConvertOptions", "VariantReport", "convert", "quantized_fraction"]


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
    rep.note(f"task: {task} ({roles.task_reason}); score output '{score}' ({roles.score_reason})")

    work = Path(tempfile.mkdtemp(prefix="edgecloud-convert-"))
    try:
        with _contained(work):
            ctx = ConversionContext(
                opts=opts,
                reporter=rep,
                info=info,
                val=val,
                calib=calib,
                roles=roles,
                labels=labels,
                confidence=confidence,
                meta=meta,
                work=work,
                out_dir=out_dir,
                signing_key=signing_key,
                warnings=warnings,
            )
            report = _run(ctx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def _run(ctx: ConversionContext) -> ConversionReport:
    ctx.prepare_reference()
    built = build_all(ctx)
    if ctx.opts.tensorrt:
        from converters.trt_builder import build_tensorrt_variants

        built += build_tensorrt_variants(ctx, built)
    judge_variants(ctx, built)
    # Every variant is built, validated and judged; the manifest is written next. Convert-time
    # steps that need the final variants go here: the temperature and each variant's offload
    # (converters/calibrate.py), which may add a regression warning to a variant.
    written = [(r, p) for r, p in built if r.written]
    cache: dict[str, dict[str, np.ndarray]] = {}
    routing = calibrate_variants(
        written,
        ctx.val,
        ctx.eval_labels,
        score=ctx.score,
        confidence=ctx.confidence,
        enabled=ctx.opts.calibrate,
        threads=ctx.opts.threads,
        reporter=ctx.reporter,
        warnings=ctx.warnings,
        outputs=cache,
    )
    # the drift reference the device agent compares with (converters/drift_reference.py)
    routing = add_drift_reference(
        routing,
        written,
        ctx.val,
        inputs=ctx.info.inputs,
        outputs=ctx.info.outputs,
        task=ctx.task,
        score=ctx.score,
        confidence=ctx.confidence,
        threshold=ctx.extra_metadata.get("confidence_threshold"),
        enabled=ctx.opts.calibrate,
        threads=ctx.opts.threads,
        cache=cache,
        warnings=ctx.warnings,
    )
    return write_variants(ctx, built, routing=routing)
