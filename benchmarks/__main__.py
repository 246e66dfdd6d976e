"""Run every benchmark: ``python -m benchmarks [--quick] [NAME ...]``.

Each benchmark is its own module, run in its own interpreter so that one's threads, sessions and
brokers cannot disturb another's figures. Each prints ratios against a baseline measured in the
same run (raw onnxruntime, raw httpx, raw paho); this runner only sequences them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ORDER = ["convert", "autotune", "edge_path", "cascade", "http", "server", "mqtt", "fleet"]


def available() -> list[str]:
    here = Path(__file__).parent
    found = {p.stem for p in here.glob("*.py") if not p.stem.startswith("_")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"which to run (default all: {available()})")
    parser.add_argument("--quick", action="store_true", help="short runs (minutes, not tens)")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    failed = []
    for name in names:
        print(f"\n===== benchmarks.{name} =====", flush=True)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        rc = subprocess.call(cmd)
        print(f"===== {name}: exit {rc} in {time.monotonic() - t0:.1f} s =====", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
