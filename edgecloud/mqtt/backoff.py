"""Reconnect pacing: capped exponential backoff with full jitter, and what a refusal means.

The waits are tenacity's (``wait_random_exponential``, as ``device_agent/store.py`` uses tenacity
for downloads), driven here from the loop's timers instead of a blocking retry loop: one loop
thread serves many connections and must never sleep for one of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tenacity import RetryCallState, Retrying, wait_random_exponential

__all__ = ["Backoff", "RefusalPolicy"]

_RETRYING = Retrying()


class RefusalPolicy(enum.Enum):
    """What a connection does after the broker refuses its CONNACK with an auth reason code.

    ``STOP``: give up for good and raise the ``AuthError`` to every caller (a client that was
    given wrong credentials must fail fast, not retry forever as paho would). ``RETRY_SLOWLY``:
    keep trying at the backoff's cap (a device in the field: an operator may fix the broker's
    users or ACL, and the device must come back without a restart).
    """

    STOP = "stop"
    RETRY_SLOWLY = "retry_slowly"


@dataclass(frozen=True)
class Backoff:
    """``uniform(base, min(cap, base * 2**attempt))`` seconds before reconnect ``attempt``.

    Jitter keeps a thousand devices from reconnecting in lock step after a broker restart.
    """

    base: float = 0.1
    cap: float = 10.0
    _wait: wait_random_exponential = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got {self.base}, {self.cap}")
        wait = wait_random_exponential(multiplier=self.base, max=self.cap, min=self.base)
        object.__setattr__(self, "_wait", wait)

    def delay(self, attempt: int) -> float:
        """The wait before reconnect ``attempt`` (0 for the first retry)."""
        state = RetryCallState(_RETRYING, None, (), {})
        state.attempt_number = min(attempt, 60) + 1
        return float(self._wait(state))
