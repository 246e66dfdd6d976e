"""A per-request deadline that every routing step spends from.

Local inference, the wait for a capacity slot and each cloud attempt all draw from one budget, so a
request never takes longer than its caller allowed however many regions fail; the cloud timeout is
simply what is left. The clock is injected for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edgecloud.errors import ConfigError

__all__ = ["Deadline"]


class Deadline:
    """``seconds`` from now on ``clock``; ``None`` means no deadline (infinite budget)."""

    __slots__ = ("_clock", "expires_at", "seconds", "start")

    def __init__(
        self,
        seconds: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        start: float | None = None,
    ) -> None:
        if seconds is not None and not seconds > 0:
            raise ConfigError(f"deadline must be a positive number of seconds, got {seconds!r}")
        self._clock = clock
        self.seconds = seconds
        self.start = clock() if start is None else start
        self.expires_at = None if seconds is None else self.start + seconds

    def remaining(self) -> float:
        """Seconds left (never negative); ``inf`` without a deadline."""
        if self.expires_at is None:
            return float("inf")
        return max(0.0, self.expires_at - self._clock())

    def expired(self) -> bool:
        return self.expires_at is not None and self._clock() >= self.expires_at

    def elapsed(self) -> float:
        return self._clock() - self.start
