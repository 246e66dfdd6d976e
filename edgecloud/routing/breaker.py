"""A circuit breaker per cloud region.

closed --(N consecutive failures)--> open --(cool-down elapsed)--> half-open
half-open --(the one probe succeeds)--> closed;  half-open --(probe fails)--> open again.

While open, the region is not tried at all, so a dead region costs nothing per request; after the
cool-down exactly one caller (a real request or the health prober, whichever asks first) is let
through as the probe. The clock is injected so tests move time instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

from edgecloud.errors import ConfigError

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one region and decides whether to try it."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ConfigError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if cooldown < 0:
            raise ConfigError(f"cooldown must be >= 0 seconds, got {cooldown}")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            if self._state is BreakerState.OPEN and self._cooled():
                return BreakerState.HALF_OPEN
            return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def _cooled(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown

    def available(self) -> bool:
        """Whether ``allow`` would let a caller through now (does not take the probe slot)."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                return self._cooled()
            return not self._probe_out

    def allow(self) -> bool:
        """Take permission to call the region; in half-open only the first caller gets it."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if not self._cooled():
                    return False
                self._state = BreakerState.HALF_OPEN
                self._probe_out = False
            if self._probe_out:
                return False
            self._probe_out = True
            return True

    def record_success(self) -> None:
        with self._lock:
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_out = False

    def record_failure(self) -> None:
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._trip()
                return
            self._failures += 1
            if self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold:
                self._trip()

    def release(self) -> None:
        """Give back a half-open probe slot that was taken but not used (e.g. no time left)."""
        with self._lock:
            self._probe_out = False

    def _trip(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probe_out = False

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state.value}, failures={self._failures})"
