"""Routing: where a request is answered (edge or which cloud region) and why.

Small composable policies, one module per kind, each with an injected clock (see docs/routing.md):
``confidence`` (is the local answer sure enough?), ``capacity`` (may it run locally now?),
``deadline`` (how much time is left?), ``breaker`` and ``regions`` (which region, and failover),
``health`` and ``prober`` (how regions are doing), ``escalation`` and ``audit`` (unsure answers
later or sampled). ``policies`` composes them into the four modes, one ``RoutingPolicy`` object
each, over the ``engine.Router`` they share; ``result`` is what they answer; ``factory`` builds
regions from their config (imported from there: it depends on ``edgecloud.settings``).
"""

from edgecloud.routing.breaker import BreakerState, CircuitBreaker
from edgecloud.routing.calibrated import confidence_from_manifest
from edgecloud.routing.capacity import CapacityLimiter, CpuLoadGate
from edgecloud.routing.confidence import (
    ConfidencePolicy,
    CustomConfidence,
    Entropy,
    Margin,
    MaxProbability,
    softmax,
)
from edgecloud.routing.deadline import Deadline
from edgecloud.routing.engine import Router
from edgecloud.routing.modes import Mode, Reason, parse_mode
from edgecloud.routing.policies import (
    CloudFirst,
    CloudOnly,
    EdgeFirst,
    EdgeOnly,
    RoutingPolicy,
    make_policies,
)
from edgecloud.routing.prober import HealthProber
from edgecloud.routing.regions import (
    CloudOutcome,
    Region,
    RegionHealth,
    RegionSelector,
)
from edgecloud.routing.result import HybridResult, ModelSlot

__all__ = [
    "BreakerState",
    "CapacityLimiter",
    "CircuitBreaker",
    "CloudFirst",
    "CloudOnly",
    "CloudOutcome",
    "ConfidencePolicy",
    "CpuLoadGate",
    "CustomConfidence",
    "Deadline",
    "EdgeFirst",
    "EdgeOnly",
    "Entropy",
    "HealthProber",
    "HybridResult",
    "Margin",
    "MaxProbability",
    "Mode",
    "ModelSlot",
    "Reason",
    "Region",
    "RegionHealth",
    "RegionSelector",
    "Router",
    "RoutingPolicy",
    "confidence_from_manifest",
    "make_policies",
    "parse_mode",
    "softmax",
]
