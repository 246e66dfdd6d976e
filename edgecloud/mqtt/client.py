"""A paho-mqtt 2.x MQTT 5 client with TLS and credentials applied, and TCP_NODELAY.

The one place that knows paho's private attributes (``_Client`` below, and why): nothing outside
``edgecloud.mqtt`` touches paho internals.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgecloud.errors import ConfigError
from edgecloud.mqtt.settings import BrokerSettings

__all__ = ["make_client", "set_tcp_nodelay"]


class _Client(paho.Client):
    """paho's client, closing the TLS socket when the handshake fails.

    paho 2.2 leaves the half-made ``SSLSocket`` to the garbage collector when ``do_handshake``
    raises (wrong CA, refused client certificate), so every reconnect attempt would leak a
    descriptor until a GC pass, with a ResourceWarning. Our SSL contexts always check the host
    name themselves (``check_hostname``) or verify nothing (``tls_insecure``), so paho's extra
    ``match_hostname`` step is not needed here.
    """

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        ctx = self._ssl_context
        if ctx is None:  # pragma: no cover - paho only calls this with TLS configured
            raise ValueError("TLS is not configured")
        ssl_sock = ctx.wrap_socket(
            tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
        )
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except BaseException:
            ssl_sock.close()
            raise
        return ssl_sock


def make_client(settings: BrokerSettings, client_id: str) -> paho.Client:
    """An MQTT 5 paho client with credentials and TLS applied (not yet connected)."""
    client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.connect_timeout = settings.connect_timeout
    # paho queues unboundedly by default; bound it so a dead broker cannot eat the memory.
    client.max_queued_messages_set(10_000)
    client.max_inflight_messages_set(1_000)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        try:
            ctx = ssl.create_default_context(cafile=settings.ca)
            if settings.certfile and settings.keyfile:
                ctx.load_cert_chain(settings.certfile, settings.keyfile)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"MQTT TLS files (ca={settings.ca}, cert={settings.certfile}) unusable: {exc}"
            ) from exc
        if settings.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        client.tls_set_context(ctx)
    return client


def set_tcp_nodelay(sock: Any) -> None:
    """Turn Nagle's algorithm off on a paho socket (plain or TLS); ignore non-TCP sockets."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
