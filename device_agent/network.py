"""The agent's broker session: one ``edgecloud.mqtt.MqttConnection`` with a device's policy.

What differs from a cloud client is only configuration: the retained offline status as the
will, paho buffering just what is in flight (the durable outbox is the real buffer), backoff
from ``broker.reconnect_min_s``/``reconnect_max_s``, and ``RefusalPolicy.RETRY_SLOWLY``: a
device whose credentials the broker refuses keeps serving locally and retries at the slowest
pace, because an operator may fix the broker side. The device counts as *connected* only once
the broker granted its job and shadow subscriptions (jobs can reach it); every such connection
publishes the retained online status and tells the outbox to start over from its oldest row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.config import AgentConfig
from edgecloud.errors import AuthError, RemoteError, TransportError
from edgecloud.mqtt import (
    Backoff,
    BrokerSettings,
    MqttConnection,
    RefusalPolicy,
    SelectorLoop,
    parse_broker_url,
)

__all__ = ["AgentLink", "broker_settings_of"]

log = logging.getLogger("device_agent")


def broker_settings_of(config: AgentConfig) -> BrokerSettings:
    """The agent config's ``[broker]`` table as the one ``BrokerSettings`` the MQTT layer takes."""
    b = config.broker
    return parse_broker_url(
        b.url,
        username=b.username,
        password=b.password,
        ca=b.ca,
        certfile=b.cert,
        keyfile=b.key,
        keepalive=b.keepalive,
    )


class AgentLink:
    """Connects the device, re-announces it at each connection, reports what goes wrong.

    Callbacks run on the link's loop thread and must not block: ``on_message(msg)`` (enqueue
    only); ``on_connect()`` at each CONNACK (the outbox starts over); ``on_ready()`` once the
    subscriptions are granted; ``on_error(text)`` for refusals the operator must see.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        status: Callable[[bool], bytes],
        on_message: Callable[[paho.MQTTMessage], None],
        on_connect: Callable[[], None],
        on_ready: Callable[[], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.config = config
        self.device_id = config.device.id
        self.topics = config.topics
        self._status = status
        self._on_connect = on_connect
        self._on_ready = on_ready
        self._on_error = on_error
        self._ready = threading.Event()
        self._lost_at: float | None = None
        b = config.broker
        t, d = self.topics, self.device_id
        self._loop = SelectorLoop(name="agent-network", connect_workers=1)
        self.conn = MqttConnection(
            broker_settings_of(config),
            client_id=d,
            on_message=on_message,
            on_state=self._on_state,
            on_subscribed=self._on_subscribed,
            subscriptions=[(t.jobs_notify(d), 1), (t.jobs_cancel(d), 1), (t.shadow_desired(d), 1)],
            will=(t.status(d), status(False), 1, True),
            backoff=Backoff(base=b.reconnect_min_s, cap=b.reconnect_max_s),
            refusal=RefusalPolicy.RETRY_SLOWLY,
            max_inflight=config.queue.inflight,
            max_queued=config.queue.inflight * 2,
            loop=self._loop,
        )

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self.conn.connected

    @property
    def connects(self) -> int:
        return self.conn.connects

    def start(self) -> None:
        self.conn.start(wait=False)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        on_ack: Callable[[ReasonCode], None] | None = None,
    ) -> int:
        """QoS 1; raises ``ConnectionFailed`` while down (the caller keeps its row queued)."""
        return self.conn.publish(topic, payload, qos=1, retain=retain, on_ack=on_ack)

    def publish_status(self) -> None:
        """The retained online status again (the model version changed)."""
        if self.connected:
            try:
                self.publish(self.topics.status(self.device_id), self._status(True), retain=True)
            except TransportError as exc:
                log.debug("status not published: %s", exc)

    def stop(self, timeout: float = 2.0) -> None:
        """Mark the device offline (retained, waiting briefly for the PUBACK), disconnect."""
        if self.conn.connected:
            acked = threading.Event()
            try:
                self.publish(
                    self.topics.status(self.device_id),
                    self._status(False),
                    retain=True,
                    on_ack=lambda _rc: acked.set(),
                )
                acked.wait(min(1.0, timeout))
            except TransportError:
                pass
        self.conn.close(wait=timeout)
        self._loop.stop()

    # -- the connection's loop thread -------------------------------------------------------
    def _on_state(self, up: bool, err: TransportError | None) -> None:
        url = self.config.broker.url
        if up:
            if self._lost_at is not None:
                log.warning("reconnected to %s after %.1fs", url, time.monotonic() - self._lost_at)
                self._lost_at = None
            log.info("connected to %s (connection %d)", url, self.conn.connects)
            self._on_connect()
            try:
                self.publish(self.topics.status(self.device_id), self._status(True), retain=True)
            except TransportError as exc:
                log.debug("online status not published: %s", exc)
            return
        was = self._ready.is_set()
        self._ready.clear()
        if isinstance(err, AuthError | RemoteError):  # a refused CONNACK, its code named
            self._on_error(str(err))
            return
        if self.conn.fatal is not None or self.conn.closing:
            log.info("disconnected from broker: %s", err)
            return
        if was or self._lost_at is None:
            # at the default verbosity: an operator must see that the device lost its broker
            log.warning(
                "lost the broker %s (%s); buffering to the durable queue and reconnecting",
                url,
                err,
            )
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    def _on_subscribed(self, codes: list[ReasonCode]) -> None:
        failed = [c for c in codes if c.is_failure]
        if failed:
            self._on_error(f"broker refused the job/shadow subscriptions: {failed}")
        self._ready.set()
        self._on_ready()
