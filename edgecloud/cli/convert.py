"""``edgecloud convert``: a thin layer over ``converters.convert`` (flags -> ConvertOptions).

``converters`` is imported only when the command runs: ``edgecloud`` itself never depends on the
conversion stack, so a device without it still has a working CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgecloud.errors import ConfigError

EXIT_OK = 0
EXIT_REFUSED = 1


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _trt_batch(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {text!r}") from exc
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= OPT <= MAX, got {text!r}")
    return vals  # type: ignore[return-value]


def _trt_dim(text: str) -> tuple[str, tuple[int, int, int]]:
    name, _, rng = text.partition("=")
    if not name or not rng:
        raise argparse.ArgumentTypeError(f"expected NAME=MIN,OPT,MAX, got {text!r}")
    return name, _trt_batch(rng)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="make validated FP16/INT8/TensorRT variants of a model",
        description="Convert an ONNX model into a validated, optionally signed model package.",
    )
    p.add_argument("model", type=Path, help="source ONNX model")
    p.add_argument("--out", required=True, type=Path, help="package folder to write")
    g = p.add_argument_group("variants")
    g.add_argument("--fp16", action="store_true", help="FP16 ONNX (inputs/outputs stay FP32)")
    g.add_argument(
        "--int8",
        action="append",
        choices=("static", "dynamic", "auto"),
        default=[],
        help="INT8: static QDQ with --calib, dynamic (MatMul-heavy models), or auto (search "
        "for the fastest variant within --tolerance, needs --calib); repeatable",
    )
    g.add_argument("--calib", type=Path, help="calibration DATA (.npz, .npy or folder)")
    g.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    g.add_argument("--calib-samples", type=int, help="use at most N calibration samples")
    g.add_argument(
        "--calib-batch",
        type=int,
        default=16,
        help="calibration batch size (16; capped at a fixed batch dimension)",
    )
    pc = g.add_mutually_exclusive_group()
    pc.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_const",
        const=True,
        default=None,
        help="per-channel weight scales (default for static)",
    )
    pc.add_argument(
        "--no-per-channel",
        dest="per_channel",
        action="store_const",
        const=False,
        help="per-tensor weight scales (default for dynamic)",
    )
    g.add_argument("--activation-type", choices=("uint8", "int8"), default="uint8")
    g.add_argument("--weight-type", choices=("int8", "uint8"), default="int8")
    g.add_argument(
        "--reduce-range", action="store_true", help="7-bit weights, for CPUs without VNNI only"
    )
    g.add_argument("--exclude-nodes", type=_csv, default=(), help="NODE,NODE kept in float")
    g.add_argument("--exclude-ops", type=_csv, default=(), help="OP,OP types kept in float")
    s = p.add_argument_group(
        "accuracy search (--int8 auto, or a static/dynamic variant that fails the gate)"
    )
    s.add_argument(
        "--search-budget",
        default="20,120s",
        metavar="N|SECONDS",
        help="stop after N trials, a time (120s, 2m) or both (default 20,120s)",
    )
    s.add_argument(
        "--search-report",
        type=Path,
        metavar="JSON",
        help="write every trial of the search(es) to this JSON file",
    )
    s.add_argument(
        "--search-exhaustive",
        action="store_true",
        help="try every setting, keep the fastest passing one",
    )
    s.add_argument(
        "--no-search",
        action="store_true",
        help="refuse a static/dynamic variant that fails the gate without searching",
    )
    t = p.add_argument_group("TensorRT")
    t.add_argument("--tensorrt", action="store_true", help="also build TensorRT engine(s)")
    t.add_argument("--trt-batch", type=_trt_batch, default=(1, 8, 32), metavar="MIN,OPT,MAX")
    t.add_argument(
        "--trt-dim",
        type=_trt_dim,
        action="append",
        default=[],
        metavar="NAME=MIN,OPT,MAX",
        help="range of another symbolic dim",
    )
    t.add_argument("--trt-timing-cache", type=Path, help="timing cache file (loaded and saved)")
    t.add_argument(
        "--trt-hardware-compat", choices=("none", "ampere_plus", "same_cc"), default="none"
    )
    t.add_argument("--trt-workspace-mb", type=int, default=2048)
    v = p.add_argument_group("validation and package")
    v.add_argument("--val", type=Path, help="validation DATA (with 'labels' for accuracy)")
    v.add_argument(
        "--tolerance",
        type=float,
        default=1.0,
        help="max relative drop of the gate metric, in percent (default 1.0)",
    )
    v.add_argument(
        "--task",
        choices=("classification", "embedding", "regression", "detection"),
        help="the gate's task (default: inferred from the graph and output names)",
    )
    v.add_argument(
        "--score-output",
        metavar="NAME",
        help="the output confidence and the gate read (default: chosen by role, never int)",
    )
    v.add_argument("--sign", type=Path, help="Ed25519 private key (edgecloud keys generate)")
    v.add_argument("--name")
    v.add_argument("--version", default="1")
    v.add_argument("--labels", help="LABEL,LABEL,... or a file with one label per line")
    v.add_argument("--confidence", choices=("logits", "probabilities"))
    v.add_argument("--force", action="store_true", help="replace an existing package folder")
    v.add_argument(
        "--keep-rejected", action="store_true", help="write refused variants too, marked rejected"
    )
    v.add_argument("--latency-runs", type=int, default=20)
    v.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    v.add_argument(
        "--no-calibrate",
        action="store_true",
        help="no temperature from labelled --val data (default: calibrate when labels exist)",
    )
    v.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.set_defaults(func=_run)


def _labels(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        return tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if "," not in text and (path.suffix in (".txt", ".csv", ".json", ".names") or "/" in text):
        raise ConfigError(f"--labels {text}: no such file (give LABEL,LABEL,... or a file)")
    return _csv(text)


def _check_name(name: str | None) -> str | None:
    import re

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise ConfigError(
            f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 128, starting "
            "with a letter or digit)"
        )
    return name


def _json_error(exc: BaseException) -> int:
    from edgecloud.errors import DataError, InputError, MissingDependencyError

    if isinstance(exc, MissingDependencyError):
        code = 3
    elif isinstance(exc, ConfigError | DataError | InputError):
        code = 2
    else:
        code = EXIT_REFUSED
    doc = {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}, "exit": code}
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return code


def _run(args: argparse.Namespace) -> int:
    if not args.json:
        return _convert(args)
    from edgecloud.errors import EdgeCloudError

    try:
        return _convert(args)
    except EdgeCloudError as exc:
        return _json_error(exc)


def _convert(args: argparse.Namespace) -> int:
    from rich.console import Console

    from converters import ConvertOptions, convert
    from converters.progress import NullReporter, RichReporter
    from converters.report import render_table

    if args.latency_runs < 1:
        raise ConfigError(f"--latency-runs must be >= 1, got {args.latency_runs}")
    opts = ConvertOptions(
        name=_check_name(args.name),
        version=args.version,
        fp16=args.fp16,
        int8=tuple(dict.fromkeys(args.int8)),
        calib=args.calib,
        calib_method=args.calib_method,
        calib_samples=args.calib_samples,
        calib_batch=args.calib_batch,
        per_channel=args.per_channel,
        activation_type=args.activation_type,
        weight_type=args.weight_type,
        reduce_range=args.reduce_range,
        exclude_nodes=args.exclude_nodes,
        exclude_ops=args.exclude_ops,
        tensorrt=args.tensorrt,
        trt_batch=args.trt_batch,
        trt_dims=dict(args.trt_dim),
        trt_timing_cache=args.trt_timing_cache,
        trt_hardware_compat=args.trt_hardware_compat,
        trt_workspace_mb=args.trt_workspace_mb,
        val=args.val,
        tolerance=args.tolerance,
        sign=args.sign,
        labels=_labels(args.labels),
        confidence=args.confidence,
        task=args.task,
        score_output=args.score_output,
        force=args.force,
        keep_rejected=args.keep_rejected,
        latency_runs=args.latency_runs,
        threads=args.threads,
        search_budget=args.search_budget,
        search_report=args.search_report,
        search_on_failure=not args.no_search,
        search_exhaustive=args.search_exhaustive,
        calibrate=not args.no_calibrate,
    )
    err = Console(stderr=True)
    reporter = NullReporter() if args.json else RichReporter(err)
    report = convert(args.model, args.out, opts, reporter=reporter)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=180)  # piped or logged: do not squeeze the table to 80 columns
        out.print(render_table(report))
        for name, found in report.searches.items():
            out.print(found.table())
            chosen = found.chosen
            out.print(
                f"search for {name}: "
                + (f"chose trial {chosen.index} ({chosen.label}" if chosen else "nothing passed")
                + (f", {len(chosen.excluded)} node(s) in float)" if chosen else "")
                + (f"; {found.calibrations} calibration run(s)" if found.calibrations else "")
            )
            for w in found.warnings:
                out.print(f"[yellow]warning[/yellow] {name}: {w}")
        for w in report.warnings:
            out.print(f"[yellow]warning[/yellow]: {w}")
        for r in report.variants:
            for w in r.warnings:
                out.print(f"[yellow]warning[/yellow] {r.name}: {w}")
        for r in report.rejected:
            what = "kept, marked rejected" if r.verdict == "kept-rejected" else "not written"
            out.print(f"[red]refused[/red] {r.name} ({what}): {r.gate.reason if r.gate else ''}")
        for r in report.variants:
            if r.verdict == "failed":
                out.print(f"[red]failed[/red] {r.name} (not written, the others were): {r.error}")
            elif r.verdict == "dropped":
                out.print(f"[yellow]dropped[/yellow] {r.name} (not written): {r.error}")
        from converters.calibrate import summary_lines
        from converters.drift_reference import reference_lines

        routing = report.manifest.routing if report.manifest else {}
        for line in summary_lines(routing) + reference_lines(routing):
            out.print(line)
        roles = report.roles
        out.print(
            f"task: {report.task} ({roles.get('task_reason', '')}); score output "
            f"'{roles.get('score_output', '')}' ({roles.get('score_reason', '')})"
        )
        for kind, choice in report.device_choice.items():
            out.print(
                f"a {kind.upper()} device loads: {choice['variant'] or 'nothing'} ({choice['why']})"
            )
        out.print(f"package written to {report.package} in {report.seconds:.1f} s")
    return EXIT_OK if report.ok else EXIT_REFUSED
