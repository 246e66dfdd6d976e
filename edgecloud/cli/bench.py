"""``edgecloud bench``: run the repository's benchmarks (a source checkout is needed)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgecloud.errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="run the benchmarks (from a source checkout)")
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="short runs")
    p.set_defaults(func=_run)


def _root() -> Path:
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "__main__.py").exists():
        raise ConfigError(
            "the benchmarks ship with the source repository, not the wheel; "
            "run `edgecloud bench` from a checkout (./dev.sh bench)"
        )
    return root


def _run(args: argparse.Namespace) -> int:
    root = _root()
    cmd = [sys.executable, "-m", "benchmarks", *args.names] + (["--quick"] if args.quick else [])
    return subprocess.call(cmd, cwd=root)
