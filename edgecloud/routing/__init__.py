"""Routing: where a request is answered (edge or which cloud region) and why.

Small composable policies, one module per kind, each with an injected clock (see docs/routing.md):
``confidence`` (is the local answer sure enough?), ``capacity`` (may it run locally now?),
``deadline`` (how much time is left?), ``breaker`` and ``regions`` (which region, and failover).
"""

from edgecloud.routing.breaker import BreakerState, CircuitBreaker
from edgecloud.routing.capacity import CapacityLimiter, CpuLoadGate
from edgecloud.routing.confidence import (
    ConfidencePolicy,
    CustomConfidence,
    Entropy,
    Margin,
    MaxProbability,
    confidence_from_manifest,
    softmax,
)
from edgecloud.routing.deadline import Deadline
from edgecloud.routing.modes import Mode, Reason, parse_mode
from edgecloud.routing.regions import (
    CloudOutcome,
    HealthProber,
    Region,
    RegionHealth,
    RegionSelector,
)

__all__ = [
    "BreakerState",
    "CapacityLimiter",
    "CircuitBreaker",
    "CloudOutcome",
    "ConfidencePolicy",
    "CpuLoadGate",
    "CustomConfidence",
    "Deadline",
    "Entropy",
    "HealthProber",
    "Margin",
    "MaxProbability",
    "Mode",
    "Reason",
    "Region",
    "RegionHealth",
    "RegionSelector",
    "confidence_from_manifest",
    "parse_mode",
    "softmax",
]
