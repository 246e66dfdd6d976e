"""The transport-agnostic serving core of a cloud region: model repository, sessions, batching.

HTTP (``edgecloud.cloud.server``) and the MQTT workers (``edgecloud.cloud.mqtt_worker``) both hand
decoded V2 requests to one ``ServingCore``, so a region batches, validates and fails the same way
whichever transport a device used, and ``status_for`` gives both the same V2 error status.

Repository layout, as Triton's::

    <repo>/<model>/<version>/manifest.json + variant files   (an edgecloud package, verified)
    <repo>/<model>/<version>/model.onnx                      (a plain ONNX model)

The latest version (highest number, else lexicographically last name) answers requests that name
none. Layout errors are raised when the repository is opened, naming the directory, so a region
that starts is a region that can serve.

Dynamic batching: one batcher thread per loaded model version takes the first waiting request and
everything compatible that is already queued (same inputs, dtypes and non-batch dims), concatenates
them along dim 0, runs onnxruntime once and splits the outputs back. It is idle-fast: a request
that finds nothing else queued, when the previous batch was a lone request too, runs at once,
so one client at a time (how devices fall back to the cloud) never waits for a batch. Only while
requests actually arrive together (the previous batch held more than one) does the batcher wait
for more, until ``max_batch_size`` rows, ``max_queue_delay_ms`` after the first arrival, or a
quarter of that delay without a new arrival, whichever comes first; load therefore grows batches
as Triton's dynamic batcher does, a closed loop of clients that are all in the batch already does
not wait out the window, and a quiet model pays at most one short wait before it is back to
dispatching at once. A request larger than the batch runs alone. The
queue is bounded; when it is full ``submit`` fails at once with ``OverloadedError`` (503) rather
than letting latency grow without bound.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.errors import (
    ConfigError,
    DTypeError,
    EdgeCloudError,
    InputError,
    IntegrityError,
    PackageError,
    ProtocolError,
    RemoteError,
    RuntimeBackendError,
    ShapeError,
    SignatureError,
    TransportTimeout,
)
from edgecloud.package import MANIFEST_FILE, ModelPackage, TensorSpec, verify_package
from edgecloud.transport.compact import upcast_input
from edgecloud.transport.v2 import DTYPE_TO_V2, InferRequest, InferResponse

__all__ = [
    "BatchEvent",
    "DeadlineExceeded",
    "ModelEntry",
    "ModelNotFoundError",
    "ModelRepository",
    "OverloadedError",
    "ServingCore",
    "status_for",
]

log = logging.getLogger(__name__)

PLAIN_MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
# Variant preference on a CPU region: full precision first (the cloud is the accurate fallback),
# then INT8, then FP16 (slow on most CPUs).
_PRECISION_ORDER = {"fp32": 0, "float32": 0, "int8": 1, "fp16": 2, "float16": 2}


class ModelNotFoundError(RemoteError, LookupError):
    """No such model or version in the region's repository (V2 status 404)."""

    def __init__(self, message: str, *, region: str | None = None) -> None:
        super().__init__(message, region=region, status=404)


class OverloadedError(RemoteError):
    """The model's queue is full; the caller should try another region or later (503)."""

    def __init__(self, message: str, *, region: str | None = None) -> None:
        super().__init__(message, region=region, status=503)


class DeadlineExceeded(TransportTimeout):
    """The request's deadline passed while it waited in the queue (504)."""


def status_for(exc: BaseException) -> int:
    """The HTTP status (and V2 error status over MQTT) for an error raised while serving."""
    if isinstance(exc, RemoteError) and exc.status is not None:
        return exc.status
    if isinstance(exc, InputError | ProtocolError):
        return 400
    if isinstance(exc, TransportTimeout):
        return 504
    return 500


# --------------------------------------------------------------------------------- repository


@dataclass(frozen=True)
class ModelEntry:
    """One version of one model in the repository, with the file that will be loaded."""

    name: str
    version: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    package: ModelPackage | None = None
    variant: str | None = None


def _version_key(v: str) -> tuple[int, int, str]:
    return (1, int(v), v) if v.isdigit() else (0, 0, v)


def _ort_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input/output specs of a plain ONNX file, read from a throwaway session."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise PackageError(f"{path}: onnxruntime cannot load it: {exc}") from exc

    def spec(a: Any) -> TensorSpec:
        dtype = _ORT_TYPES.get(a.type)
        if dtype is None:
            raise PackageError(f"{path}: tensor '{a.name}' has unsupported type {a.type}")
        dims = tuple(d if isinstance(d, int) else (d or "?") for d in a.shape)
        return TensorSpec(a.name, dtype, dims)

    return tuple(spec(a) for a in sess.get_inputs()), tuple(spec(a) for a in sess.get_outputs())


