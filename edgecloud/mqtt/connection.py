"""One broker connection that stays up: the lifecycle every MQTT component shares.

The transport, the cloud workers, the fleet controller and the device agent each run on an
``MqttConnection``: it connects, reconnects with capped exponential backoff and jitter
(``Backoff``), resubscribes after every reconnect, and after a refused CONNACK does what its
``RefusalPolicy`` says (stop for good with an ``AuthError``, or keep retrying at the backoff's
cap). Its callbacks run on the ``SelectorLoop`` thread and must not block; ``publish`` and
``subscribe`` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgecloud.errors import AuthError, ConnectionFailed, TransportError
from edgecloud.mqtt.acks import AckMap
from edgecloud.mqtt.backoff import Backoff, RefusalPolicy
from edgecloud.mqtt.client import make_client
from edgecloud.mqtt.loop import SelectorLoop, default_loop
from edgecloud.mqtt.properties import connect_properties
from edgecloud.mqtt.reasons import reason_code_error
from edgecloud.mqtt.settings import BrokerSettings

__all__ = ["MessageHandler", "MqttConnection", "StateListener", "SubscribedListener"]

log = logging.getLogger("edgecloud.mqtt")

MessageHandler = Callable[[paho.MQTTMessage], None]
#: ``on_state(connected, error)``: the CONNACK came (True) or the connection is gone (False).
StateListener = Callable[[bool, "TransportError | None"], None]
#: ``on_subscribed(codes)``: the broker answered the (re)subscription made at each CONNACK.
SubscribedListener = Callable[[list[ReasonCode]], None]

_OK_WHILE_DOWN = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)


class MqttConnection:
    """One broker connection that stays up: reconnects with backoff, resubscribes, never blocks.

    ``start(timeout)`` waits for the first CONNACK and raises ``AuthError`` (refused
    credentials, reason code named) or ``ConnectionFailed`` (unreachable, TLS failure, or no
    CONNACK in time; it keeps retrying in the background).

    Options, each for one kind of user:

    - ``refusal``: ``RefusalPolicy.STOP`` (default; clients and workers) or ``RETRY_SLOWLY``
      (a device: keep trying at ``backoff.cap`` until an operator fixes the broker side).
    - ``session_expiry``: ask the broker to keep the session (subscriptions and QoS 1 messages
      for us) this many seconds across a disconnect, connecting with ``clean_start=False``; the
      fleet controller uses it so job updates sent while it restarts are not lost.
    - ``max_inflight`` / ``max_queued``: paho's own buffers (the agent keeps its real buffer in
      its durable outbox, so paho only holds what is in flight).
    - ``on_subscribed``: told when the subscriptions made at a CONNACK are granted (the agent
      counts as connected only then: jobs can reach it).

    ``publish`` fails fast with ``ConnectionFailed`` while the connection is down, unless
    ``queue_when_down`` (paho keeps QoS 1 messages for the next connection of a persistent
    session, bounded by ``max_queued``).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        on_message: MessageHandler | None = None,
        on_state: StateListener | None = None,
        on_subscribed: SubscribedListener | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        will: tuple[str, bytes, int, bool] | None = None,
        backoff: Backoff | None = None,
        refusal: RefusalPolicy = RefusalPolicy.STOP,
        session_expiry: int | None = None,
        max_inflight: int | None = None,
        max_queued: int | None = None,
        loop: SelectorLoop | None = None,
        region: str | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.region = region
        self.refusal = refusal
        self.session_expiry = session_expiry
        self._loop = loop or default_loop()
        self._on_message_cb = on_message
        self._on_state = on_state
        self._on_subscribed = on_subscribed
        self._subs: dict[str, int] = dict(subscriptions)
        self._backoff = backoff or Backoff()
        self._attempt = 0
        self._connected = threading.Event()
        self._first_result = threading.Event()
        self._down = threading.Event()  # set while no socket is open (close() waits for it)
        self._down.set()
        self._closing = False
        self._refused = False  # the last CONNACK was a refusal (RETRY_SLOWLY waits the cap)
        self.fatal: TransportError | None = None
        self.last_error: TransportError | None = None
        self.connects = 0
        self._cond = threading.Condition()
        self._state_cond = threading.Condition()
        self._subacks: dict[int, ReasonCode] = {}
        self._resub_mid: int | None = None
        self._acks: AckMap[ReasonCode] = AckMap()
        self.client = make_client(settings, client_id)
        if max_inflight is not None:
            self.client.max_inflight_messages_set(max_inflight)
        if max_queued is not None:
            self.client.max_queued_messages_set(max_queued)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_subscribe = self._handle_suback
        self.client.on_publish = self._handle_puback
        self._loop.attach(self.client, client_id)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def closing(self) -> bool:
        """``close()`` was called, or a refusal stopped the connection for good."""
        return self._closing

    def start(self, timeout: float | None = None, *, wait: bool = True) -> MqttConnection:
        """Connect; with ``wait`` block until the first CONNACK or ``timeout``."""
        s = self.settings
        if self.session_expiry is None:
            self.client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=True)
        else:
            self.client.connect_async(
                s.host,
                s.port,
                keepalive=s.keepalive,
                clean_start=False,
                properties=connect_properties(session_expiry=self.session_expiry),
            )
        self._loop.run_blocking(self._reconnect)
        if wait:
            self.wait_connected(timeout if timeout is not None else s.connect_timeout + 1.0)
        return self

    def wait_first_attempt(self, timeout: float) -> bool:
        """Wait until the first connect attempt has an outcome; True when connected."""
        self._first_result.wait(timeout)
        return self.connected

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise the refusal or failure that kept us from it."""
        deadline = time.monotonic() + timeout
        with self._state_cond:
            while not self._connected.is_set() and self.fatal is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._state_cond.wait(left)
        if self._connected.is_set():
            return
        if self.fatal is not None:
            raise self.fatal
        err = self.last_error
        if isinstance(err, AuthError):  # RETRY_SLOWLY: refused, and still trying
            raise err
        raise ConnectionFailed(
            f"no MQTT connection to {self.settings.url} within {timeout:.1f}s"
            + (f": {err}" if err else ""),
            region=self.region,
        ) from err

    def close(self, wait: float = 0.0) -> None:
        """Disconnect for good; with ``wait``, until the socket is closed (at most that long)."""
        self._closing = True
        self._connected.clear()
        with contextlib.suppress(Exception):
            self.client.disconnect()
        if wait > 0 and not self._loop.in_loop():
            self._down.wait(wait)

    # -- publish / subscribe (any thread) ------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        on_ack: Callable[[ReasonCode], None] | None = None,
        queue_when_down: bool = False,
    ) -> int:
        """Queue a message; ``on_ack(reason_code)`` runs on the loop thread at PUBACK (QoS 1).

        ``on_ack`` is dropped (never called) when the connection goes down first.
        """
        if not queue_when_down and not self.connected:
            raise self.fatal or ConnectionFailed(
                f"MQTT connection to {self.settings.url} is down", region=self.region
            )
        # Never hold a lock of ours across a paho call: paho's own mutexes are held while it
        # runs our callbacks on the loop thread, so that order would deadlock.
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not (
            queue_when_down and info.rc in _OK_WHILE_DOWN
        ):
            raise ConnectionFailed(
                f"publish to {topic!r} failed: {paho.error_string(info.rc)}", region=self.region
            )
        if on_ack is not None and qos > 0:
            early = self._acks.expect(info.mid, on_ack)
            if early is not None:
                on_ack(early)
        return int(info.mid)

    def subscribe(self, topic: str, qos: int = 1, *, timeout: float = 5.0) -> None:
        """Subscribe now and after every reconnect; raise ``AuthError`` on SUBACK 0x87."""
        self._subs[topic] = qos
        if not self.connected:
            return  # on_connect subscribes
        rc, mid = self.client.subscribe(topic, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionFailed(
                f"subscribe to {topic!r} failed: {paho.error_string(rc)}", region=self.region
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionFailed(
                        f"no SUBACK for {topic!r} within {timeout}s", region=self.region
                    )
                self._cond.wait(left)
            code = self._subacks.pop(mid)
        if code.is_failure:
            self._subs.pop(topic, None)
            raise reason_code_error(code, f"subscription to {topic!r}", region=self.region)

    # -- internals ---------------------------------------------------------------------------
    def _reconnect(self) -> None:
        """Runs in the loop's connect pool: one blocking TCP (+TLS) connect attempt."""
        if self._closing or self.fatal is not None:
            return
        try:
            self._down.clear()
            rc = self.client.reconnect()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise OSError(paho.error_string(rc))
        except ssl.SSLError as exc:
            self._connect_failed(
                ConnectionFailed(f"TLS handshake with {self.settings.url} failed: {exc}")
            )
        except (OSError, ValueError) as exc:
            self._connect_failed(
                ConnectionFailed(
                    f"cannot connect to MQTT broker {self.settings.url}: {exc}", region=self.region
                )
            )

    def _connect_failed(self, err: TransportError) -> None:
        self.last_error = err
        self._down.set()
        self._first_result.set()
        with self._state_cond:
            self._state_cond.notify_all()
        self._schedule_reconnect()

    def next_delay(self) -> float:
        """The wait before the next reconnect attempt (and count the attempt)."""
        if self._refused:
            delay = self._backoff.cap  # RETRY_SLOWLY after a refusal: the slowest pace
        else:
            delay = self._backoff.delay(self._attempt)
        self._attempt += 1
        return delay

    def _schedule_reconnect(self) -> None:
        if self._closing or self.fatal is not None:
            return
        delay = self.next_delay()
        log.debug("MQTT %s: reconnect in %.2fs", self.client_id, delay)
        self._loop.call_later(delay, lambda: self._loop.run_blocking(self._reconnect))

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if rc.is_failure:
            err = reason_code_error(rc, f"connection to {self.settings.url}", region=self.region)
            self.last_error = err
            if isinstance(err, AuthError):
                if self.refusal is RefusalPolicy.STOP:
                    log.error("MQTT %s: %s; giving up (retrying cannot help)", self.client_id, err)
                    self.fatal = err
                    self._closing = True
                else:
                    log.warning(
                        "MQTT %s: %s; retrying every %.0fs", self.client_id, err, self._backoff.cap
                    )
                    self._refused = True
            self._first_result.set()
            self._notify(False, err)
            return
        self._attempt = 0
        self._refused = False
        self.last_error = None
        self.connects += 1
        self._resub_mid = None
        if self._subs:
            sub_rc, mid = client.subscribe([(t, q) for t, q in self._subs.items()])
            if sub_rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._resub_mid = mid
        self._connected.set()
        self._first_result.set()
        self._notify(True, None)
        if not self._subs and self._on_subscribed is not None:
            self._guard_listener(self._on_subscribed, [])

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._down.set()
        err = ConnectionFailed(
            f"MQTT connection to {self.settings.url} lost ({rc})", region=self.region
        )
        if was or self.last_error is None:
            self.last_error = err
        self._first_result.set()  # a first attempt that ended in a disconnect is an outcome too
        self._notify(False, err)
        self._acks.clear()
        if not self._closing and self.fatal is None:
            self._schedule_reconnect()

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._on_message_cb is not None:
            self._on_message_cb(msg)

    def _handle_suback(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any
    ) -> None:
        code = codes[0] if codes else ReasonCode(PacketTypes.SUBACK, identifier=0x80)
        failed = [c for c in codes if c.is_failure]
        if failed:
            log.warning(
                "MQTT %s: a subscription was refused: %s",
                self.client_id,
                ", ".join(f"0x{c.value:02X} {c.getName()}" for c in failed),
            )
        if mid == self._resub_mid:
            self._resub_mid = None
            if self._on_subscribed is not None:
                self._guard_listener(self._on_subscribed, list(codes))
            return
        with self._cond:
            self._subacks[mid] = code
            while len(self._subacks) > 256:
                self._subacks.pop(next(iter(self._subacks)))
            self._cond.notify_all()

    def _handle_puback(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        cb = self._acks.arrived(mid, rc)
        if cb is not None:
            cb(rc)

    def _notify(self, up: bool, err: TransportError | None) -> None:
        with self._state_cond:
            self._state_cond.notify_all()
        if self._on_state is not None:
            self._guard_listener(self._on_state, up, err)

    @staticmethod
    def _guard_listener(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("MQTT listener failed")
