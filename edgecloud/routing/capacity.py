"""Capacity policies: may this request run locally now?

A device has a fixed number of inference slots (``max_concurrency``, usually the number of
sessions or cores set aside for the model) and a short queue (``max_queue``). A request takes a
free slot, or waits in the queue for at most ``max_wait`` seconds (bounded by its deadline too);
when the slots and the queue are both full it does not wait at all: the router sends it straight
to the cloud (reason ``no_capacity``), and only if no region answers does it come back and wait
for a slot. An optional ``CpuLoadGate`` also turns requests away while the whole machine is busy
(psutil, imported lazily, sampled at most every ``interval`` seconds so the check stays cheap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgecloud.errors import ConfigError

__all__ = ["CapacityLimiter", "CpuLoadGate"]


class CpuLoadGate:
    """Refuses local work while system CPU use is above ``max_percent``."""

    def __init__(
        self,
        max_percent: float,
        *,
        interval: float = 0.5,
        sampler: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < max_percent <= 100:
            raise ConfigError(f"max_cpu_percent must be in (0, 100], got {max_percent}")
        self.max_percent = max_percent
        self.interval = interval
        self._clock = clock
        if sampler is None:
            from edgecloud.deps import require

            psutil = require("psutil", "fleet", "the CPU load gate")
            psutil.cpu_percent(interval=None)  # first call primes the counters

            def sampler() -> float:
                return float(psutil.cpu_percent(interval=None))

        self._sampler = sampler
        self._last = float("-inf")
        self._value = 0.0

    @property
    def load(self) -> float:
        now = self._clock()
        if now - self._last >= self.interval:
            self._value = self._sampler()
            self._last = now
        return self._value

    def __call__(self) -> bool:
        """True when local work is allowed."""
        return self.load <= self.max_percent


class CapacityLimiter:
    """Local inference slots plus a bounded queue; never blocks beyond ``max_wait``."""

    def __init__(
        self,
        max_concurrency: int = 1,
        *,
        max_queue: int = 0,
        max_wait: float = 0.05,
        cpu_gate: CpuLoadGate | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {max_queue}")
        if max_wait < 0:
            raise ConfigError(f"max_wait must be >= 0, got {max_wait}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_wait = max_wait
        self.cpu_gate = cpu_gate
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._waiting = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    def try_acquire(self, budget: float = float("inf")) -> bool:
        """Take a slot now or after a bounded wait in the queue; False means "go elsewhere"."""
        if self.cpu_gate is not None and not self.cpu_gate():
            return False
        with self._cond:
            if self._active < self.max_concurrency:
                self._active += 1
                return True
            if self._waiting >= self.max_queue:
                return False
            wait = min(self.max_wait, budget)
            if wait <= 0:
                return False
            self._waiting += 1
            try:
                end = time.monotonic() + wait
                while self._active >= self.max_concurrency:
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                self._active += 1
                return True
            finally:
                self._waiting -= 1

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for a slot regardless of the queue bound (the fallback after the cloud failed)."""
        with self._cond:
            end = None if timeout is None else time.monotonic() + timeout
            while self._active >= self.max_concurrency:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            self._active += 1
            return True

    def release(self) -> None:
        with self._cond:
            if self._active <= 0:
                raise RuntimeError("CapacityLimiter.release() without a matching acquire")
            self._active -= 1
            self._cond.notify()
