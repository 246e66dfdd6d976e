"""Region health: failure kinds, the per-region summary, and its Prometheus text.

Failures are classified (``failure_kind``): timeouts, refused connections, 429/503 overload and
5xx are transient; 401/403 (auth), malformed answers (protocol), 404 (unknown model) and other 4xx
(rejected) are not, and retrying them will not help. The first failure of a non-transient kind in
a region is logged at ERROR once (again only after the region answered in between), and every
region keeps counts by kind: ``RegionSelector.health`` is the per-region summary an application
(or its metrics exporter) reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    InputError,
    ProtocolError,
    RemoteError,
    TransportTimeout,
)

__all__ = ["PERSISTENT_KINDS", "RegionHealth", "failure_kind", "health_metrics"]

#: Failure kinds that retrying will not cure: logged loudly once per region.
PERSISTENT_KINDS = frozenset({"auth", "protocol", "unknown_model", "rejected", "config"})


def failure_kind(err: BaseException) -> str:
    """What kind of failure ``err`` is, for health counts and for the loud-once log.

    ``timeout``, ``connection``, ``overloaded`` (429/503), ``server_error`` (other 5xx),
    ``not_ready`` and ``other`` are transient; the kinds in ``PERSISTENT_KINDS`` are not.
    """
    if isinstance(err, TransportTimeout):
        return "timeout"
    if isinstance(err, ConnectionFailed):
        return "connection"
    if isinstance(err, AuthError):
        return "auth"
    if isinstance(err, ProtocolError):
        return "protocol"
    if isinstance(err, RemoteError):
        status = err.status or 0
        if status == 404:
            return "unknown_model"
        if status in (429, 503):
            return "overloaded"
        if status == 408 or status >= 500:
            return "server_error"
        if 400 <= status < 500:
            return "rejected"
        return "other"
    if isinstance(err, ConfigError | InputError):
        return "config"
    return "other"


@dataclass(frozen=True)
class RegionHealth:
    """One region's health, as an application or a metrics exporter reads it.

    ``ready`` is whether the region's model was ready at the last probe or answer (None before
    either). ``failures_by_kind`` counts failed requests by ``failure_kind``;
    ``persistent_error`` is the last failure that retrying will not fix (auth, protocol, unknown
    model, rejected), cleared when the region answers again: a region with one fails every
    offload until someone fixes it. ``features`` is what the transport negotiated (for HTTP: the
    server's extensions and whether binary tensors are used), None for transports that have none.
    """

    name: str
    state: str
    ready: bool | None
    rtt_ms: float | None
    requests: int
    answered: int
    failures: int
    consecutive_failures: int
    failures_by_kind: dict[str, int]
    persistent_error: str | None
    last_error: str | None
    features: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def health_metrics(healths: Sequence[RegionHealth]) -> str:
    """The health summaries in the Prometheus text format, for an application's /metrics.

    No client library needed: append the text to what the application exports. Series:
    ``edgecloud_region_ready`` (1 ready, 0 not, -1 unknown), ``edgecloud_region_requests_total``,
    ``edgecloud_region_answered_total``, ``edgecloud_region_failures_total{kind=...}``,
    ``edgecloud_region_persistent_error`` (1 while a non-transient failure stands) and
    ``edgecloud_region_breaker_open`` (1 open, 0.5 half-open, 0 closed).
    """
    lines = [
        "# HELP edgecloud_region_ready Model ready at the last probe or answer: 1, 0, -1 unknown",
        "# TYPE edgecloud_region_ready gauge",
        "# HELP edgecloud_region_requests_total Requests sent to the region",
        "# TYPE edgecloud_region_requests_total counter",
        "# HELP edgecloud_region_answered_total Requests the region answered",
        "# TYPE edgecloud_region_answered_total counter",
        "# HELP edgecloud_region_failures_total Failed requests by kind",
        "# TYPE edgecloud_region_failures_total counter",
        "# HELP edgecloud_region_persistent_error 1 while a failure retrying will not fix stands",
        "# TYPE edgecloud_region_persistent_error gauge",
        "# HELP edgecloud_region_breaker_open Circuit breaker: 1 open, 0.5 half-open, 0 closed",
        "# TYPE edgecloud_region_breaker_open gauge",
    ]
    breaker = {"open": 1.0, "half_open": 0.5, "closed": 0.0}
    for h in healths:
        r = f'region="{_label(h.name)}"'
        ready = -1 if h.ready is None else int(h.ready)
        lines.append(f"edgecloud_region_ready{{{r}}} {ready}")
        lines.append(f"edgecloud_region_requests_total{{{r}}} {h.requests}")
        lines.append(f"edgecloud_region_answered_total{{{r}}} {h.answered}")
        for kind, n in sorted(h.failures_by_kind.items()):
            lines.append(f'edgecloud_region_failures_total{{{r},kind="{_label(kind)}"}} {n}')
        lines.append(
            f"edgecloud_region_persistent_error{{{r}}} {int(h.persistent_error is not None)}"
        )
        lines.append(f"edgecloud_region_breaker_open{{{r}}} {breaker.get(h.state, 1.0)}")
    return "\n".join(lines) + "\n"
