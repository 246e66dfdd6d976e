"""Readiness probes of every region, in a background thread.

Measurements come from a ``HealthProber`` thread that asks every region's transport whether the
*model* it would be sent is ready (``Transport.model_ready``: for HTTP the V2
``/v2/models/{model}[/versions/{v}]/ready``, the server-level probe only where that path is not
routed) every ``interval`` seconds (also the half-open probe for regions whose breaker is cooling
down), and from real requests. A server can be up while its model is unknown or still loading: a
region whose model is not ready (by probe, or because it answered 404 for the model) sorts after
every region whose model is, whatever its priority or RTT, so it is chosen only when no other
region is left; a ready probe or an answer puts it back. A transport without a cheap probe
(``model_ready`` returns None) is judged by real requests alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from edgecloud.errors import ConfigError, TransportError
from edgecloud.routing.breaker import BreakerState
from edgecloud.routing.regions import Region, RegionSelector, as_edge_error

__all__ = ["HealthProber"]


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
            region.last_error = as_edge_error(exc, region.name)
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