class ModelRepository:
    """A Triton-like model repository directory, scanned and checked when opened.

    Packages are verified (hashes always; the signature too when ``public_key`` is given, and then
    an unsigned package is refused).
    """

    def __init__(self, path: Path | str, *, public_key: Any = None) -> None:
        self.path = Path(path)
        self.public_key = public_key
        if not self.path.is_dir():
            raise ConfigError(f"model repository {self.path} does not exist or is not a directory")
        self._versions: dict[str, dict[str, Path]] = {}
        for model_dir in sorted(p for p in self.path.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            versions = {
                v.name: v for v in model_dir.iterdir() if v.is_dir() and not v.name.startswith(".")
            }
            if not versions:
                raise ConfigError(
                    f"model repository {self.path}: model '{model_dir.name}' has no version "
                    f"directory (expected {model_dir}/<version>/{PLAIN_MODEL_FILE} or a package)"
                )
            for vdir in versions.values():
                if not (vdir / MANIFEST_FILE).is_file() and not (vdir / PLAIN_MODEL_FILE).is_file():
                    raise ConfigError(
                        f"model repository {self.path}: {vdir} holds no model "
                        f"(expected {MANIFEST_FILE} of a package or {PLAIN_MODEL_FILE})"
                    )
            self._versions[model_dir.name] = versions
        if not self._versions:
            raise ConfigError(
                f"model repository {self.path} is empty: expected <model>/<version>/"
                f"{PLAIN_MODEL_FILE} or <model>/<version>/{MANIFEST_FILE}"
            )
        self._entries: dict[tuple[str, str], ModelEntry] = {}
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, oldest first; raises ``ModelNotFoundError``."""
        if name not in self._versions:
            raise ModelNotFoundError(
                f"model '{name}' is not in this repository (models: {', '.join(self.models())})"
            )
        return sorted(self._versions[name], key=_version_key)

    def resolve(self, name: str, version: str | None = None) -> str:
        """The version that answers for ``(name, version)``: the latest when ``version`` is None."""
        versions = self.versions(name)
        if version is None or version == "":
            return versions[-1]
        if version not in self._versions[name]:
            raise ModelNotFoundError(
                f"model '{name}' has no version '{version}' (versions: {', '.join(versions)})"
            )
        return version

    def entry(self, name: str, version: str | None = None) -> ModelEntry:
        """Load (verify, read specs of) one version; cached."""
        v = self.resolve(name, version)
        with self._lock:
            cached = self._entries.get((name, v))
            if cached is None:
                cached = self._load(name, v, self._versions[name][v])
                self._entries[(name, v)] = cached
            return cached

    def _load(self, name: str, version: str, vdir: Path) -> ModelEntry:
        if (vdir / MANIFEST_FILE).is_file():
            pkg = verify_package(
                vdir, self.public_key, require_signature=self.public_key is not None
            )
            onnx = [v for v in pkg.manifest.variants if v.format == "onnx"]
            cpu = [v for v in onnx if v.target in ("cpu", "any", "")] or onnx
            if not cpu:
                raise PackageError(
                    f"{vdir}: package '{pkg.manifest.name}' has no ONNX variant a CPU region "
                    f"can run (variants: {', '.join(v.name for v in pkg.manifest.variants)})"
                )
            best = min(cpu, key=lambda v: _PRECISION_ORDER.get(v.precision.lower(), 9))
            return ModelEntry(
                name=name,
                version=version,
                path=pkg.path_of(best),
                inputs=pkg.manifest.inputs,
                outputs=pkg.manifest.outputs,
                package=pkg,
                variant=best.name,
            )
        path = vdir / PLAIN_MODEL_FILE
        inputs, outputs = _ort_specs(path)
        return ModelEntry(name=name, version=version, path=path, inputs=inputs, outputs=outputs)


# ------------------------------------------------------------------------------------ batching


@dataclass(frozen=True)
class BatchEvent:
    """What one onnxruntime run did; passed to listeners (metrics)."""

    model: str
    version: str
    rows: int
    requests: int
    seconds: float


@dataclass
class _Item:
    request: InferRequest
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    future: concurrent.futures.Future[InferResponse]
    deadline: float | None
    enqueued: float = field(default_factory=time.monotonic)


def _v2(dtype: str) -> str:
    return DTYPE_TO_V2[np.dtype(dtype)]


class _ModelWorker:
    """One loaded model version: its onnxruntime session, its queue and its batcher thread."""

    def __init__(self, core: ServingCore, entry: ModelEntry) -> None:
        import onnxruntime as ort

        self.core = core
        self.entry = entry
        opts = ort.SessionOptions()
        # No busy-waiting between runs: onnxruntime's spinning threads would take the cores the
        # HTTP event loop and the MQTT workers need to decode the next requests.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if core.intra_op_threads is not None:
            opts.intra_op_num_threads = core.intra_op_threads
        try:
            self.session = ort.InferenceSession(
                str(entry.path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise RuntimeBackendError(
                f"model '{entry.name}' version {entry.version}: onnxruntime cannot load "
                f"{entry.path}: {exc}"
            ) from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Batch along dim 0 only when every input and output has a symbolic leading dim.
        self.batchable = all(
            s.shape and isinstance(s.shape[0], str) for s in (*entry.inputs, *entry.outputs)
        )
        # A deque under one condition rather than queue.Queue: the batcher takes everything that
        # is waiting in one lock hold instead of one lock round trip (and notify) per request.
        self._items: deque[_Item | None] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._specs = {s.name: s for s in entry.inputs}
        self._first_input = entry.inputs[0].name if entry.inputs else ""
        self.thread = threading.Thread(
            target=self._run, name=f"batcher-{entry.name}-{entry.version}", daemon=True
        )
        self.thread.start()

    # -- validation, in the caller's thread so bad input never occupies the queue
    def validate(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int, tuple[Any, ...]]:
        specs = self._specs
        model = f"model '{self.entry.name}'"
        unknown = sorted(set(request.inputs) - specs.keys())
        if unknown:
            raise InputError(
                f"{model} has no input '{unknown[0]}' (inputs: {', '.join(specs)})",
                input_name=unknown[0],
            )
        missing = [n for n in specs if n not in request.inputs]
        if missing:
            raise InputError(f"{model}: input '{missing[0]}' is missing", input_name=missing[0])
        bad_out = [o for o in request.outputs if o not in self.output_names]
        if bad_out:
            raise InputError(
                f"{model} has no output '{bad_out[0]}' (outputs: {', '.join(self.output_names)})"
            )
        feed: dict[str, np.ndarray] = {}
        rows = 1
        key: list[Any] = [tuple(request.outputs)]
        for name, spec in specs.items():
            arr = np.asarray(request.inputs[name])
            want = np.dtype(spec.dtype)
            arr = upcast_input(request, arr, want, model=model)  # declared FP16 upstream only
            if arr.dtype != want:
                raise DTypeError(
                    f"{model} input '{name}': expected datatype {_v2(spec.dtype)}, got "
                    f"{DTYPE_TO_V2.get(arr.dtype, str(arr.dtype))}",
                    input_name=name,
                )
            shape_txt = [d if isinstance(d, int) else -1 for d in spec.shape]
            if arr.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(spec.shape, arr.shape, strict=False)
            ):
                raise ShapeError(
                    f"{model} input '{name}': expected shape {shape_txt}, got {list(arr.shape)}",
                    input_name=name,
                )
            if self.batchable:
                if arr.shape[0] == 0:
                    raise ShapeError(
                        f"{model} input '{name}': batch dimension is 0", input_name=name
                    )
                if name == self._first_input:
                    rows = int(arr.shape[0])
                elif arr.shape[0] != rows:
                    raise ShapeError(
                        f"{model} input '{name}': batch size {arr.shape[0]} differs from "
                        f"{rows} of input '{self.entry.inputs[0].name}'",
                        input_name=name,
                    )
            key.append((name, arr.shape[1:]))
            feed[name] = np.ascontiguousarray(arr)
        return feed, rows, tuple(key)

    def submit(
        self, request: InferRequest, deadline: float | None
    ) -> concurrent.futures.Future[InferResponse]:
        feed, rows, key = self.validate(request)
        fut: concurrent.futures.Future[InferResponse] = concurrent.futures.Future()
        item = _Item(request, feed, rows, key, fut, deadline)
        with self._cond:
            if len(self._items) >= self.core.max_queue:
                raise OverloadedError(
                    f"model '{self.entry.name}' is overloaded: {self.core.max_queue} requests are "
                    "already queued"
                )
            self._items.append(item)
            self._cond.notify()
        return fut

    def queue_depth(self) -> int:
        return sum(1 for it in tuple(self._items) if it is not None)

    # -- the batcher thread
    def _run(self) -> None:
        pending: list[_Item] = []  # taken from the queue but incompatible with the last batch
        limit = self.core.max_batch_size if self.batchable else 1
        last_requests = 1  # requests in the previous batch: > 1 means requests arrive together
        idle_fast = self.core.idle_fast
        gap = self.core.max_queue_delay / 4  # idle-fast: no arrival for this long ends a wait
        while True:
            if pending:
                first: _Item | None = pending.pop(0)
            else:
                with self._cond:
                    while not self._items:
                        self._cond.wait()
                    first = self._items.popleft()
            if first is None:
                break
            batch = [first]
            rows = first.rows
            keep: list[_Item] = []
            for it in pending:
                if it.key == first.key and rows + it.rows <= limit:
                    batch.append(it)
                    rows += it.rows
                else:
                    keep.append(it)
            pending = keep
            until = first.enqueued + self.core.max_queue_delay
            last_arrival = max(it.enqueued for it in batch)
            stop = False
            # Requests that queued while the previous batch ran are taken at once (no waiting:
            # ``until`` has passed), so batches grow with the load, as Triton's dynamic batcher's.
            # Idle-fast: an empty queue is waited on only while requests arrive together
            # (``last_requests`` > 1, or this batch already holds more than one), and only while
            # they keep arriving: a gap of a quarter of the delay without one ends the wait (in a
            # closed loop every client may already be in the batch). A lone request runs at once.
            with self._cond:
                while rows < limit and len(pending) < limit:
                    if not self._items:
                        if idle_fast and last_requests <= 1 and len(batch) <= 1:
                            break
                        end = until if not idle_fast else min(until, last_arrival + gap)
                        remaining = end - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                        continue
                    nxt = self._items.popleft()
                    if nxt is None:
                        stop = True
                        break
                    last_arrival = max(last_arrival, nxt.enqueued)
                    if nxt.key == first.key and rows + nxt.rows <= limit:
                        batch.append(nxt)
                        rows += nxt.rows
                    else:
                        pending.append(nxt)
            last_requests = len(batch)
            try:
                self._execute(batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("batcher for model '%s' failed", self.entry.name)
                for it in batch:
                    if not it.future.done():
                        err = RuntimeBackendError(f"model '{self.entry.name}' batch failed: {exc}")
                        it.future.set_exception(err)
            if stop:
                break
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeBackendError("server is shutting down"))

    def _execute(self, batch: list[_Item]) -> None:
        now = time.monotonic()
        live: list[_Item] = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded(
                        f"request for model '{self.entry.name}' expired after "
                        f"{now - item.enqueued:.3f} s in the queue"
                    )
                )
                continue
            live.append(item)
        if not live:
            return
        try:
            if len(live) == 1:
                feed = live[0].inputs
            else:
                feed = {
                    name: np.concatenate([it.inputs[name] for it in live], axis=0)
                    for name in live[0].inputs
                }
            t0 = time.perf_counter()
            values = self.session.run(self.output_names, feed)
            seconds = time.perf_counter() - t0
        except Exception as exc:
            err = RuntimeBackendError(
                f"model '{self.entry.name}' version {self.entry.version} failed: {exc}"
            )
            err.__cause__ = exc
            for it in live:
                it.future.set_exception(err)
            return
        outputs = dict(zip(self.output_names, values, strict=True))
        offset = 0
        for it in live:
            wanted = it.request.outputs or self.output_names
            if len(live) == 1:
                out = {n: outputs[n] for n in wanted}
            else:
                out = {n: outputs[n][offset : offset + it.rows] for n in wanted}
            offset += it.rows
            it.future.set_result(
                InferResponse(
                    model=self.entry.name, version=self.entry.version, id=it.request.id, outputs=out
                )
            )
        event = BatchEvent(
            self.entry.name, self.entry.version, sum(it.rows for it in live), len(live), seconds
        )
        self.core._record(event)

    def close(self) -> None:
        with self._cond:
            self._items.append(None)
            self._cond.notify()
        self.thread.join(timeout=10)
        # Anything still queued after the stop marker never ran.
        with self._cond:
            left = list(self._items)
            self._items.clear()
        for item in left:
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeBackendError("server is shutting down"))


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
        self._workers: dict[tuple[str, str], _ModelWorker] = {}
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
    def _worker(self, name: str, version: str | None) -> _ModelWorker:
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
                w = _ModelWorker(self, entry)
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


def parse_version(text: str) -> str:
    """Check a version path segment (digits, letters, '.', '_', '-')."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise InputError(f"bad model version {text!r}")
    return text
