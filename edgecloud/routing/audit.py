"""Audits: send a fraction of *confident* answers to the cloud too, and count agreement.

A threshold tuned once says nothing about next month's data. Auditing a small random fraction of
the answers the edge was sure about measures, in production, how often the cloud would have
said something else: the agreement rate is the live estimate of the edge's precision above the
threshold (the quantity ``edgecloud tune``'s targets bound on validation data). Audits never
change the answer returned; they cost one background cloud request each, and are dropped (and
counted) when the background queue is full.

``AuditSampler(rate, seed)`` decides per request (a seeded generator, so tests are exact);
``agree(local, cloud, output)`` compares the arg-max labels row by row.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping

import numpy as np

from edgecloud.errors import ConfigError

__all__ = ["AuditSampler", "agree", "check_rate"]


def check_rate(rate: object, what: str = "audit_rate") -> float:
    """A fraction in [0, 1], else a ConfigError naming ``what`` and the value."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1], got {rate!r}")
    return float(rate)


class AuditSampler:
    """Bernoulli(rate) per call; thread-safe; ``rate == 0`` costs one comparison."""

    def __init__(self, rate: float = 0.0, *, seed: int | None = None) -> None:
        self.rate = check_rate(rate)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        if self.rate <= 0.0:
            return False
        if self.rate >= 1.0:
            return True
        with self._lock:
            return self._rng.random() < self.rate


def agree(
    local: Mapping[str, np.ndarray], cloud: Mapping[str, np.ndarray], output: str | None
) -> bool | None:
    """Whether every row's arg-max label matches; None when the outputs cannot be compared.

    The cloud tensor is the one of the same name, else the cloud's first output (the cloud model
    often names its outputs differently); shapes must agree after flattening each row.
    """
    if output is None or output not in local or not cloud:
        return None
    a = np.asarray(local[output])
    b = np.asarray(cloud[output] if output in cloud else next(iter(cloud.values())))
    if a.ndim == 0 or b.ndim == 0 or a.shape[0] != b.shape[0]:
        return None
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        return None
    return bool((a.argmax(1) == b.argmax(1)).all())
