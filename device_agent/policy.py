"""The fleet's routing policy on a device: mode, threshold, escalation and drift settings.

A policy document (from a job or the desired state) is checked whole before anything changes,
applied to the client, the escalation controls and the drift monitor, and saved in the
outbox's key-value table: the fleet's policy wins over the config file's across restarts until
the fleet changes it again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from device_agent.drift import DriftMonitor
from device_agent.queue import DurableQueue
from device_agent.serving import AgentClient
from device_agent.watchdog import Rejected
from edgecloud.errors import ConfigError
from edgecloud.fleet.messages import POLICY_MODES
from edgecloud.settings import check_threshold

__all__ = ["DRIFT_KEYS", "ESCALATION_KEYS", "apply_policy"]

#: Fleet policy keys for the escalation controls -> ``Escalation.configure`` keywords.
ESCALATION_KEYS = {
    "escalate": "escalate",
    "audit_rate": "audit_rate",
    "escalation_rate_limit": "rate_limit",
}

#: Fleet policy keys for the drift monitor, in ``DriftMonitor.checked``'s order.
DRIFT_KEYS = ("drift_window", "drift_max_distance", "drift_max_offload_shift")


def apply_policy(
    doc: Mapping[str, Any],
    *,
    client: AgentClient,
    drift: DriftMonitor,
    queue: DurableQueue,
    default_threshold: float | None,
) -> list[str]:
    """Apply ``mode``/``threshold`` and the escalation/drift keys; returns the ignored keys."""
    mode = doc.get("mode", client.mode.value)
    threshold = doc.get("threshold", client.threshold)
    if threshold is None:
        threshold = default_threshold
    if mode not in POLICY_MODES:
        raise Rejected(f"policy: 'mode' must be one of {list(POLICY_MODES)}, got {mode!r}")
    if threshold is not None:
        try:  # the client's one threshold check; a policy sets one number, not a per-model table
            if isinstance(threshold, Mapping):
                raise ConfigError(
                    f"policy: 'threshold' must be a number in [0, 1], got {threshold!r}"
                )
            threshold = check_threshold(threshold, "policy: 'threshold'")
        except ConfigError as exc:
            raise Rejected(str(exc)) from None
    esc = {k: doc[k] for k in (*ESCALATION_KEYS, *DRIFT_KEYS) if k in doc}
    try:  # checked whole before anything changes
        checked = drift.checked(*(esc.get(k) for k in DRIFT_KEYS))
        client.escalation.configure(
            **{ESCALATION_KEYS[k]: v for k, v in esc.items() if k in ESCALATION_KEYS}
        )
    except ConfigError as exc:
        raise Rejected(f"policy: {exc}") from None
    drift.apply(*checked)
    client.set_policy(mode=str(mode), threshold=None if threshold is None else float(threshold))
    e = client.escalation
    live = {  # the effective settings, not just this document's keys
        "escalate": e.mode,
        "audit_rate": e.audit_rate,
        "escalation_rate_limit": e.limiter.rate if e.limiter is not None else 0,
        "drift_window": drift.window,
        "drift_max_distance": drift.max_distance,
        "drift_max_offload_shift": drift.max_offload_shift,
    }
    queue.set("policy", json.dumps({"mode": mode, "threshold": threshold, **live}))
    return sorted(set(doc) - {"mode", "threshold", *ESCALATION_KEYS, *DRIFT_KEYS})
