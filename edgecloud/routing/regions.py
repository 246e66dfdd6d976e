"""Region selection: which cloud region gets a request, and what happens when regions fail.

Algorithm
---------
Every region has a circuit breaker (``routing.breaker``) and a smoothed round-trip time: an EWMA
(``alpha``, default 0.3) of the latency of its health probes and of the real requests it answered.
For one request, ``RegionSelector.route``:

1. lists the regions whose breaker is closed or due for a half-open probe, ordered by
   ``(priority, smoothed RTT, position in the config)``: lower priority numbers first, and within
   one priority the nearest region first; a region never measured sorts after measured ones;
2. tries them in that order. Each attempt's timeout is the request's remaining deadline, capped by
   the region's own ``timeout`` when set, so one slow region cannot eat the whole budget;
3. returns the first answer. A failure (any ``TransportError``: timeout, refused connection, 401,
   a V2 error body, a malformed reply) counts against the region's breaker and the next region is
   tried while the deadline lasts.

Readiness comes from ``routing.prober.HealthProber`` and from real requests; failures are
counted by kind (``routing.health``).

How it fails
------------
- All regions open, down or too slow: ``route`` returns no response and a per-region error map
  (what each region said, or "circuit open", or "no time left"); the client then answers with the
  local result marked ``degraded``, or raises ``NoRouteError`` listing the map when it has none.
- A region that answers probes but fails requests is still tripped by the request failures.
- RTTs are only as fresh as the last probe or request; a region that became slow is found out by
  its per-attempt timeout, then demoted by its new RTT, and tripped after repeated timeouts.
- Breaker state and RTTs live in this process: a fleet of devices does not share them.

Clock, and therefore every timing decision, is injected so the policy is tested without waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecloud.errors import ConfigError, EdgeCloudError, TransportError, TransportTimeout
from edgecloud.routing.breaker import CircuitBreaker
from edgecloud.routing.deadline import Deadline
from edgecloud.routing.health import PERSISTENT_KINDS, RegionHealth, failure_kind, health_metrics
from edgecloud.transport.base import Transport
from edgecloud.transport.v2 import InferRequest, InferResponse

__all__ = [
    "MIN_ATTEMPT",
    "PERSISTENT_KINDS",
    "CloudInputs",
    "CloudOutcome",
    "Region",
    "RegionHealth",
    "RegionSelector",
    "as_edge_error",
    "failure_kind",
    "health_metrics",
]

log = logging.getLogger(__name__)

CloudInputs = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

#: Below this many seconds left, an attempt is not worth starting.
MIN_ATTEMPT = 0.001


class Region:
    """One cloud region: its transport, what model to ask for, and its health."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        *,
        priority: int = 0,
        model: str | None = None,
        version: str | None = None,
        timeout: float | None = None,
        cloud_inputs: CloudInputs | None = None,
        breaker: CircuitBreaker | None = None,
        alpha: float = 0.3,
    ) -> None:
        if not name:
            raise ConfigError("a region needs a name")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"region '{name}': timeout must be > 0 seconds, got {timeout!r}")
        if not 0 < alpha <= 1:
            raise ConfigError(f"region '{name}': rtt alpha must be in (0, 1], got {alpha}")
        self.name = name
        self.transport = transport
        self.priority = priority
        self.model = model
        self.version = version
        self.timeout = timeout
        self.cloud_inputs = cloud_inputs
        self.breaker = breaker or CircuitBreaker()
        self.alpha = alpha
        self.rtt: float | None = None
        self.last_error: EdgeCloudError | None = None
        self.requests = 0
        self.failures = 0
        self.answered = 0
        #: Whether the region's model was ready at the last probe or answer; None: not known.
        self.model_ready: bool | None = None
        self.failures_by_kind: Counter[str] = Counter()
        self.consecutive_failures = 0
        #: The last non-transient failure, until the region answers again.
        self.persistent_error: EdgeCloudError | None = None
        self._announced: set[str] = set()
        self._lock = threading.Lock()

    def observe_rtt(self, seconds: float) -> None:
        with self._lock:
            self.rtt = seconds if self.rtt is None else self.rtt + self.alpha * (seconds - self.rtt)

    def record_failure(self, err: EdgeCloudError) -> str:
        """Count a failed request by kind; log a non-transient kind loudly, once. Returns it."""
        kind = failure_kind(err)
        with self._lock:
            self.failures += 1
            self.consecutive_failures += 1
            self.failures_by_kind[kind] += 1
            self.last_error = err
            announce = kind in PERSISTENT_KINDS and kind not in self._announced
            if kind in PERSISTENT_KINDS:
                self.persistent_error = err
                self._announced.add(kind)
            if kind == "unknown_model":
                self.model_ready = False
        if announce:
            log.error(
                "region '%s' fails for a reason that retrying will not fix (%s): %s; requests "
                "fall back to other regions or the local answer until this is fixed",
                self.name,
                kind,
                err,
            )
        return kind

    def record_answer(self) -> None:
        with self._lock:
            self.answered += 1
            self.consecutive_failures = 0
            self.persistent_error = None
            self.model_ready = True
            self._announced.clear()

    def status(self) -> dict[str, Any]:
        """A snapshot for `status` commands and logs."""
        return {
            "name": self.name,
            "state": self.breaker.state.value,
            "ready": self.model_ready,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "priority": self.priority,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": None if self.last_error is None else str(self.last_error),
        }

    def health(self) -> RegionHealth:
        """This region's health summary (see ``RegionHealth``)."""
        features = getattr(self.transport, "features", None)
        with self._lock:
            return RegionHealth(
                name=self.name,
                state=self.breaker.state.value,
                ready=self.model_ready,
                rtt_ms=None if self.rtt is None else round(self.rtt * 1000, 3),
                requests=self.requests,
                answered=self.answered,
                failures=self.failures,
                consecutive_failures=self.consecutive_failures,
                failures_by_kind=dict(self.failures_by_kind),
                persistent_error=(
                    None if self.persistent_error is None else str(self.persistent_error)
                ),
                last_error=None if self.last_error is None else str(self.last_error),
                features=dict(features) if isinstance(features, dict) else None,
            )

    def __repr__(self) -> str:
        return f"Region({self.name!r}, rtt={self.rtt}, state={self.breaker.state.value})"


