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

Measurements come from a ``HealthProber`` thread that asks every region's transport whether the
*model* it would be sent is ready (``Transport.model_ready``: for HTTP the V2
``/v2/models/{model}[/versions/{v}]/ready``, the server-level probe only where that path is not
routed) every ``interval`` seconds (also the half-open probe for regions whose breaker is cooling
down), and from real requests. A server can be up while its model is unknown or still loading: a
region whose model is not ready (by probe, or because it answered 404 for the model) sorts after
every region whose model is, whatever its priority or RTT, so it is chosen only when no other
region is left; a ready probe or an answer puts it back. A transport without a cheap probe
(``model_ready`` returns None) is judged by real requests alone.

Failures are classified (``failure_kind``): timeouts, refused connections, 429/503 overload and
5xx are transient; 401/403 (auth), malformed answers (protocol), 404 (unknown model) and other 4xx
(rejected) are not, and retrying them will not help. The first failure of a non-transient kind in
a region is logged at ERROR once (again only after the region answered in between), and every
region keeps counts by kind: ``RegionSelector.health`` is the per-region summary an application
(or its metrics exporter) reads.

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

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    EdgeCloudError,
    InputError,
    ProtocolError,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from edgecloud.routing.breaker import BreakerState, CircuitBreaker
from edgecloud.routing.deadline import Deadline
from edgecloud.transport.base import Transport
from edgecloud.transport.v2 import InferRequest, InferResponse

__all__ = [
    "PERSISTENT_KINDS",
    "CloudOutcome",
    "HealthProber",
    "Region",
    "RegionHealth",
    "RegionSelector",
    "failure_kind",
    "health_metrics",
]

log = logging.getLogger(__name__)

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


@dataclass
class CloudOutcome:
    """What ``route`` got: the answer and who gave it, or every region's error."""

    response: InferResponse | None = None
    region: Region | None = None
    cloud_time: float = 0.0
    errors: dict[str, EdgeCloudError] = field(default_factory=dict)
    deadline_hit: bool = False


def _as_edge_error(exc: BaseException, region: str) -> EdgeCloudError:
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
                err = _as_edge_error(exc, name)
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


class HealthProber:
    """Probes every region's readiness in a background thread, every ``interval`` seconds.

    ``probe_once`` does one round synchronously (what the thread runs, and what tests call).
    The thread is a daemon and ``stop`` ends it within one probe timeout.
    """

    def __init__(
        self,
        selector: RegionSelector,
        *,
        interval: float = 5.0,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        model_for: Callable[[Region], str | None] | None = None,
    ) -> None:
        """``model_for(region)`` names the model to probe (default: the region's ``model``)."""
        if not 0.01 <= interval <= 3600:
            raise ConfigError(f"probe interval must be in [0.01, 3600] seconds, got {interval}")
        if not timeout > 0:
            raise ConfigError(f"probe timeout must be > 0 seconds, got {timeout}")
        self.selector = selector
        self.interval = interval
        self.timeout = min(timeout, interval)
        self._clock = clock
        self._model_for = model_for or (lambda r: r.model)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe_once(self) -> None:
        for region in self.selector.regions:
            if self._stop.is_set():
                return
            self._probe(region)

    def _probe(self, region: Region) -> None:
        state = region.breaker.state
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN and not region.breaker.allow():
            return
        t0 = self._clock()
        try:
            probe = getattr(region.transport, "model_ready", None)
            if probe is None:  # a duck-typed transport that is not a ``Transport``
                ok = region.transport.ready(timeout=self.timeout)
            else:
                ok = probe(self._model_for(region), region.version, timeout=self.timeout)
        except Exception as exc:
            region.last_error = _as_edge_error(exc, region.name)
            region.breaker.record_failure()
            return
        if ok is None:
            if state is BreakerState.HALF_OPEN:
                region.breaker.release()
            return
        if ok:
            region.model_ready = True
            region.observe_rtt(self._clock() - t0)
            # A probe closes a half-open breaker, but must not wipe the failures that real
            # requests counted against a closed one: a region whose health endpoint (or, for
            # MQTT, whose broker) answers while its inference path fails would otherwise never
            # trip, and every request would wait out its timeout there.
            if state is BreakerState.HALF_OPEN:
                region.breaker.record_success()
        else:
            region.model_ready = False
            detail = getattr(region.transport, "ready_detail", None)
            region.last_error = TransportError(
                f"region '{region.name}' reports not ready" + (f": {detail}" if detail else ""),
                region=region.name,
            )
            region.breaker.record_failure()

    def start(self) -> HealthProber:
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="edgecloud-prober", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.probe_once()
            self._stop.wait(self.interval)

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(self.timeout + 1.0 if timeout is None else timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
