"""The transport-agnostic serving core of a cloud region: model repository, batching.

Models run through the runtime's ``Backend`` seam (``edgecloud.runtime``): the same
``OnnxRuntimeBackend``, the same input validator (with the region's V2 wording) and the same
variant choice (``select_variant(prefer="accuracy")``) as on a device; this module adds only
what a region has and a device has not: a repository of versions, queues and batching.

HTTP (``edgecloud.cloud.server``) and the MQTT workers (``edgecloud.cloud.mqtt_worker``) both hand
decoded V2 requests to one ``ServingCore``, so a region batches, validates and fails the same way
whichever transport a device used, and ``status_for`` gives both the same V2 error status.

The parts: ``edgecloud.cloud.repository`` (the directory of versions), ``edgecloud.cloud.batcher``
(one model version's queue and batcher), this module (the region's one entry, ``ServingCore``,
and the V2 status of its errors).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecloud.cloud.batcher import (
    BatchEvent,
    DeadlineExceeded,
    ModelWorker,
    OverloadedError,
    _v2,
)
from edgecloud.cloud.repository import (
    PLAIN_MODEL_FILE,
    ModelEntry,
    ModelNotFoundError,
    ModelRepository,
    parse_version,
)
from edgecloud.errors import (
    ConfigError,
    EdgeCloudError,
    InputError,
    IntegrityError,
    ProtocolError,
    RemoteError,
    RuntimeBackendError,
    SignatureError,
    TransportTimeout,
)
from edgecloud.package import TensorSpec
from edgecloud.transport.v2 import InferRequest, InferResponse

__all__ = [
    "PLAIN_MODEL_FILE",
    "BatchEvent",
    "DeadlineExceeded",
    "ModelEntry",
    "ModelNotFoundError",
    "ModelRepository",
    "OverloadedError",
    "ServingCore",
    "parse_version",
    "status_for",
]

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"


def status_for(exc: BaseException) -> int:
    """The HTTP status (and V2 error status over MQTT) for an error raised while serving."""
    if isinstance(exc, RemoteError) and exc.status is not None:
        return exc.status
    if isinstance(exc, InputError | ProtocolError):
        return 400
    if isinstance(exc, TransportTimeout):
        return 504
    return 500


class ServingCore:
    """Sessions and dynamic batchers for every model of a repository; thread-safe.

    ``max_batch_size=1`` turns batching off (each request runs alone). ``max_queue`` bounds the
    requests waiting per model version. ``idle_fast=False`` makes every batch wait the full
    ``max_queue_delay_ms`` after its first request, even a lone one (Triton's behaviour with a
    queue delay set): the most rows per run, at the price of that delay on every quiet request.
    The latest version of every model is loaded at start so that ``ready`` is true only for a
    region that can answer; other versions load on first use.
    """

    def __init__(
        self,
        repository: ModelRepository | Path | str,
        *,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue: int = 1024,
        intra_op_threads: int | None = None,
        preload: bool = True,
        idle_fast: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_ms < 0:
            raise ConfigError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        if max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
        if intra_op_threads is not None and intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
        self.repository = (
            repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        )
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_ms / 1000.0
        self.max_queue = max_queue
        self.intra_op_threads = intra_op_threads
        self.idle_fast = idle_fast
        self._workers: dict[tuple[str, str], ModelWorker] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._listeners: list[Callable[[BatchEvent], None]] = []
        self._stats_lock = threading.Lock()
        self._batch_rows: Counter[int] = Counter()
        self._batch_requests: Counter[int] = Counter()
        #: model name -> why it could not be loaded at start (the others still serve)
        self.unavailable: dict[str, str] = {}
        if preload:
            for name in self.repository.models():
                try:
                    self._worker(name, None)
                except (IntegrityError, SignatureError):
                    raise  # a tampered package fails the region loudly, as before
                except EdgeCloudError as exc:  # one bad model (a ZipMap output...) is not all
                    log.error("model '%s' is not served: %s", name, exc)
                    self.unavailable[name] = str(exc)
            if self.unavailable and len(self.unavailable) == len(self.repository.models()):
                raise ConfigError(
                    f"model repository {self.repository.path}: no model can be served: "
                    + "; ".join(f"{k}: {v}" for k, v in self.unavailable.items())
                )

    # -- public API
    def submit(
        self, request: InferRequest, *, deadline: float | None = None
    ) -> concurrent.futures.Future[InferResponse]:
        """Queue ``request``; the future holds the response or an ``EdgeCloudError``.

        Validation, unknown models and a full queue fail here, synchronously. ``deadline`` is a
        ``time.monotonic()`` instant after which a still-queued request is dropped (504).
        """
        if self._closed:
            raise RuntimeBackendError("serving core is closed")
        return self._worker(request.model, request.version).submit(request, deadline)

    def infer(self, request: InferRequest, *, timeout: float | None = None) -> InferResponse:
        """Blocking convenience around ``submit``."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        fut = self.submit(request, deadline=deadline)
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise DeadlineExceeded(f"no answer from model '{request.model}' in time") from exc

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """V2 model metadata; dynamic dims are -1."""
        w = self._worker(name, version)

        def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
            return [
                {
                    "name": s.name,
                    "datatype": _v2(s.dtype),
                    "shape": [d if isinstance(d, int) else -1 for d in s.shape],
                }
                for s in specs
            ]

        return {
            "name": name,
            "versions": self.repository.versions(name),
            "platform": PLATFORM,
            "inputs": tensors(w.entry.inputs),
            "outputs": tensors(w.entry.outputs),
        }

    def ready(self, name: str, version: str | None = None) -> bool:
        """Whether the model version is loaded and its batcher alive; False for unknown models."""
        if self._closed:
            return False
        try:
            w = self._worker(name, version)
        except EdgeCloudError:
            return False
        return w.thread.is_alive()

    def models(self) -> list[str]:
        return self.repository.models()

    def queue_depth(self, name: str | None = None) -> int:
        """Requests waiting (not yet running), for one model or all."""
        with self._lock:
            workers = list(self._workers.values())
        return sum(w.queue_depth() for w in workers if name is None or w.entry.name == name)

    def add_listener(self, fn: Callable[[BatchEvent], None]) -> None:
        """Call ``fn(event)`` after every batch, in the batcher thread (keep it fast)."""
        self._listeners.append(fn)

    def stats(self) -> dict[str, Any]:
        """Counts of batches by rows and by requests: shows whether batching happens."""
        with self._stats_lock:
            rows = dict(sorted(self._batch_rows.items()))
            reqs = dict(sorted(self._batch_requests.items()))
        return {
            "batches": sum(reqs.values()),
            "requests": sum(k * v for k, v in reqs.items()),
            "max_requests_per_batch": max(reqs, default=0),
            "batch_rows": rows,
            "batch_requests": reqs,
        }

    def close(self) -> None:
        """Stop batchers; queued requests fail with RuntimeBackendError. Idempotent."""
        self._closed = True
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.close()

    def __enter__(self) -> ServingCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals
    def _worker(self, name: str, version: str | None) -> ModelWorker:
        v = self.repository.resolve(name, version)
        with self._lock:
            w = self._workers.get((name, v))
            if w is not None:
                return w
        entry = self.repository.entry(name, v)
        with self._lock:
            w = self._workers.get((name, v))
            if w is None:
                if self._closed:
                    raise RuntimeBackendError("serving core is closed")
                w = ModelWorker(self, entry)
                self._workers[(name, v)] = w
            return w

    def _record(self, event: BatchEvent) -> None:
        with self._stats_lock:
            self._batch_rows[event.rows] += 1
            self._batch_requests[event.requests] += 1
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:  # a metrics bug must not kill the batcher
                log.exception("batch listener failed")
