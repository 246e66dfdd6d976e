"""What every ``edgecloud fleet`` client command shares: the controller client and the output.

The client is built from ``--controller``/``--token`` or the environment
(``edgecloud.environment``); output is a table for people, JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def _client(args: argparse.Namespace) -> Any:
    from edgecloud.fleet.client import ControllerClient

    return ControllerClient(args.controller, token=args.token)


def _print_json(obj: Any) -> None:
    _out(json.dumps(obj, indent=2, sort_keys=True))


def _out(text: str) -> None:
    """Print for a pipe that may close early (``| head``): no BrokenPipeError traceback."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's documented way: point stdout at devnull so the exit flush cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _ago(ts: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _console() -> Any:
    """A rich console; not a terminal (a pipe, a file) gets full widths, never cut columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=10_000, soft_wrap=True)
