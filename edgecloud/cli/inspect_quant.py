"""``edgecloud inspect-quant``: rank a model's nodes by INT8 quantization sensitivity.

Its own command (not ``convert inspect-quant``: ``convert`` takes a positional MODEL, which
rules out nested subcommands). ``converters`` is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect-quant",
        help="rank a model's nodes by INT8 quantization sensitivity",
        description="Quantize each node alone and measure SQNR per node against FP32, sorted "
        "most sensitive first, to see which layers an INT8 variant should keep in float.",
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--calib", type=Path, required=True, help="calibration data (.npz/.npy/dir)")
    p.add_argument("--val", type=Path, required=True, help="validation data (.npz/.npy/dir)")
    p.add_argument("--int8", choices=["auto", "static", "dynamic"], default="auto")
    p.add_argument(
        "--task",
        choices=("classification", "embedding", "regression", "detection"),
        default=None,
        help="the gate's task (default: the model's metadata, else classification)",
    )
    p.add_argument("--tolerance", type=float, default=1.0, help="percent, for the loss column")
    p.add_argument("--max-nodes", type=int, default=64, help="cap on single-node quantizations")
    p.add_argument("--no-isolated", action="store_true", help="SQNR only (static QDQ)")
    p.add_argument("--limit", type=int, default=30, help="rows in the table")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=_run)
    return p  # type: ignore[no-any-return]


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from converters.progress import NullReporter, Reporter, RichReporter
    from converters.sensitivity import inspect_quant

    reporter: Reporter = NullReporter() if args.json else RichReporter(Console(stderr=True))
    report = inspect_quant(
        args.model,
        args.calib,
        args.val,
        family=args.int8,
        task=args.task,
        tolerance_pct=args.tolerance,
        isolated=not args.no_isolated,
        max_isolated=args.max_nodes,
        reporter=reporter,
    )
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    else:
        Console().print(report.table(limit=args.limit))
    return 0
