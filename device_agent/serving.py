"""Local inference on the device: the client bound to the active model, and its metrics.

``AgentClient`` is the SDK's ``HybridClient`` (routing, cloud fallback, atomic ``swap_model``)
with what the agent adds: every answer is counted for telemetry and ``/metrics``, offered to
hard-example capture, and tagged with the version of the model that produced it
(``HybridResult.version``), so the local V2 endpoint can say which version answered even while a
deployment swaps models underneath.
Applications on the device call it in process as ``agent.client``; other processes reach it
through the local V2 endpoint. An old backend is closed only once its last request has
returned (``retire``), so no request fails because of a deployment.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecloud.client import HybridClient, HybridResult
from edgecloud.package import Manifest, ModelPackage
from edgecloud.routing.factory import RegionSpec
from edgecloud.routing.modes import Mode
from edgecloud.runtime.base import Backend

__all__ = ["AgentClient", "InferOutcome", "Metrics", "load_model"]

_CONF_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
_LAT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def load_model(pkg: ModelPackage) -> Backend:
    """Load a verified package into a backend (``edgecloud.runtime.load_backend``)."""
    from edgecloud.runtime import loader

    return loader.load_backend(pkg, public_key=None, warmup=True)


@dataclass(frozen=True)
class InferOutcome:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    route: str
    confidence: float | None
    latency_s: float
    result: HybridResult
    #: What the local model answered, also when the cloud's answer was returned (None when
    #: the local model did not run, e.g. ``cloud_only``).
    edge_outputs: dict[str, np.ndarray] | None = None
    edge_confidence: float | None = None


class Metrics:
    """Counters, a confidence histogram and latency percentiles (thread-safe, bounded memory)."""

    def __init__(self, window: int = 2048) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.routes: dict[str, int] = {"edge": 0, "cloud": 0, "degraded": 0}
        self.conf_counts = [0] * len(_CONF_BUCKETS)
        self.lat_counts = [0] * (len(_LAT_BUCKETS) + 1)
        self.lat_sum = 0.0
        self._recent: deque[float] = deque(maxlen=window)
        self.deployments = {"succeeded": 0, "failed": 0, "rejected": 0}
        # For the fleet console: local inference time alone, each region's round trips (only
        # requests that region answered first time, so a failover's wait is not charged to
        # it), the variant being served, and the client's region status (breaker, counters).
        self._window = window
        self._local: deque[float] = deque(maxlen=window)
        self._region_rtt: dict[str, deque[float]] = {}
        self.variant: dict[str, str] | None = None
        self.regions_source: Callable[[], Sequence[Mapping[str, Any]]] | None = None

    def observe(self, route: str, conf: float | None, latency_s: float) -> None:
        with self._lock:
            self.requests += 1
            self.routes[route] = self.routes.get(route, 0) + 1
            if conf is not None:
                i = min(bisect.bisect_left(_CONF_BUCKETS, conf), len(_CONF_BUCKETS) - 1)
                self.conf_counts[i] += 1
            self.lat_counts[bisect.bisect_left(_LAT_BUCKETS, latency_s)] += 1
            self.lat_sum += latency_s
            self._recent.append(latency_s)

    def observe_result(self, r: HybridResult) -> None:
        """Record how one answer was reached: local time and the answering region's trip."""
        with self._lock:
            if r.local_time > 0:
                self._local.append(r.local_time)
            region = r.region
            if region is not None and not r.errors:
                ring = self._region_rtt.get(region)
                if ring is None:
                    if len(self._region_rtt) >= 64:  # bounded: region names come from config
                        return
                    ring = self._region_rtt[region] = deque(maxlen=self._window)
                ring.append(r.cloud_time)

    def deployment(self, outcome: str) -> None:
        with self._lock:
            self.deployments[outcome] = self.deployments.get(outcome, 0) + 1

    def error(self) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        source = self.regions_source
        status = list(source()) if source is not None else []
        with self._lock:
            pct = _percentiles(self._recent, (50, 90, 95, 99))
            regions: dict[str, dict[str, Any]] = {}
            for st in status:
                name = str(st.get("name", ""))
                keep = ("state", "rtt_ms", "requests", "failures", "last_error")
                regions[name] = {k: st.get(k) for k in keep}
                regions[name]["latency"] = _percentiles(self._region_rtt.get(name, ()), (50, 95))
            return {
                "requests": self.requests,
                "errors": self.errors,
                "edge": self.routes.get("edge", 0),
                "cloud": self.routes.get("cloud", 0),
                "degraded": self.routes.get("degraded", 0),
                "confidence_histogram": {
                    f"{b:.1f}": n for b, n in zip(_CONF_BUCKETS, self.conf_counts, strict=True)
                },
                "latency": pct,
                "local_latency": _percentiles(self._local, (50, 95)),
                "regions": regions,
                "variant": dict(self.variant) if self.variant else None,
                "deployments": dict(self.deployments),
            }

    def prometheus(self, extra_gauges: Mapping[str, float] | None = None) -> str:
        """Text exposition format 0.0.4, written by hand (no prometheus_client on the device)."""
        with self._lock:
            lines = [
                "# HELP edgecloud_agent_requests_total Local inference requests by route.",
                "# TYPE edgecloud_agent_requests_total counter",
            ]
            for route, n in sorted(self.routes.items()):
                lines.append(f'edgecloud_agent_requests_total{{route="{route}"}} {n}')
            lines += [
                "# HELP edgecloud_agent_request_errors_total Requests that failed.",
                "# TYPE edgecloud_agent_request_errors_total counter",
                f"edgecloud_agent_request_errors_total {self.errors}",
                "# HELP edgecloud_agent_latency_seconds Local inference latency.",
                "# TYPE edgecloud_agent_latency_seconds histogram",
            ]
            cum = 0
            for b, n in zip(_LAT_BUCKETS, self.lat_counts, strict=False):
                cum += n
                lines.append(f'edgecloud_agent_latency_seconds_bucket{{le="{b}"}} {cum}')
            cum += self.lat_counts[-1]
            lines.append(f'edgecloud_agent_latency_seconds_bucket{{le="+Inf"}} {cum}')
            lines.append(f"edgecloud_agent_latency_seconds_sum {self.lat_sum:.6f}")
            lines.append(f"edgecloud_agent_latency_seconds_count {cum}")
            lines += [
                "# HELP edgecloud_agent_confidence Top-1 confidence of local answers.",
                "# TYPE edgecloud_agent_confidence histogram",
            ]
            cum = 0
            for b, n in zip(_CONF_BUCKETS, self.conf_counts, strict=True):
                cum += n
                le = "+Inf" if b >= 1.0 else f"{b}"
                lines.append(f'edgecloud_agent_confidence_bucket{{le="{le}"}} {cum}')
            lines.append(f"edgecloud_agent_confidence_count {cum}")
            lines += [
                "# HELP edgecloud_agent_deployments_total Deployments by outcome.",
                "# TYPE edgecloud_agent_deployments_total counter",
            ]
            for k, n in sorted(self.deployments.items()):
                lines.append(f'edgecloud_agent_deployments_total{{outcome="{k}"}} {n}')
        for name, value in sorted((extra_gauges or {}).items()):
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {value}")
        return "\n".join(lines) + "\n"


