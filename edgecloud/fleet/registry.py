"""What the controller knows about each device: its registry entry and its shadow.

The registry is filled only from what devices publish (retained status, reported state,
telemetry), never from what the controller hopes: ``model_name``/``model_version`` come from the
device's reported shadow, which the device publishes after every deploy, rollback and policy
change with a version of its own that only grows, so ``fleet devices`` shows the truth after a
deployment (including a refused one), whatever order retained copies arrive in after a restart.

A shadow is the AWS IoT Device Shadow idea on plain MQTT: the controller owns the *desired*
state (retained, with a version that increases by one per change), the device owns the
*reported* state, and the *delta* is every desired key whose value the device does not report
yet. An update names the version it was based on; a stale version is refused, so two operators
(or two controllers sharing PostgreSQL) never silently overwrite each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Device", "Shadow", "compute_delta", "merge_patch"]


@dataclass
class Device:
    """A registry entry. ``counters`` hold telemetry and job tallies (see docs/fleet.md)."""

    device_id: str
    group: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    online: bool = False
    model_name: str = ""
    model_version: str = ""
    agent_version: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    telemetry_seq: int = -1
    counters: dict[str, int] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    reported_version: int = 0
    #: identity epoch of the device's store; a new one means the device was re-provisioned
    epoch: str = ""
    past_epochs: list[str] = field(default_factory=list)
    reprovisioned_at: float | None = None
    #: the desired-state version the device last reported acting on
    desired_acked: int = 0

    def bump(self, counter: str, n: int = 1) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Device:
        return cls(
            device_id=str(d["device_id"]),
            group=str(d.get("group", "")),
            labels={str(k): str(v) for k, v in dict(d.get("labels") or {}).items()},
            online=bool(d.get("online", False)),
            model_name=str(d.get("model_name", "")),
            model_version=str(d.get("model_version", "")),
            agent_version=str(d.get("agent_version", "")),
            first_seen=float(d.get("first_seen", 0.0)),
            last_seen=float(d.get("last_seen", 0.0)),
            telemetry_seq=int(d.get("telemetry_seq", -1)),
            counters={str(k): int(v) for k, v in dict(d.get("counters") or {}).items()},
            reported=dict(d.get("reported") or {}),
            reported_version=int(d.get("reported_version", 0)),
            epoch=str(d.get("epoch", "")),
            past_epochs=[str(e) for e in d.get("past_epochs") or []],
            reprovisioned_at=(
                None if d.get("reprovisioned_at") is None else float(d["reprovisioned_at"])
            ),
            desired_acked=int(d.get("desired_acked", 0)),
        )


@dataclass
class Shadow:
    """The desired half of a device shadow (the reported half lives on ``Device``)."""

    device_id: str
    version: int = 0
    desired: dict[str, Any] = field(default_factory=dict)
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Shadow:
        return cls(
            device_id=str(d["device_id"]),
            version=int(d.get("version", 0)),
            desired=dict(d.get("desired") or {}),
            updated_at=float(d.get("updated_at", 0.0)),
        )


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7396): objects merge key by key, ``null`` deletes a key."""
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_patch(out[k], v)
        else:
            out[k] = v.copy() if isinstance(v, dict) else v
    return out


def compute_delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    """Desired keys (recursively) whose value differs from the reported one."""
    delta: dict[str, Any] = {}
    for k, v in desired.items():
        r = reported.get(k)
        if isinstance(v, Mapping) and isinstance(r, Mapping):
            sub = compute_delta(v, r)
            if sub:
                delta[k] = sub
        elif v != r:
            delta[k] = v
    return delta
