"""Dropping QoS 1 redeliveries of inference requests in the MQTT workers."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

__all__ = ["SeenIds"]


class SeenIds:
    """Recent (sender, correlation id) pairs, each kept until its request's deadline.

    QoS 1 may deliver a request twice; the duplicate is dropped. Keying by sender keeps one
    device from silencing another that happens to use the same bytes, and expiring entries at the
    request's deadline lets a device reuse an id (a restarted counter) once the old request is
    over. Bounded: beyond ``size`` the oldest entries go first.
    """

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ids: collections.OrderedDict[tuple[str, bytes], float] = collections.OrderedDict()
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()

    def seen(self, sender: str, corr: bytes, ttl_s: float) -> bool:
        """Record the pair until ``ttl_s`` from now; True when it is already live."""
        now = self._clock()
        key = (sender, corr)
        with self._lock:
            expiry = self._ids.get(key)
            if expiry is not None and expiry > now:
                return True
            self._ids.pop(key, None)
            self._ids[key] = now + max(0.0, ttl_s)
            while self._ids:
                first_key, first_exp = next(iter(self._ids.items()))
                if len(self._ids) > self._size or first_exp <= now:
                    del self._ids[first_key]
                else:
                    break
            return False

    def __len__(self) -> int:
        return len(self._ids)
