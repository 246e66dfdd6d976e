"""MQTT 5 reason codes as edgecloud errors: a refusal names its code and its name."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edgecloud.errors import AuthError, RemoteError, TransportError

__all__ = ["AUTH_REASON_CODES", "reason_code_error", "reason_name"]

#: Reason codes that mean "you may not": retrying soon cannot help (``AuthError``).
AUTH_REASON_CODES: dict[int, str] = {
    0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid",
    0x86: "Bad User Name or Password",
    0x87: "Not authorized",
    0x8A: "Banned",
    0x8C: "Bad authentication method",
}


def reason_name(code: int, packet_type: int | None = None) -> str:
    """The MQTT 5 name of a reason code, e.g. ``0x87 Not authorized``."""
    if code in AUTH_REASON_CODES:
        return AUTH_REASON_CODES[code]
    for pt in (packet_type, PacketTypes.PUBACK, PacketTypes.SUBACK, PacketTypes.CONNACK):
        if pt is None:
            continue
        try:
            return str(ReasonCode(pt, identifier=code).getName())
        except (KeyError, ValueError, TypeError):
            continue
    return "Unknown reason code"


def reason_code_error(
    code: int | ReasonCode, what: str, *, region: str | None = None
) -> TransportError:
    """Translate a failing reason code into ``AuthError`` (refusals) or ``RemoteError``."""
    value = int(code.value) if isinstance(code, ReasonCode) else int(code)
    name = code.getName() if isinstance(code, ReasonCode) else reason_name(value)
    msg = f"{what} refused by the broker: reason code 0x{value:02X} {name}"
    if value in AUTH_REASON_CODES:
        return AuthError(msg, region=region, status=value)
    return RemoteError(msg, region=region, status=value)
