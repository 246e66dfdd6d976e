"""The MQTT layer every edgecloud component runs on (public).

- ``settings``: ``BrokerSettings`` (frozen, validated once) and ``parse_broker_url``.
- ``client``: ``make_client``, a paho-mqtt 2.x MQTT 5 client with TLS, credentials and
  TCP_NODELAY; the only module that knows paho's private attributes.
- ``loop``: ``SelectorLoop``, one epoll thread for any number of clients.
- ``connection``: ``MqttConnection``, the one connection lifecycle (backoff, resubscription,
  refusal policy, early-PUBACK matching).
- ``backoff``: ``Backoff`` (tenacity's jittered exponential waits) and ``RefusalPolicy``.
- ``acks``: ``AckMap``, PUBACKs matched to publishers whichever arrives first.
- ``properties`` / ``reasons``: MQTT 5 properties on the hot path; reason codes as errors.
"""

from __future__ import annotations

from edgecloud.mqtt.acks import AckMap
from edgecloud.mqtt.backoff import Backoff, RefusalPolicy
from edgecloud.mqtt.client import make_client, set_tcp_nodelay
from edgecloud.mqtt.connection import (
    MessageHandler,
    MqttConnection,
    StateListener,
    SubscribedListener,
)
from edgecloud.mqtt.loop import SelectorLoop, default_loop
from edgecloud.mqtt.properties import (
    PublishProperties,
    connect_properties,
    publish_properties,
    user_properties,
)
from edgecloud.mqtt.reasons import AUTH_REASON_CODES, reason_code_error, reason_name
from edgecloud.mqtt.settings import BrokerOptions, BrokerSettings, broker_settings, parse_broker_url

__all__ = [
    "AUTH_REASON_CODES",
    "AckMap",
    "Backoff",
    "BrokerOptions",
    "BrokerSettings",
    "MessageHandler",
    "MqttConnection",
    "PublishProperties",
    "RefusalPolicy",
    "SelectorLoop",
    "StateListener",
    "SubscribedListener",
    "broker_settings",
    "connect_properties",
    "default_loop",
    "make_client",
    "parse_broker_url",
    "publish_properties",
    "reason_code_error",
    "reason_name",
    "set_tcp_nodelay",
    "user_properties",
]
