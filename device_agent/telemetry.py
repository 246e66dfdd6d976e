"""Telemetry helpers of the agent: the heartbeat ticker, system figures, the capture hook.

The heartbeat record itself is built by ``Agent.heartbeat`` (it reports the agent's own
counters); this module holds what does not need the agent: a fixed-schedule ticker thread,
CPU/memory figures from psutil or /proc, and the hook that offers answers to the hard-example
store without ever failing a request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from device_agent.capture import HardExampleStore
from device_agent.serving import InferOutcome
from edgecloud.errors import EdgeCloudError

__all__ = ["Ticker", "hard_example_hook", "system_stats"]

log = logging.getLogger("device_agent")


def hard_example_hook(
    capture: HardExampleStore,
) -> Callable[[Mapping[str, Any], InferOutcome], None]:
    """An ``on_answer`` hook that offers each answer to the hard-example store."""

    def offer(inputs: Mapping[str, Any], outcome: InferOutcome) -> None:
        try:
            cloud = outcome.outputs if outcome.route == "cloud" else None
            capture.offer(
                inputs,
                outcome.edge_outputs or {},
                confidence=outcome.edge_confidence,
                model=outcome.model,
                version=outcome.version,
                route=outcome.route,
                cloud=cloud,
            )
        except Exception as exc:  # capture must never fail a request
            log.warning("hard-example capture failed: %s", exc)

    return offer


class Ticker(threading.Thread):
    """Calls ``fn`` every ``interval`` seconds, on a fixed schedule, until ``stop`` is set."""

    def __init__(
        self,
        name: str,
        interval: float,
        fn: Callable[[], object],
        *,
        stop: threading.Event,
        on_error: Callable[[EdgeCloudError], None],
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self._fn = fn
        self._stop_event = stop
        self._on_error = on_error

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            if self._stop_event.wait(max(0.0, next_at - time.monotonic())):
                return
            next_at += self.interval
            try:
                self._fn()
            except EdgeCloudError as exc:
                self._on_error(exc)


def system_stats() -> dict[str, Any]:
    """CPU and memory via psutil when installed, else /proc (a device may have neither)."""
    try:
        import psutil

        proc = psutil.Process()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "mem_percent": psutil.virtual_memory().percent,
            "rss_bytes": proc.memory_info().rss,
        }
    except ImportError:
        pass
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        out["load1"] = float(Path("/proc/loadavg").read_text().split()[0])
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_bytes"] = int(line.split()[1]) * 1024
    out["pid"] = os.getpid()
    return out