@dataclass
class CloudOutcome:
    """What ``route`` got: the answer and who gave it, or every region's error."""

    response: InferResponse | None = None
    region: Region | None = None
    cloud_time: float = 0.0
    errors: dict[str, EdgeCloudError] = field(default_factory=dict)
    deadline_hit: bool = False


def as_edge_error(exc: BaseException, region: str) -> EdgeCloudError:
    if isinstance(exc, EdgeCloudError):
        return exc
    err = TransportError(f"region '{region}': {type(exc).__name__}: {exc}", region=region)
    err.__cause__ = exc
    return err


class RegionSelector:
    """Orders regions by health, priority and RTT, and fails over between them."""

    def __init__(
        self,
        regions: Sequence[Region],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        names = [r.name for r in regions]
        if len(set(names)) != len(names):
            raise ConfigError(f"region names must be unique, got {names}")
        self.regions = list(regions)
        self._clock = clock
        self._index = {r.name: i for i, r in enumerate(self.regions)}

    def __len__(self) -> int:
        return len(self.regions)

    def ordered(self) -> list[Region]:
        """Every region, best first: healthy by (priority, RTT, config order), then the rest."""

        def key(r: Region) -> tuple[int, int, int, float, int]:
            usable = 0 if r.breaker.available() else 1
            not_ready = 1 if r.model_ready is False else 0
            rtt = r.rtt if r.rtt is not None else float("inf")
            return (not_ready, usable, r.priority, rtt, self._index[r.name])

        return sorted(self.regions, key=key)

    def route(
        self,
        make_request: Callable[[Region], InferRequest],
        deadline: Deadline,
    ) -> CloudOutcome:
        """Try regions best first until one answers or the deadline runs out."""
        out = CloudOutcome()
        start = self._clock()
        for region in self.ordered():
            name = region.name
            left = deadline.remaining()
            if left < MIN_ATTEMPT:
                out.deadline_hit = True
                out.errors[name] = TransportTimeout(
                    f"region '{name}' not tried: the deadline left no time", region=name
                )
                continue
            if not region.breaker.allow():
                out.errors[name] = TransportError(
                    f"region '{name}' skipped: circuit open after "
                    f"{region.breaker.failures} consecutive failures",
                    region=name,
                )
                continue
            timeout = left if region.timeout is None else min(left, region.timeout)
            t0 = self._clock()
            region.requests += 1
            try:
                request = make_request(region)
                response = region.transport.infer(request, timeout=timeout)
            except Exception as exc:  # a user's transport or adapter may raise anything
                err = as_edge_error(exc, name)
                region.record_failure(err)
                region.breaker.record_failure()
                out.errors[name] = err
                if isinstance(err, TransportTimeout) and deadline.expired():
                    out.deadline_hit = True
                continue
            rtt = self._clock() - t0
            region.observe_rtt(rtt)
            region.record_answer()
            region.breaker.record_success()
            out.response = response
            out.region = region
            break
        out.cloud_time = self._clock() - start
        return out

    def status(self) -> list[dict[str, Any]]:
        return [r.status() for r in self.ordered()]

    def health(self) -> list[RegionHealth]:
        """Every region's health summary, in config order."""
        return [r.health() for r in self.regions]
