"""Cloud-region MQTT workers: answer V2 requests that devices publish to the region's topic.

Each worker is one MQTT connection in a shared subscription (``$share/<group>/...``), so any
number of workers, in one process or many, split a region's load, and the broker hands a dead
worker's share to the others. A worker hands each request to a handler (the region's
``ServingCore``, which batches) and answers on the request's MQTT 5 Response Topic with the same
Correlation Data and a ``status`` user property (HTTP codes, as ``status_for`` maps them).

How it fails, on purpose:

- a request with no Response Topic, or one naming another device's reply topic, cannot be
  answered safely: counted and dropped (logged at most ``Limits.log_per_minute`` times a minute);
- a request whose ``deadline-ms`` has passed (beyond ``clock_skew_ms``, default 250 ms, for the
  device and region clocks) is dropped: its sender has given up;
- a duplicate (QoS 1 redelivery) is dropped: the key is the sender's device id *and* its
  Correlation Data, and an entry lives until the request's own deadline (``dedup_window_s``,
  default 60 s, when it has none), so two devices may use the same bytes and a device may
  restart its counter once its earlier requests have expired;
- a malformed payload (bad JSON, deep JSON, bad ``deadline-ms``, ``binary-threshold`` or header
  length, a device id that breaks the naming rule), a missing model, an unknown model or a
  wrong shape gets a V2 error reply (400/404/...); a payload over ``Limits.max_body_bytes``, a
  JSON part over ``max_json_bytes`` or more than ``max_rows`` rows gets 413;
- a full work queue gets an immediate 503 reply rather than growing without bound;
- nothing a device sends can kill the worker thread: every request is handled in a try block.

Replies go out with the request's QoS and honour ``binary_data_output`` (and per-output
``binary_data``) as over HTTP.

paho callbacks only enqueue; decoding, validation and encoding run on the worker's own thread,
and replies are published from the core's completion callbacks without blocking.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from edgecloud.cloud.mqtt_dedup import SeenIds
from edgecloud.cloud.mqtt_handlers import (
    Handler,
    Submit,
    default_status,
    delayed_echo_handler,
    echo_handler,
)
from edgecloud.errors import (
    ConfigError,
    EdgeCloudError,
    ProtocolError,
    TransportError,
)
from edgecloud.limits import (
    DEFAULT_LIMITS,
    LimitExceeded,
    Limits,
    RateLimitedLog,
    check_rows,
    parse_decimal,
)
from edgecloud.mqtt import (
    BrokerSettings,
    MqttConnection,
    PublishProperties,
    broker_settings,
    user_properties,
)
from edgecloud.topics import Topics, check_segment
from edgecloud.transport.mqtt import (
    DEFAULT_BINARY_THRESHOLD,
    PROP_BINARY_THRESHOLD,
    PROP_DEADLINE,
    PROP_MODEL,
    PROP_STATUS,
    PROP_TRACE,
    PROP_VERSION,
    PROP_WORKER,
)
from edgecloud.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    binary_outputs_requested,
    decode_request,
    encode_error,
    encode_response_mixed,
)

__all__ = [
    "Handler",
    "MqttWorker",
    "MqttWorkerPool",
    "delayed_echo_handler",
    "echo_handler",
    "start_mqtt_workers",
]

log = logging.getLogger("edgecloud.cloud.mqtt")
_SeenIds = SeenIds  # the name tests and earlier code used
# deadline-ms values below this (1973-03-03 in milliseconds) are seconds sent by mistake.
_MIN_DEADLINE_MS = 10**11


@dataclass
class _Ctx:
    response_topic: str
    corr: bytes | None
    model: str
    deadline_ms: int | None
    binary_threshold: int
    trace: str
    device: str = ""
    qos: int = 1
    problem: str | None = None  # a property that makes the request malformed (400 reply)
    binary: bool | set[str] = False
    received: float = field(default_factory=time.monotonic)


class MqttWorker:
    """One worker: one MQTT connection in the region's share group and one handling thread."""

    def __init__(
        self,
        handler: Handler,
        *,
        broker: BrokerSettings | str,
        region: str,
        prefix: str = "edgecloud",
        group: str | None = None,
        qos: int = 1,
        client_id: str | None = None,
        queue_size: int = 1024,
        dedup_size: int = 8192,
        binary_threshold: int = DEFAULT_BINARY_THRESHOLD,
        status_for: Callable[[BaseException], int] | None = None,
        clock_skew_ms: float = 250.0,
        limits: Limits = DEFAULT_LIMITS,
        dedup_window_s: float = 60.0,
        _submit: Submit | None = None,
    ) -> None:
        self.region = check_segment(region, "region")
        self.limits = limits
        self.dedup_window_s = dedup_window_s
        self._refusals = RateLimitedLog(log, limits.log_per_minute)
        self.topics = Topics(prefix)
        self.filter = self.topics.infer_worker_filter(region, group)
        self.qos = qos
        self.binary_threshold = binary_threshold
        self.clock_skew_ms = clock_skew_ms
        self._submit: Submit = _submit or (lambda req, _deadline: handler(req))
        self._status_for = status_for or default_status
        self._queue: queue.Queue[paho.MQTTMessage] = queue.Queue(maxsize=queue_size)
        self._seen = SeenIds(dedup_size)
        self._stop = threading.Event()
        self.stats: collections.Counter[str] = collections.Counter()
        settings = broker_settings(broker)
        self.client_id = client_id or f"worker-{region}-{uuid.uuid4().hex[:8]}"
        self.conn = MqttConnection(
            settings, client_id=self.client_id, on_message=self._on_message, region=region
        )
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-worker-{self.client_id}", daemon=True
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> MqttWorker:
        """Connect and subscribe; raises AuthError/ConnectionFailed when that is impossible."""
        self._thread.start()
        try:
            self.conn.start(timeout)
            self.conn.subscribe(self.filter, self.qos, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        log.info("MQTT worker %s serving %s", self.client_id, self.filter)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.conn.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    @property
    def connected(self) -> bool:
        return self.conn.connected

    # -- loop thread: enqueue only -------------------------------------------------------------
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        self.stats["received"] += 1
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self.stats["overloaded"] += 1
            ctx = self._context(msg)
            if ctx is not None:
                self._reply_error(ctx, 503, f"worker {self.client_id} is overloaded; retry later")

    # -- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._handle(msg)
            except Exception as exc:
                self.stats["internal_errors"] += 1
                if self._refusals.warning(
                    "internal", "MQTT worker %s: unexpected error on %s", self.client_id, msg.topic
                ):
                    log.error("unexpected error", exc_info=exc)

    def _context(self, msg: paho.MQTTMessage) -> _Ctx | None:
        """Where and how to answer ``msg``; None (logged) when it cannot be answered safely."""
        props = msg.properties
        rt = getattr(props, "ResponseTopic", None)
        up = user_properties(props)
        trace = up.get(PROP_TRACE, "-")
        trace = trace[:128]
        if not rt:
            self.stats["dropped_no_response_topic"] += 1
            self._refusals.warning(
                "no-reply-topic",
                "dropped request on %.200s (trace %s): no Response Topic",
                msg.topic,
                trace,
            )
            return None
        head = f"{self.topics.prefix}/devices/"
        device = msg.topic[len(head) :].split("/", 1)[0] if msg.topic.startswith(head) else ""
        if not device or rt != f"{head}{device}/infer/reply":
            self.stats["dropped_foreign_response_topic"] += 1
            self._refusals.warning(
                "foreign-reply-topic",
                "dropped request on %.200s (trace %s): Response Topic %.200r is not the "
                "sender's own",
                msg.topic,
                trace,
                rt,
            )
            return None
        corr = getattr(props, "CorrelationData", None)
        problem: str | None = None
        try:
            check_segment(device, "device id")
        except ConfigError:
            # The reply topic is the sender's own (its ACL let it publish there): answer it.
            problem = f"device id {device[:64]!r} must be 1-128 letters, digits, '.', '_' or '-'"
        deadline: int | None = None
        raw = up.get(PROP_DEADLINE)
        if raw is not None:
            try:
                deadline = parse_decimal(raw, PROP_DEADLINE)
            except ProtocolError as exc:
                problem = problem or f"{exc} (Unix epoch milliseconds)"
            if deadline is not None and deadline < _MIN_DEADLINE_MS:
                problem = problem or (
                    f"{PROP_DEADLINE} {raw!r} is not Unix epoch milliseconds "
                    "(it looks like seconds)"
                )
                deadline = None
        threshold = self.binary_threshold
        raw_threshold = up.get(PROP_BINARY_THRESHOLD)
        if raw_threshold is not None:
            try:
                threshold = parse_decimal(raw_threshold, PROP_BINARY_THRESHOLD) or 0
            except ProtocolError as exc:
                problem = problem or str(exc)
        return _Ctx(
            response_topic=rt,
            corr=bytes(corr) if corr is not None else None,
            model=up.get(PROP_MODEL, ""),
            deadline_ms=deadline,
            binary_threshold=threshold,
            trace=trace,
            device=device,
            qos=min(int(msg.qos), 1),
            problem=problem,
        )

    def _handle(self, msg: paho.MQTTMessage) -> None:
        ctx = self._context(msg)
        if ctx is None:
            return
        now_ms = time.time() * 1000
        if ctx.corr is not None:
            ttl = (
                (ctx.deadline_ms + self.clock_skew_ms - now_ms) / 1000.0
                if ctx.deadline_ms is not None
                else self.dedup_window_s
            )
            if self._seen.seen(ctx.device, ctx.corr, min(ttl, self.dedup_window_s * 60)):
                self.stats["duplicates"] += 1
                return
        if ctx.problem is not None:
            self._reply_error(ctx, 400, f"malformed request: {ctx.problem}")
            return
        # ``deadline-ms`` is the device's wall clock: allow for modest skew between the clocks
        # (the broker's Message Expiry, which has no skew, already drops the clearly stale ones).
        if ctx.deadline_ms is not None and ctx.deadline_ms + self.clock_skew_ms <= now_ms:
            self.stats["expired"] += 1
            log.info("dropped late request (trace %s): deadline passed", ctx.trace)
            return
        up = user_properties(msg.properties)
        if not ctx.model:
            self._reply_error(ctx, 400, f"request has no '{PROP_MODEL}' user property")
            return
        payload = msg.payload
        if len(payload) > self.limits.max_body_bytes:
            self.stats["too_large"] += 1
            self._reply_error(
                ctx,
                413,
                f"request payload of {len(payload)} bytes exceeds {self.limits.max_body_bytes}",
            )
            return
        try:
            header_len = parse_decimal(up.get(HEADER_LENGTH), HEADER_LENGTH)
            body = bytes(payload)
            request = decode_request(
                body, header_len, model=ctx.model, version=up.get(PROP_VERSION), limits=self.limits
            )
            check_rows(request.inputs, self.limits.max_rows)
            ctx.binary = binary_outputs_requested(body, header_len, request.parameters)
        except LimitExceeded as exc:
            self.stats["too_large"] += 1
            self._reply_error(ctx, exc.status or 413, str(exc))
            return
        except ProtocolError as exc:
            self._reply_error(ctx, 400, f"malformed request: {exc}")
            return
        mono_deadline = (
            time.monotonic() + max(0.0, ctx.deadline_ms + self.clock_skew_ms - now_ms) / 1000.0
            if ctx.deadline_ms is not None
            else None
        )
        try:
            result = self._submit(request, mono_deadline)
        except Exception as exc:
            self._reply_exc(ctx, exc)
            return
        if isinstance(result, concurrent.futures.Future):
            result.add_done_callback(lambda f: self._complete(ctx, f))
        else:
            self._reply_ok(ctx, result)

    def _complete(self, ctx: _Ctx, fut: concurrent.futures.Future[InferResponse]) -> None:
        try:
            exc = fut.exception()
            if exc is not None:
                self._reply_exc(ctx, exc)
            else:
                self._reply_ok(ctx, fut.result())
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("MQTT worker %s: could not answer (trace %s)", self.client_id, ctx.trace)

    # -- replies -------------------------------------------------------------------------------
    def _reply_ok(self, ctx: _Ctx, resp: InferResponse) -> None:
        binary: bool | set[str] = ctx.binary
        if binary is False:  # not asked for: by size, as the device's binary-threshold says
            binary = {n for n, a in resp.outputs.items() if a.nbytes >= ctx.binary_threshold}
        try:
            body, header_len = encode_response_mixed(resp, binary)
        except ProtocolError as exc:
            self._reply_error(ctx, 500, f"response could not be encoded: {exc}")
            return
        self._publish(ctx, 200, body, header_len)
        self.stats["answered"] += 1

    def _reply_exc(self, ctx: _Ctx, exc: BaseException) -> None:
        status = self._status_for(exc)
        if isinstance(exc, EdgeCloudError):
            message = str(exc)
        else:
            log.error("handler failed (trace %s)", ctx.trace, exc_info=exc)
            message = f"internal error: {type(exc).__name__}: {exc}"
        self._reply_error(ctx, status, message)

    def _reply_error(self, ctx: _Ctx, status: int, message: str) -> None:
        self.stats["errors"] += 1
        self._publish(ctx, status, encode_error(message), None)

    def _publish(self, ctx: _Ctx, status: int, body: bytes, header_len: int | None) -> None:
        user = [(PROP_STATUS, str(status)), (PROP_WORKER, self.client_id)]
        if ctx.trace != "-":
            user.append((PROP_TRACE, ctx.trace))
        if header_len is not None:
            user.append((HEADER_LENGTH, str(header_len)))
        expiry = None
        if ctx.deadline_ms is not None:
            left = (ctx.deadline_ms - time.time() * 1000) / 1000.0
            expiry = max(1, int(left + 0.999))
        props = PublishProperties(correlation_data=ctx.corr, message_expiry=expiry, user=user)
        try:
            self.conn.publish(ctx.response_topic, body, qos=ctx.qos, properties=props)
        except TransportError as exc:
            self.stats["reply_failed"] += 1
            log.warning("could not answer (trace %s): %s", ctx.trace, exc)


class MqttWorkerPool:
    """The workers ``start_mqtt_workers`` started; ``stop()`` ends them all."""

    def __init__(self, workers: Sequence[MqttWorker]) -> None:
        self.workers = list(workers)

    @property
    def stats(self) -> dict[str, int]:
        total: collections.Counter[str] = collections.Counter()
        for w in self.workers:
            total.update(w.stats)
        return dict(total)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def __enter__(self) -> MqttWorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mqtt_workers(
    core: Any,
    *,
    broker: BrokerSettings | str,
    region: str,
    workers: int = 1,
    prefix: str = "edgecloud",
    group: str | None = None,
    qos: int = 1,
    limits: Limits = DEFAULT_LIMITS,
) -> MqttWorkerPool:
    """Run ``workers`` MQTT workers (threads, one connection each) in front of ``core``.

    ``core`` is a ``ServingCore`` (``submit(request, deadline=...)`` returning a future), so
    requests from every worker share its batching and sessions. A plain callable
    ``handler(request)`` works too. Raises ``AuthError``/``ConnectionFailed`` if a worker cannot
    connect or subscribe; workers already started are stopped first.
    """
    if workers < 1:
        from edgecloud.errors import ConfigError

        raise ConfigError(f"--mqtt-workers must be >= 1, got {workers}")
    submit: Submit
    status_for: Callable[[BaseException], int] | None = None
    if hasattr(core, "submit"):
        from edgecloud.cloud.core import status_for as core_status

        status_for = core_status

        def submit(req: InferRequest, deadline: float | None) -> Any:
            return core.submit(req, deadline=deadline)

        handler: Handler = core.submit
    else:
        handler = core

        def submit(req: InferRequest, deadline: float | None) -> Any:
            return handler(req)

    settings = broker_settings(broker)
    started: list[MqttWorker] = []
    try:
        for _ in range(workers):
            w = MqttWorker(
                handler,
                broker=settings,
                region=region,
                prefix=prefix,
                group=group,
                qos=qos,
                status_for=status_for,
                limits=limits,
                _submit=submit,
            )
            started.append(w)
            w.start(timeout=settings.connect_timeout + 1.0)
    except BaseException:
        for w in started:
            w.stop()
        raise
    return MqttWorkerPool(started)
