"""Local inference on the device: the client bound to the active model, and its metrics.

``LocalClient`` is what applications on the device call (in process as ``agent.client``, or over
the local V2 endpoint). Its model can be replaced while requests run: ``swap_model`` exchanges
one reference under a lock, a request reads that reference once at its start, so requests in
flight finish on the old model and new ones use the new one; the old backend is closed only
when its last request has returned (``retire``), so no request fails because of a deployment.

Routing beyond the device (cloud regions, confidence threshold) belongs to
``edgecloud.client.HybridClient``; until the agent is wired to it, an answer whose confidence is
below the threshold is still answered locally and counted as ``degraded`` when regions are
configured but unreachable from here (see docs/agent.md).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecloud.errors import RuntimeBackendError
from edgecloud.package import Manifest, ModelPackage
from edgecloud.runtime.base import Backend

__all__ = ["InferOutcome", "LocalClient", "Metrics", "confidence_of", "load_model"]

_CONF_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
_LAT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def load_model(pkg: ModelPackage) -> Backend:
    """Load a verified package into a backend (``edgecloud.runtime.load_backend``)."""
    from edgecloud.runtime import loader

    return loader.load_backend(pkg, public_key=None, warmup=True)


def confidence_of(outputs: Mapping[str, np.ndarray], manifest: Manifest) -> float | None:
    """The top-1 probability of the first sample (softmax of logits), or None if undefined."""
    if manifest.confidence == "none":
        return None
    arr = outputs.get(manifest.score_output)
    if arr is None:
        return None
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 0 or a.size == 0:
        return None
    row = a.reshape(-1, a.shape[-1])[0]
    if manifest.confidence == "logits":
        e = np.exp(row - row.max())
        row = e / e.sum()
    c = float(row.max())
    return c if math.isfinite(c) else None


@dataclass(frozen=True)
class InferOutcome:
    outputs: dict[str, np.ndarray]
    model: str
    version: str
    route: str
    confidence: float | None
    latency_s: float


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

    def error(self) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            recent = sorted(self._recent)
            pct = {}
            for p in (50, 90, 99):
                pct[f"p{p}_ms"] = (
                    round(recent[min(len(recent) - 1, int(len(recent) * p / 100))] * 1e3, 3)
                    if recent
                    else None
                )
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


class _Slot:
    """One loaded model and the number of requests running on it."""

    __slots__ = ("backend", "drained", "inflight", "manifest")

    def __init__(self, backend: Backend, manifest: Manifest) -> None:
        self.backend = backend
        self.manifest = manifest
        self.inflight = 0
        self.drained = threading.Condition(threading.Lock())


class LocalClient:
    """The device's inference client, bound to the agent's active model."""

    def __init__(
        self,
        backend: Backend | None = None,
        manifest: Manifest | None = None,
        *,
        mode: str = "edge_first",
        threshold: float = 0.6,
        regions: tuple[str, ...] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._slot = _Slot(backend, manifest) if backend is not None and manifest else None
        self._retiring: dict[int, _Slot] = {}
        self.mode = mode
        self.threshold = threshold
        self.regions = regions
        self.metrics = metrics or Metrics()
        self.on_answer: list[Any] = []

    @property
    def manifest(self) -> Manifest | None:
        s = self._slot
        return s.manifest if s is not None else None

    @property
    def backend(self) -> Backend | None:
        s = self._slot
        return s.backend if s is not None else None

    def set_policy(self, mode: str, threshold: float) -> None:
        self.mode = mode
        self.threshold = threshold

    def swap_model(self, backend: Backend, manifest: Manifest) -> Backend | None:
        """Make ``backend`` serve new requests; return the old one (still finishing requests)."""
        new = _Slot(backend, manifest)
        with self._lock:
            old, self._slot = self._slot, new
            if old is not None:
                self._retiring[id(old.backend)] = old
        return old.backend if old is not None else None

    def retire(self, backend: Backend, timeout: float = 60.0) -> bool:
        """Close ``backend`` once its in-flight requests are done (or after ``timeout``)."""
        with self._lock:
            slot = self._retiring.pop(id(backend), None)
        if slot is None:
            backend.close()
            return True
        with slot.drained:
            done = slot.drained.wait_for(lambda: slot.inflight == 0, timeout=timeout)
        slot.backend.close()
        return bool(done)

    def infer(self, inputs: Mapping[str, Any]) -> InferOutcome:
        """Run the active model; the model is chosen once, at the start of the request."""
        with self._lock:
            slot = self._slot
            if slot is None:
                raise RuntimeBackendError("no model is active on this device yet")
            with slot.drained:
                slot.inflight += 1
        t0 = time.perf_counter()
        try:
            outputs = slot.backend.infer(inputs)
        except Exception:
            self.metrics.error()
            raise
        finally:
            with slot.drained:
                slot.inflight -= 1
                if slot.inflight == 0:
                    slot.drained.notify_all()
        dt = time.perf_counter() - t0
        conf = confidence_of(outputs, slot.manifest)
        route = "edge"
        if conf is not None and conf < self.threshold and self.regions and self.mode != "edge_only":
            route = "degraded"
        self.metrics.observe(route, conf, dt)
        outcome = InferOutcome(
            outputs=outputs,
            model=slot.manifest.name,
            version=slot.manifest.version,
            route=route,
            confidence=conf,
            latency_s=dt,
        )
        for hook in self.on_answer:
            hook(inputs, outcome)
        return outcome

    def close(self) -> None:
        with self._lock:
            slot, self._slot = self._slot, None
            retiring = list(self._retiring.values())
            self._retiring.clear()
        for s in ([slot] if slot else []) + retiring:
            s.backend.close()

