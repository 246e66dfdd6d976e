"""``edgecloud package verify|inspect``: check a model package before trusting it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgecloud.errors import EdgeCloudError, PackageError
from edgecloud.package import Manifest, load_public_key, read_manifest, verify_package


def register(sub: Any) -> None:
    p = sub.add_parser("package", help="verify or inspect a model package")
    psub = p.add_subparsers(dest="package_command", metavar="ACTION", required=True)
    v = psub.add_parser("verify", help="check the signature and every file's hash")
    v.add_argument("package", type=Path)
    v.add_argument("--public-key", type=Path, help="trusted public key (NAME.pub)")
    v.add_argument(
        "--unsigned-ok",
        action="store_true",
        help="check hashes only, without a signature (development only)",
    )
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_verify)
    i = psub.add_parser("inspect", help="show the manifest (does not verify)")
    i.add_argument("package", type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)


def _verify(args: argparse.Namespace) -> int:
    if args.public_key is None and not args.unsigned_ok:
        print("edgecloud package verify: --public-key is required (or --unsigned-ok)")
        return 2
    key = load_public_key(args.public_key) if args.public_key else None
    try:
        pkg = verify_package(args.package, key, require_signature=not args.unsigned_ok)
    except PackageError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "file": getattr(exc, "path", None)}))
        else:
            print(f"FAILED: {args.package}: {exc}")
        return 1
    m = pkg.manifest
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "name": m.name,
                    "version": m.version,
                    "signed_by": pkg.signed_by,
                    "files": len(m.files),
                }
            )
        )
    else:
        who = f"signed by key {pkg.signed_by}" if pkg.signed_by else "UNSIGNED (hashes only)"
        print(f"OK: {m.name} {m.version}, {len(m.files)} files verified, {who}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    m = read_manifest(args.package)
    if args.json:
        print(m.to_json().decode(), end="")
        return 0
    console = Console()
    console.print(
        f"[bold]{m.name}[/bold] version {m.version}  task={m.task}  "
        f"confidence={m.confidence}({m.score_output})  created {m.created}"
    )
    console.print(f"source sha256 {m.source_sha256}")
    io = Table(title="tensors")
    for c in ("", "name", "dtype", "shape"):
        io.add_column(c)
    for kind, specs in (("in", m.inputs), ("out", m.outputs)):
        for t in specs:
            io.add_row(kind, t.name, t.dtype, str(list(t.shape)))
    console.print(io)
    vt = Table(title="variants")
    for c in ("name", "file", "format", "precision", "target", "size", "metrics"):
        vt.add_column(c)
    for v in m.variants:
        metrics = ", ".join(
            f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}"
            for k, val in v.metrics.items()
            if not isinstance(val, dict | list)
        )
        vt.add_row(v.name, v.file, v.format, v.precision, v.target, f"{v.size:,}", metrics)
    console.print(vt)
    _print_choice(console, m)
    return 0


def _print_choice(console: Console, m: Manifest) -> None:
    """Which variant a CPU-only and a GPU device would load automatically, and why."""
    from edgecloud.runtime.loader import explain_selection

    for kind, providers in (
        ("CPU", ["CPUExecutionProvider"]),
        ("GPU", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ):
        try:
            v, why = explain_selection(m, providers=providers, trt_ok=False)
        except EdgeCloudError as exc:
            console.print(f"a {kind} device loads nothing: {exc}")
            continue
        console.print(f"a {kind} device loads [bold]{v.name}[/bold]: {why}", highlight=False)
