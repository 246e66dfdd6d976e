"""What the fleet console costs the controller: its API calls on a fleet with a full telemetry
history, against ``GET /api/devices`` (the call the CLI makes) measured in the same run.

A controller (not connected: the views read only memory) is filled with N devices, each with a
telemetry ring of M heartbeats in the agent's format, one every 30 s (the default interval), two
regions each. Then the console's calls are timed as the HTTP handler runs them:
``routing_view`` (``GET /api/routing?window=600``), ``latest_telemetry_view``
(``GET /api/telemetry/latest``) and ``devices_view`` (the baseline). Each figure is the median
of R runs. ``python -m benchmarks.console [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecloud.fleet.console import latest_telemetry_view, routing_view
from edgecloud.fleet.controller import TELEMETRY_KEEP, FleetController
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.registry import Device
from edgecloud.fleet.store import SqliteFleetStore


def _beat(i: int) -> dict[str, Any]:
    req = 50 * i
    return {
        "requests": req,
        "errors": 0,
        "edge": int(req * 0.8),
        "cloud": req - int(req * 0.8),
        "degraded": 0,
        "latency": {"p50_ms": 1.0, "p90_ms": 2.0, "p95_ms": 3.0, "p99_ms": 4.0},
        "local_latency": {"p50_ms": 0.5, "p95_ms": 1.0},
        "regions": {
            name: {
                "state": "closed",
                "rtt_ms": 5.0,
                "requests": 5 * i,
                "failures": 0,
                "last_error": None,
                "latency": {"p50_ms": 5.0, "p95_ms": 9.0},
            }
            for name in ("eu", "us")
        },
        "confidence_histogram": {f"{b / 10:.1f}": i for b in range(1, 11)},
        "variant": {"name": "int8_static", "precision": "int8", "format": "onnx"},
    }


def _fleet(tmp: Path, n: int, m: int) -> FleetController:
    ctl = FleetController(
        "mqtt://127.0.0.1:1", SqliteFleetStore(tmp / "f.sqlite"), PackageStore(tmp / "p")
    )
    now = time.time()
    for d in range(n):
        did = f"dev-{d:05d}"
        ctl.devices[did] = Device(
            did, group=f"g{d % 10}", online=True, last_seen=now, telemetry_seq=m - 1
        )
        ring: deque[dict[str, Any]] = deque(maxlen=TELEMETRY_KEEP)
        for i in range(m):
            ring.append(
                {
                    "device_id": did,
                    "seq": i,
                    "ts": now - 30.0 * (m - i),
                    "kind": "heartbeat",
                    "data": _beat(i),
                }
            )
        ctl.telemetry[did] = ring
    return ctl


def _median(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.console", description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    n, m, runs = (200, 500, 3) if args.quick else (1000, 2000, 5)
    with tempfile.TemporaryDirectory() as tmp:
        ctl = _fleet(Path(tmp), n, m)
        base = _median(ctl.devices_view, runs)
        routing = _median(lambda: routing_view(ctl, window_s=600), runs)
        latest = _median(lambda: latest_telemetry_view(ctl), runs)
        ctl.store.close()
    print(f"{n} devices x {m} heartbeats each ({n * m:,} records in memory), median of {runs}")
    print(f"GET /api/devices          {base * 1e3:8.1f} ms  (baseline)")
    print(f"GET /api/routing?window=600 {routing * 1e3:6.1f} ms  {routing / base:6.2f}x baseline")
    print(f"GET /api/telemetry/latest {latest * 1e3:8.1f} ms  {latest / base:6.2f}x baseline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
