"""Prometheus metrics of a cloud region (requests, latency, batch sizes, queue depth).

prometheus-client (extra ``cloud``) is imported when a region's app is built, never at import.
"""

from __future__ import annotations

import logging
from typing import Any

from edgecloud import __version__ as _edgecloud_version
from edgecloud.cloud.core import BatchEvent, ServingCore
from edgecloud.deps import require

__all__ = ["RegionMetrics"]

log = logging.getLogger(__name__)


class RegionMetrics:
    """Prometheus metrics in a registry of their own, so several servers fit in one process."""

    def __init__(self, core: ServingCore, region: str) -> None:
        prom = require("prometheus_client", "cloud", "the cloud server's /metrics")
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "edgecloud_cloud_requests",
            "Inference requests by model and HTTP status",
            ["model", "status"],
            registry=r,
        )
        self.latency = prom.Histogram(
            "edgecloud_cloud_request_seconds",
            "Inference request latency inside the server (decode, queue, run, encode)",
            ["model"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.batch_rows = prom.Histogram(
            "edgecloud_cloud_batch_size",
            "Rows per onnxruntime run (dynamic batching joins requests along dim 0)",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_requests = prom.Histogram(
            "edgecloud_cloud_batch_requests",
            "Requests joined into one onnxruntime run",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.run_seconds = prom.Histogram(
            "edgecloud_cloud_run_seconds",
            "onnxruntime time per batch",
            ["model"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1),
            registry=r,
        )
        depth = prom.Gauge(
            "edgecloud_cloud_queue_depth", "Requests waiting for a batch", ["model"], registry=r
        )
        for m in core.models():
            depth.labels(m).set_function(lambda m=m: core.queue_depth(m))
        info = prom.Info("edgecloud_cloud", "Cloud region server", registry=r)
        info.info({"region": region, "version": _edgecloud_version})
        core.add_listener(self.on_batch)
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        """Count one request; the labelled children are cached (``labels()`` takes a lock and
        builds a key on every call, a measurable share of a small request's CPU)."""
        children = self._request_children.get((model, status))
        if children is None:
            children = (
                self.requests.labels(model, str(status)),
                self.latency.labels(model),
            )
            self._request_children[(model, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_batch(self, ev: BatchEvent) -> None:
        self.batch_rows.labels(ev.model).observe(ev.rows)
        self.batch_requests.labels(ev.model).observe(ev.requests)
        self.run_seconds.labels(ev.model).observe(ev.seconds)

    def render(self) -> bytes:
        return bytes(self.prom.generate_latest(self.registry))
