"""The MQTT 5 transport: V2 inference as request/response over a broker.

A device publishes a V2 request (JSON, or the binary extension with the header length in the
``Inference-Header-Content-Length`` user property) to its region's request topic with MQTT 5
Response Topic (its own reply topic), Correlation Data (a fresh 16-byte id), Message Expiry
Interval (the remaining deadline, so the broker drops stale requests) and user properties
(``model``, ``version``, ``trace-id``, ``deadline-ms``). A region worker answers on the response
topic with the same correlation data and a ``status`` user property (HTTP codes; 200 = success).
The full contract is in docs/protocol.md (## MQTT).

Why one connection per process: a device has one identity on the broker (ACLs confine it to its
own topics) and one reply topic; every transport for the same broker, credentials and device id
shares one ``MqttConnection`` from a process-wide cache, with one bounded map of pending
correlation ids. When that connection drops, every request in flight fails at once with
``ConnectionFailed`` and new ones fail fast until it is back, so the router moves on to the next
region (or the degraded local answer) instead of waiting out the timeout.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Unpack

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    ProtocolError,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from edgecloud.mqtt import (
    BrokerOptions,
    BrokerSettings,
    MqttConnection,
    PublishProperties,
    parse_broker_url,
    reason_code_error,
    user_properties,
)
from edgecloud.topics import Topics, check_segment
from edgecloud.transport.base import Transport
from edgecloud.transport.compact import UpstreamCounter
from edgecloud.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    decode_error,
    decode_response,
    encode_request,
)

__all__ = [
    "DEFAULT_BINARY_THRESHOLD",
    "PROP_BINARY_THRESHOLD",
    "PROP_DEADLINE",
    "PROP_MODEL",
    "PROP_STATUS",
    "PROP_TRACE",
    "PROP_VERSION",
    "PROP_WORKER",
    "MqttTransport",
]

log = logging.getLogger("edgecloud.mqtt")

# User property names of the protocol (docs/protocol.md, ## MQTT).
_NO_MATCHING_SUBSCRIBERS = 0x10  # PUBACK reason code
PROP_MODEL = "model"
PROP_VERSION = "version"
PROP_TRACE = "trace-id"
PROP_DEADLINE = "deadline-ms"
PROP_STATUS = "status"
PROP_BINARY_THRESHOLD = "binary-threshold"
PROP_WORKER = "worker"

#: Tensors of this many bytes or more travel binary (requests and, by default, replies).
DEFAULT_BINARY_THRESHOLD = 16384


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    payload: bytes | None = None
    props: dict[str, str] = field(default_factory=dict)
    error: TransportError | None = None


class _DeviceSession:
    """One broker connection for one device identity, shared by every transport using it."""

    def __init__(
        self, settings: BrokerSettings, device_id: str, topics: Topics, qos: int, max_pending: int
    ) -> None:
        self.device_id = device_id
        self.reply_topic = topics.infer_reply(device_id)
        self.qos = qos
        self.max_pending = max_pending
        self.refs = 0
        self.lock = threading.Lock()
        self.pending: dict[bytes, _Pending] = {}
        self.subscribed = False
        self.late_replies = 0
        # A random suffix: two processes of the same device must not take over each other's
        # session; the ACL keys on the username, not the client id.
        self.conn = MqttConnection(
            settings,
            client_id=f"{device_id}-{uuid.uuid4().hex[:8]}",
            on_message=self._on_message,
            on_state=self._on_state,
            subscriptions=[(self.reply_topic, qos)],
        )
        self.conn.start(wait=False)

    # loop thread: never block
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        with self.lock:
            p = self.pending.get(bytes(corr)) if corr is not None else None
        if p is None:
            self.late_replies += 1
            log.debug("reply on %s with unknown correlation data (late or foreign)", msg.topic)
            return
        p.payload = bytes(msg.payload)
        p.props = user_properties(msg.properties)
        p.done.set()

    def _on_state(self, up: bool, err: TransportError | None) -> None:
        if up:
            return
        with self.lock:
            waiting = list(self.pending.values())
        for p in waiting:
            if not p.done.is_set():
                p.error = err or ConnectionFailed("MQTT connection lost")
                p.done.set()

    def ensure_ready(self, timeout: float, region: str) -> None:
        conn = self.conn
        if conn.fatal is not None:
            raise conn.fatal
        if not conn.connected:
            # Wait only for the very first attempt; afterwards a down broker fails fast.
            conn.wait_first_attempt(timeout)
            if not conn.connected:
                raise conn.fatal or ConnectionFailed(
                    f"MQTT broker {conn.settings.url} is not connected"
                    + (f": {conn.last_error}" if conn.last_error else ""),
                    region=region,
                )
        if not self.subscribed:
            try:
                conn.subscribe(self.reply_topic, self.qos, timeout=max(0.05, timeout))
            except AuthError as exc:
                raise AuthError(
                    f"device '{self.device_id}' may not read its reply topic "
                    f"{self.reply_topic!r} ({exc}); check the broker ACL and the username",
                    region=region,
                    status=exc.status,
                ) from exc
            self.subscribed = True


_sessions: dict[tuple[Any, ...], _DeviceSession] = {}
_sessions_lock = threading.Lock()


def _forget_sessions_after_fork() -> None:
    # A forked child must not share the parent's connections (same socket, same client id):
    # its transports open their own.
    global _sessions_lock
    _sessions.clear()
    _sessions_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_sessions_after_fork)


def _acquire(
    settings: BrokerSettings, device_id: str, topics: Topics, qos: int, max_pending: int
) -> tuple[tuple[Any, ...], _DeviceSession]:
    key = (settings, device_id, topics.prefix)
    with _sessions_lock:
        sess = _sessions.get(key)
        if sess is None or sess.conn.fatal is not None:
            sess = _DeviceSession(settings, device_id, topics, qos, max_pending)
            _sessions[key] = sess
        sess.refs += 1
        return key, sess


def _release(key: tuple[Any, ...], sess: _DeviceSession) -> None:
    with _sessions_lock:
        sess.refs -= 1
        if sess.refs > 0:
            return
        if _sessions.get(key) is sess:
            del _sessions[key]
    sess.conn.close()


class MqttTransport(Transport):
    """V2 inference to one region over MQTT 5; see the module docstring for the protocol.

    ``endpoint`` is a ``BrokerSettings`` or a broker URL; with a URL, the broker options
    (``BrokerOptions``: credentials, TLS files, ``connect_timeout``) may follow as keywords,
    as a region's ``options`` table gives them.

    ``model`` overrides the request's model name (the cloud model may be named differently from
    the edge model). Tensors of ``binary_threshold`` bytes or more travel as raw binary, smaller
    ones as JSON. ``max_pending`` bounds requests in flight on the shared connection.
    """

    def __init__(
        self,
        endpoint: str | BrokerSettings,
        *,
        region: str,
        device_id: str,
        model: str | None = None,
        qos: int = 1,
        binary_threshold: int = DEFAULT_BINARY_THRESHOLD,
        prefix: str = "edgecloud",
        max_pending: int = 1024,
        **broker: Unpack[BrokerOptions],
    ) -> None:
        if qos not in (0, 1):
            raise ConfigError(f"MQTT qos must be 0 or 1 for inference, got {qos}")
        if binary_threshold < 0:
            raise ConfigError(f"binary_threshold must be >= 0 bytes, got {binary_threshold}")
        if max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {max_pending}")
        self.region = check_segment(region, "region")
        self.device_id = check_segment(device_id, "device id")
        self.model = check_segment(model, "model") if model is not None else None
        self.topics = Topics(prefix)
        self.request_topic = self.topics.infer_request(device_id, region)
        self.qos = qos
        self.binary_threshold = binary_threshold
        self.upstream = UpstreamCounter()  # encoded payloads (edgecloud/transport/compact.py)
        if isinstance(endpoint, BrokerSettings):
            if broker:
                raise ConfigError(
                    f"MQTT options {sorted(broker)} go into the BrokerSettings, not beside it"
                )
            self.settings = endpoint
        else:
            self.settings = parse_broker_url(endpoint, **broker)
        self.connect_timeout = self.settings.connect_timeout
        self._key, self._session = _acquire(
            self.settings, self.device_id, self.topics, qos, max_pending
        )
        self._closed = False

    @property
    def connection(self) -> MqttConnection:
        """The shared connection (for diagnostics and tests)."""
        return self._session.conn

    def ready(self, *, timeout: float) -> bool | None:
        """Whether the broker connection is up (the cheapest probe MQTT has)."""
        conn = self._session.conn
        if conn.fatal is not None:
            return False
        if not conn.connected:
            conn.wait_first_attempt(timeout)
        return conn.connected

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        if self._closed:
            raise ConnectionFailed("MQTT transport is closed", region=self.region)
        if timeout <= 0:
            raise TransportTimeout("deadline already passed", region=self.region)
        start = time.monotonic()
        sess = self._session
        sess.ensure_ready(min(timeout, self.connect_timeout), self.region)
        model = self.model or request.model
        try:
            check_segment(model, "model")
        except ConfigError as exc:
            raise ProtocolError(str(exc), region=self.region) from exc
        body, header_len = encode_request(request, binary=self.binary_threshold)
        self.upstream.add(len(body))
        remaining = timeout - (time.monotonic() - start)
        corr = os.urandom(16)
        user = [
            (PROP_MODEL, model),
            (PROP_DEADLINE, str(int((time.time() + remaining) * 1000))),
        ]
        if request.id is not None:
            user.append((PROP_TRACE, request.id))
        if self.binary_threshold != DEFAULT_BINARY_THRESHOLD:
            user.append((PROP_BINARY_THRESHOLD, str(self.binary_threshold)))
        if request.version is not None:
            user.append((PROP_VERSION, str(request.version)))
        if header_len is not None:
            user.append((HEADER_LENGTH, str(header_len)))
        props = PublishProperties(
            response_topic=sess.reply_topic,
            correlation_data=corr,
            message_expiry=min(2**32 - 1, max(1, math.ceil(remaining))),
            user=user,
        )

        p = _Pending()
        with sess.lock:
            if len(sess.pending) >= sess.max_pending:
                raise TransportError(
                    f"{len(sess.pending)} MQTT requests already in flight "
                    f"(max_pending={sess.max_pending})",
                    region=self.region,
                )
            sess.pending[corr] = p
        try:

            def on_ack(rc: ReasonCode) -> None:
                if p.done.is_set():
                    return
                if rc.is_failure:
                    p.error = reason_code_error(
                        rc, f"publish to {self.request_topic!r}", region=self.region
                    )
                    p.done.set()
                elif rc.value == _NO_MATCHING_SUBSCRIBERS:
                    # No worker is subscribed: nobody will answer, so fail over now rather
                    # than at the deadline.
                    p.error = RemoteError(
                        f"no worker of region '{self.region}' is subscribed to "
                        f"{self.request_topic!r} (PUBACK 0x10 No matching subscribers)",
                        region=self.region,
                        status=503,
                    )
                    p.done.set()

            try:
                sess.conn.publish(
                    self.request_topic, body, qos=self.qos, properties=props, on_ack=on_ack
                )
            except TransportError as exc:
                exc.region = self.region
                raise
            if not p.done.wait(max(0.0, timeout - (time.monotonic() - start))):
                raise TransportTimeout(
                    f"no MQTT reply from region '{self.region}' within {timeout:.3f}s",
                    region=self.region,
                )
        finally:
            with sess.lock:
                sess.pending.pop(corr, None)
        if p.error is not None:
            p.error.region = self.region
            raise p.error
        return self._decode(p, model)

    def _decode(self, p: _Pending, model: str) -> InferResponse:
        payload = p.payload or b""
        raw_status = p.props.get(PROP_STATUS, "200")
        try:
            status = int(raw_status)
        except ValueError:
            raise ProtocolError(
                f"reply from region '{self.region}' has a non-integer status {raw_status!r}",
                region=self.region,
            ) from None
        if status != 200:
            msg = f"region '{self.region}' answered {status}: {decode_error(payload)}"
            if status in (401, 403):
                raise AuthError(msg, region=self.region, status=status)
            raise RemoteError(msg, region=self.region, status=status)
        hl_text = p.props.get(HEADER_LENGTH)
        try:
            header_len = int(hl_text) if hl_text is not None else None
        except ValueError:
            raise ProtocolError(
                f"reply has a non-integer {HEADER_LENGTH} {hl_text!r}", region=self.region
            ) from None
        try:
            resp = decode_response(payload, header_len)
        except ProtocolError as exc:
            exc.region = self.region
            raise
        if not resp.model:
            resp.model = model
        return resp

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _release(self._key, self._session)
