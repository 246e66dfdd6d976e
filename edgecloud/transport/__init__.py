"""Cloud transports behind one seam (``Transport``), and a factory that picks one by URL scheme.

``open_transport("http://...")`` gives an ``HttpTransport``, ``"mqtt://..."`` an ``MqttTransport``,
``"grpc://..."`` a ``GrpcTransport`` (the ``grpc`` extra); each is imported only when asked for,
so a device that talks MQTT never imports httpx or grpcio, and the other way round.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from edgecloud.errors import ConfigError
from edgecloud.transport.base import MockTransport, Transport

__all__ = ["SCHEMES", "MockTransport", "Transport", "check_endpoint", "open_transport"]

#: URL scheme -> (module, class) of the transport that serves it.
SCHEMES: dict[str, tuple[str, str]] = {
    "http": ("edgecloud.transport.http", "HttpTransport"),
    "https": ("edgecloud.transport.http", "HttpTransport"),
    "mqtt": ("edgecloud.transport.mqtt", "MqttTransport"),
    "mqtts": ("edgecloud.transport.mqtt", "MqttTransport"),
    "grpc": ("edgecloud.transport.grpc", "GrpcTransport"),
    "grpcs": ("edgecloud.transport.grpc", "GrpcTransport"),
}


def check_endpoint(endpoint: object, *, region: str) -> tuple[str, str]:
    """The (module, class) serving ``endpoint``; a ``ConfigError`` naming the region if none.

    Config readers call it so that a bad scheme fails when the file is read, not at first use.
    """
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ConfigError(
            f"region '{region}': endpoint must be a URL like http://host:port or "
            f"mqtt://host:port, got {endpoint!r}"
        )
    scheme = urlsplit(endpoint).scheme.lower()
    try:
        return SCHEMES[scheme]
    except KeyError:
        raise ConfigError(
            f"region '{region}': unknown endpoint scheme {scheme!r} in {endpoint!r} "
            f"(supported: {', '.join(sorted(SCHEMES))})"
        ) from None


def open_transport(endpoint: str, *, region: str, **options: Any) -> Transport:
    """Create the transport for ``endpoint`` by its scheme; ``options`` go to its constructor.

    An unknown scheme or a bad option is a ``ConfigError`` naming the region and the endpoint.
    """
    module_name, class_name = check_endpoint(endpoint, region=region)
    import importlib

    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        transport: Transport = cls(endpoint, region=region, **options)
    except TypeError as exc:
        raise ConfigError(f"region '{region}': bad option for {class_name}: {exc}") from exc
    return transport