def _percentiles(values: Iterable[float], ps: Iterable[int]) -> dict[str, float | None]:
    """``{"p50_ms": ...}`` of a window of seconds (nearest rank; None when empty)."""
    v = sorted(values)
    return {
        f"p{p}_ms": round(v[min(len(v) - 1, int(len(v) * p / 100))] * 1e3, 3) if v else None
        for p in ps
    }


def _top1(outputs: Mapping[str, np.ndarray] | None, manifest: Manifest | None) -> float | None:
    """The least confident row's top-1 probability of a local answer (None if undefined)."""
    if outputs is None or manifest is None or manifest.confidence == "none":
        return None
    arr = outputs.get(manifest.score_output)
    if arr is None or np.asarray(arr).size == 0:
        return None
    a = np.asarray(arr, dtype=np.float64)
    a = a.reshape(-1, a.shape[-1])
    if manifest.confidence == "logits":
        e = np.exp(a - a.max(axis=1, keepdims=True))
        a = e / e.sum(axis=1, keepdims=True)
    return float(a.max(axis=1).min())


class AgentClient(HybridClient):
    """``HybridClient`` bound to the agent's active model; see the module docstring.

    Uses only ``HybridClient``'s public API: ``set_policy``/``mode`` for the fleet's policy,
    ``HybridResult.version``/``local_outputs`` for which model answered and what it said.
    """

    def __init__(
        self,
        *,
        mode: str = "edge_first",
        threshold: float | None = None,
        regions: Sequence[RegionSpec] = (),
        metrics: Metrics | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, threshold=threshold, regions=regions, **kwargs)
        self.metrics = metrics or Metrics()
        self.metrics.regions_source = self.regions_status
        self._note_variant(self.backend)
        self.on_answer: list[Callable[[Mapping[str, Any], InferOutcome], None]] = []
        # Reported to the fleet also before the first model arrives (the client's own
        # ``threshold`` is the active model's, None without one).
        self._policy_threshold = threshold
        self._retiring: set[Backend] = set()
        self._retiring_lock = threading.Lock()

    @property
    def threshold(self) -> float | None:
        t = super().threshold
        return t if t is not None else self._policy_threshold

    def set_policy(
        self,
        *,
        mode: Mode | str | None = None,
        threshold: float | Mapping[str, float] | None = None,
    ) -> None:
        """Apply a routing policy from the fleet to new requests (``HybridClient.set_policy``)."""
        super().set_policy(mode=mode, threshold=threshold)
        if threshold is not None and not isinstance(threshold, Mapping):
            self._policy_threshold = float(threshold)

    def swap_model(self, backend: Backend, manifest: Manifest) -> Backend | None:
        """Make ``backend`` serve new requests; return the old one (still finishing requests)."""
        old = super().swap_model(backend, manifest)
        self._note_variant(backend)
        if old is not None:
            with self._retiring_lock:
                self._retiring.add(old)
        return old

    def _note_variant(self, backend: Backend | None) -> None:
        """Telemetry names the variant served (fp32, int8, a TensorRT engine...)."""
        v = getattr(backend, "variant", None)
        self.metrics.variant = (
            None
            if v is None
            else {
                "name": str(getattr(v, "name", "")),
                "precision": str(getattr(v, "precision", "")),
                "format": str(getattr(v, "format", "")),
            }
        )

    def retire(self, backend: Backend, timeout: float = 60.0) -> bool:
        """Close ``backend`` once its in-flight requests are done (or after ``timeout``)."""
        done = self.wait_drained(backend, timeout)
        with self._retiring_lock:
            self._retiring.discard(backend)
        backend.close()
        return done

    def infer(
        self, inputs: Mapping[str, Any], *, deadline: float | None = None, mode: Any = None,
        threshold: float | None = None, escalate: str | None = None,
    ) -> HybridResult:  # fmt: skip
        return self.answer(
            inputs, deadline=deadline, mode=mode, threshold=threshold, escalate=escalate
        ).result

    def answer(
        self, inputs: Mapping[str, Any], *, deadline: float | None = None, mode: Any = None,
        threshold: float | None = None, escalate: str | None = None,
    ) -> InferOutcome:  # fmt: skip
        """``infer`` plus the version that answered and the route taken, for the endpoint."""
        t0 = time.perf_counter()
        try:
            r = super().infer(
                inputs, deadline=deadline, mode=mode, threshold=threshold, escalate=escalate
            )
        except Exception:
            self.metrics.error()
            raise
        dt = time.perf_counter() - t0
        region = r.region
        route = "degraded" if r.degraded else ("cloud" if region is not None else "edge")
        self.metrics.observe(route, r.confidence, dt)
        self.metrics.observe_result(r)
        if region is None:
            edge_outputs: dict[str, np.ndarray] | None = r.outputs
            edge_conf = r.confidence
        else:  # the cloud answered: hard examples are judged by what the edge said
            edge_outputs = r.local_outputs
            edge_conf = _top1(edge_outputs, self.manifest)
        outcome = InferOutcome(
            outputs=r.outputs,
            model=r.model or (self.manifest.name if self.manifest else ""),
            version=r.version,
            route=route,
            confidence=r.confidence,
            latency_s=dt,
            result=r,
            edge_outputs=edge_outputs,
            edge_confidence=edge_conf,
        )
        for hook in self.on_answer:
            hook(inputs, outcome)
        return outcome

    def close(self) -> None:
        backend = self.backend
        with self._retiring_lock:
            retired = list(self._retiring)
            self._retiring.clear()
        super().close()
        for b in [backend, *retired]:
            if b is not None:
                b.close()
