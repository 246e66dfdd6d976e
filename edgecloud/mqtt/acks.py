"""Matching PUBACKs to the publishers waiting for them, whichever comes first.

paho returns a message id only after it queued the packet, and on a loopback broker the PUBACK
can reach the loop thread before the publishing thread has registered what to do with it. The
map keeps such early acknowledgements (every one, not only refusals: the device agent deletes an
outbox row on a successful PUBACK) for a short while, bounded in count and age, because paho
reuses message ids after 65,535 publishes and an old early ack must never be taken for a new
message's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["AckMap"]

R = TypeVar("R")


class AckMap(Generic[R]):
    """``expect(mid, callback)`` from the publisher, ``arrived(mid, code)`` from the loop.

    Whichever side comes second gets the pairing: ``expect`` returns an early code (the caller
    runs its callback itself), ``arrived`` returns the callback to run. Neither runs user code
    under the map's lock. ``clear()`` on a disconnect: the acks of a dead connection never come.
    """

    def __init__(self, *, max_early: int = 1024, max_age_s: float = 5.0) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, Callable[[R], None]] = {}
        self._early: dict[int, tuple[R, float]] = {}
        self._max_early = max_early
        self._max_age_s = max_age_s

    def expect(self, mid: int, callback: Callable[[R], None]) -> R | None:
        """Register ``callback`` for ``mid``; returns the code when its ack already came."""
        with self._lock:
            early = self._early.pop(mid, None)
            if early is None or time.monotonic() - early[1] > self._max_age_s:
                self._waiting[mid] = callback
                return None
            return early[0]

    def arrived(self, mid: int, code: R) -> Callable[[R], None] | None:
        """The callback waiting for ``mid``, if any; otherwise keep ``code`` for a while."""
        with self._lock:
            cb = self._waiting.pop(mid, None)
            if cb is None:
                self._early[mid] = (code, time.monotonic())
                if len(self._early) > self._max_early:
                    self._early.pop(next(iter(self._early)))
            return cb

    def clear(self) -> None:
        with self._lock:
            self._waiting.clear()
            self._early.clear()

    def __len__(self) -> int:
        return len(self._waiting)
