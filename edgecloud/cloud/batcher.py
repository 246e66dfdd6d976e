"""One loaded model version of a region: its backend, its bounded queue and its batcher thread.

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

The model runs through ``edgecloud.runtime.OnnxRuntimeBackend``, and requests are checked by
that backend's validator (``Backend.validate``) with the region's V2 wording (``_V2Messages``);
what is added here is only what batching needs: requested outputs, one batch size across the
inputs, and the key of requests that can share a run.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecloud.errors import (
    DTypeError,
    EdgeCloudError,
    InputError,
    RemoteError,
    RuntimeBackendError,
    ShapeError,
    TransportTimeout,
)
from edgecloud.package import TensorSpec
from edgecloud.runtime.base import InputMessages, InputPolicy
from edgecloud.runtime.ort import OnnxRuntimeBackend
from edgecloud.transport.compact import PARAMETER as UPCAST_PARAMETER
from edgecloud.transport.compact import dequantize_input, upcast_input
from edgecloud.transport.v2 import DTYPE_TO_V2, InferRequest, InferResponse

if TYPE_CHECKING:
    from edgecloud.cloud.core import ServingCore
    from edgecloud.cloud.repository import ModelEntry

__all__ = ["BatchEvent", "DeadlineExceeded", "ModelWorker", "OverloadedError"]

log = logging.getLogger(__name__)


class OverloadedError(RemoteError):
    """The model's queue is full; the caller should try another region or later (503)."""

    def __init__(self, message: str, *, region: str | None = None) -> None:
        super().__init__(message, region=region, status=503)


class DeadlineExceeded(TransportTimeout):
    """The request's deadline passed while it waited in the queue (504)."""


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


class _V2Messages(InputMessages):
    """The region's words for the runtime validator's errors: V2 datatypes, -1 for dynamic dims,
    the model named, as V2 clients (tritonclient, our transports) read them."""

    def __init__(self, model: str) -> None:
        self.model = f"model '{model}'"

    def names(self, missing: list[str], unknown: list[str], expected: list[str]) -> InputError:
        if unknown:
            return InputError(
                f"{self.model} has no input '{unknown[0]}' (inputs: {', '.join(expected)})",
                input_name=unknown[0],
            )
        return InputError(f"{self.model}: input '{missing[0]}' is missing", input_name=missing[0])

    def dtype(self, spec: TensorSpec, got: np.dtype[Any], *, cast_hint: bool) -> DTypeError:
        return DTypeError(
            f"{self.model} input '{spec.name}': expected datatype {_v2(spec.dtype)}, got "
            f"{DTYPE_TO_V2.get(got, str(got))}",
            input_name=spec.name,
        )

    def rank(self, spec: TensorSpec, shape: tuple[int, ...]) -> ShapeError:
        shape_txt = [d if isinstance(d, int) else -1 for d in spec.shape]
        return ShapeError(
            f"{self.model} input '{spec.name}': expected shape {shape_txt}, got {list(shape)}",
            input_name=spec.name,
        )

    def dim(self, spec: TensorSpec, shape: tuple[int, ...], index: int) -> ShapeError:
        return self.rank(spec, shape)


#: The region serves what a V2 client sends: exact datatypes (as the device), NaN/Inf passed to
#: the model (as before the shared validator: a remote client's data is its own business).
_REGION_POLICY = InputPolicy(nonfinite="allow")


class ModelWorker:
    """One loaded model version: its backend (``runtime.OnnxRuntimeBackend`` on the CPU), its
    queue and its batcher thread."""

    def __init__(self, core: ServingCore, entry: ModelEntry) -> None:
        self.core = core
        self.entry = entry
        try:
            # No busy-waiting between runs: onnxruntime's spinning threads would take the cores
            # the HTTP event loop and the MQTT workers need to decode the next requests.
            self.backend = OnnxRuntimeBackend(
                entry.path,
                entry.inputs,
                entry.outputs,
                providers=["CPUExecutionProvider"],
                threads=core.intra_op_threads,
                policy=_REGION_POLICY,
                messages=_V2Messages(entry.name),
                allow_spinning=False,
            )
        except EdgeCloudError as exc:
            raise RuntimeBackendError(
                f"model '{entry.name}' version {entry.version}: onnxruntime cannot load "
                f"{entry.path}: {exc}"
            ) from exc
        self.output_names = [o.name for o in entry.outputs]
        # Batch along dim 0 only when every input and output has a symbolic leading dim.
        self.batchable = all(
            s.shape and isinstance(s.shape[0], str) for s in (*entry.inputs, *entry.outputs)
        )
        # A deque under one condition rather than queue.Queue: the batcher takes everything that
        # is waiting in one lock hold instead of one lock round trip (and notify) per request.
        self._items: deque[_Item | None] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._first_input = entry.inputs[0].name if entry.inputs else ""
        self.thread = threading.Thread(
            target=self._run, name=f"batcher-{entry.name}-{entry.version}", daemon=True
        )
        self.thread.start()

    # -- validation, in the caller's thread so bad input never occupies the queue
    def validate(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int, tuple[Any, ...]]:
        """The runtime's one validator (names, datatypes, shapes), then the batching rules."""
        model = f"model '{self.entry.name}'"
        inputs = request.inputs
        if request.parameters and UPCAST_PARAMETER in request.parameters:  # declared FP16 upstream
            want = {spec.name: spec.dtype for spec in self.entry.inputs}
            inputs = {
                n: upcast_input(request, np.asarray(a), want[n], model=self.entry.name)
                if n in want
                else a
                for n, a in inputs.items()
            }
        if request.input_parameters:  # INT8 upstream: UINT8 tensors with their dequantize keys
            want = {spec.name: spec.dtype for spec in self.entry.inputs}
            inputs = {
                n: dequantize_input(request, n, np.asarray(a), want[n], model=model)
                if n in want
                else a
                for n, a in inputs.items()
            }
        checked = self.backend.validate(inputs)
        bad_out = [o for o in request.outputs if o not in self.output_names]
        if bad_out:
            raise InputError(
                f"{model} has no output '{bad_out[0]}' (outputs: {', '.join(self.output_names)})"
            )
        feed: dict[str, np.ndarray] = {}
        rows = 1
        key: list[Any] = [tuple(request.outputs)]
        for name, arr in checked.items():
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
            outputs = self.backend.run_validated(feed)
            seconds = time.perf_counter() - t0
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc, RuntimeBackendError) and exc.__cause__ else exc
            err = RuntimeBackendError(
                f"model '{self.entry.name}' version {self.entry.version} failed: {cause}"
            )
            err.__cause__ = exc
            for it in live:
                it.future.set_exception(err)
            return
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
        if not self.thread.is_alive():
            self.backend.close()
        # Anything still queued after the stop marker never ran.
        with self._cond:
            left = list(self._items)
            self._items.clear()
        for item in left:
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeBackendError("server is shutting down"))
