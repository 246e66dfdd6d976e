"""``edgecloud agent run --config agent.toml``: the device agent (``device_agent``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the device agent")
    asub = p.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    r = asub.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    r.add_argument("--config", required=True, type=Path, help="the agent's TOML config")
    r.set_defaults(func=_run)
    c = asub.add_parser("check", help="validate a config and print it")
    c.add_argument("--config", required=True, type=Path)
    c.set_defaults(func=_check)
    h = asub.add_parser("hard-examples", help="export captured low-confidence inputs")
    h.add_argument("--config", required=True, type=Path)
    h.add_argument("--out", required=True, type=Path, help="folder for the .npz files")
    h.set_defaults(func=_export)


def _run(args: argparse.Namespace) -> int:
    # The agent lives outside edgecloud (edgecloud never imports it at module level).
    from device_agent.agent import Agent
    from device_agent.config import load_config

    Agent(load_config(args.config)).run_forever()
    return 0


def _check(args: argparse.Namespace) -> int:
    from device_agent.config import load_config

    cfg = load_config(args.config)
    print(
        json.dumps(
            {"device": cfg.device.id, "broker": cfg.broker.url, "store": str(cfg.store.path)}
        )
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from device_agent.capture import HardExampleStore
    from device_agent.config import load_config

    cfg = load_config(args.config)
    store = HardExampleStore(cfg.store.path / "capture.db")
    try:
        index = store.export(args.out)
    finally:
        store.close()
    print(index)
    return 0
