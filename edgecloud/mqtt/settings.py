"""Where and how to reach a broker, validated once: ``BrokerSettings`` and its parsers.

Every component that talks MQTT (the transport, the cloud workers, the fleet controller, the
device agent) takes one frozen ``BrokerSettings`` rather than a list of keyword arguments, so a
new broker option is added here and nowhere else. ``BrokerOptions`` names the keyword options a
user may give next to a URL (a region's ``options``, the transport's keywords), in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypedDict, Unpack
from urllib.parse import unquote, urlsplit

from edgecloud.errors import ConfigError

__all__ = ["BrokerOptions", "BrokerSettings", "broker_settings", "parse_broker_url"]


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect. Build it with ``parse_broker_url`` (it validates)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    tls_insecure: bool = False
    connect_timeout: float = 5.0
    keepalive: int = 30

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


class BrokerOptions(TypedDict, total=False):
    """The keyword options ``parse_broker_url`` takes beside the URL (all optional)."""

    username: str | None
    password: str | None
    ca: str | os.PathLike[str] | None
    certfile: str | os.PathLike[str] | None
    keyfile: str | os.PathLike[str] | None
    tls_insecure: bool
    connect_timeout: float
    keepalive: int


def parse_broker_url(url: str, **options: Unpack[BrokerOptions]) -> BrokerSettings:
    """Parse ``mqtt://`` / ``mqtts://`` URLs; explicit keyword credentials override the URL's.

    Certificates are checked to exist now, because paho would only fail at connect time with an
    ``ssl`` error that does not name the file.
    """
    unknown = set(options) - set(BrokerOptions.__annotations__)
    if unknown:
        raise ConfigError(f"unknown MQTT broker option(s) {sorted(unknown)}")
    username = options.get("username")
    password = options.get("password")
    ca = options.get("ca")
    certfile = options.get("certfile")
    keyfile = options.get("keyfile")
    connect_timeout = float(options.get("connect_timeout", 5.0))
    try:
        parts = urlsplit(url)
        port_in_url = parts.port
    except ValueError as exc:
        raise ConfigError(f"MQTT broker URL {url!r} is invalid: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"MQTT broker URL {url!r} must start with mqtt:// or mqtts://, got {parts.scheme!r}"
        )
    if not parts.hostname:
        raise ConfigError(f"MQTT broker URL {url!r} has no host")
    tls = parts.scheme == "mqtts" or any(x is not None for x in (ca, certfile))
    if (certfile is None) != (keyfile is None):
        raise ConfigError("MQTT client TLS needs both certfile and keyfile, or neither")
    for what, path in (("ca", ca), ("certfile", certfile), ("keyfile", keyfile)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"MQTT TLS {what} file {os.fspath(path)!r} does not exist")
    if connect_timeout <= 0:
        raise ConfigError(f"connect_timeout must be > 0 seconds, got {connect_timeout}")
    return BrokerSettings(
        host=parts.hostname,
        port=port_in_url or (8883 if tls else 1883),
        tls=tls,
        username=username
        if username is not None
        else (unquote(parts.username) if parts.username else None),
        password=password
        if password is not None
        else (unquote(parts.password) if parts.password else None),
        ca=os.fspath(ca) if ca is not None else None,
        certfile=os.fspath(certfile) if certfile is not None else None,
        keyfile=os.fspath(keyfile) if keyfile is not None else None,
        tls_insecure=bool(options.get("tls_insecure", False)),
        connect_timeout=connect_timeout,
        keepalive=int(options.get("keepalive", 30)),
    )


def broker_settings(broker: BrokerSettings | str) -> BrokerSettings:
    """Accept settings or a bare URL (no credentials, no TLS files) where a broker is named."""
    if isinstance(broker, BrokerSettings):
        return broker
    if isinstance(broker, str):
        return parse_broker_url(broker)
    raise ConfigError(f"an MQTT broker must be a URL or BrokerSettings, got {broker!r}")
