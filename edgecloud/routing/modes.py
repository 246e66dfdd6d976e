"""Routing modes and the reasons a result gives for where it was answered."""

from __future__ import annotations

from enum import StrEnum

from edgecloud.errors import ConfigError

__all__ = ["Mode", "Reason", "parse_mode"]


class Mode(StrEnum):
    """Where a request is answered.

    - ``edge_first`` (default): locally; the cloud when the answer is unsure or the device busy.
    - ``cloud_first``: the cloud; locally when no region answers within the deadline.
    - ``edge_only``: locally, always (offline operation, privacy).
    - ``cloud_only``: the cloud, always; no local fallback.
    """

    EDGE_FIRST = "edge_first"
    CLOUD_FIRST = "cloud_first"
    EDGE_ONLY = "edge_only"
    CLOUD_ONLY = "cloud_only"


class Reason(StrEnum):
    """Why a result came from where it came from (``HybridResult.reason``)."""

    CONFIDENT = "confident"  # local answer above the threshold
    LOW_CONFIDENCE = "low_confidence"  # local answer unsure, the cloud answered
    NO_CAPACITY = "no_capacity"  # device saturated, sent straight to the cloud
    FORCED = "forced"  # the mode fixed the source (edge_only, cloud_only, cloud_first)
    NO_CONFIDENCE = "no_confidence"  # the model defines no confidence; local answer taken
    CLOUD_FAILED = "cloud_failed"  # the cloud was wanted but no region answered: local, degraded
    DEADLINE = "deadline"  # the deadline left no time for the cloud: local, degraded
    NO_REGIONS = "no_regions"  # the cloud was wanted but none is configured: local, degraded
    BACKGROUND = "background"  # unsure; local answer now, the cloud's on result.cloud_future
    RATE_LIMITED = "rate_limited"  # unsure, but the device's escalation rate limit: local, degraded
    AUDIT = "audit"  # the cloud's answer to an audited confident request (on cloud_future)

    def __str__(self) -> str:
        return self.value


def parse_mode(mode: Mode | str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise ConfigError(f"mode must be one of {[m.value for m in Mode]}, got {mode!r}") from None
