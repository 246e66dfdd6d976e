"""Every environment variable edgecloud reads, in one place.

Secrets (tokens, passwords) come from the environment so that they stay out of shell history and
process listings; addresses come from it so that a shell session can point every ``edgecloud
fleet`` command at one controller. Nothing else in ``edgecloud``, ``device_agent`` or
``converters`` reads ``os.environ`` (a guard test in tests/test_import_boundaries.py holds
that), so this table is the whole list:

- ``EDGECLOUD_TOKEN``: the bearer token ``edgecloud cloud serve`` requires (``--token``);
- ``EDGECLOUD_MQTT_PASSWORD``: the MQTT password of a region's workers (``--mqtt-password``);
- ``EDGECLOUD_CONTROLLER``: the fleet controller URL of ``edgecloud fleet ...`` and
  ``ControllerClient`` (``--controller``);
- ``EDGECLOUD_FLEET_TOKEN``: the fleet API bearer token, the one ``fleet serve`` requires and
  the one ``edgecloud fleet ...`` and ``ControllerClient`` send (``--token``).

A command-line flag or an explicit argument always wins over the variable. Each accessor
returns the value as set (an empty string included) or None when the variable is unset, and
reads the environment when called, not at import, so a test or a launcher can set it late.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "CONTROLLER",
    "FLEET_TOKEN",
    "MQTT_PASSWORD",
    "REGION_TOKEN",
    "VARIABLES",
    "EnvVar",
    "controller_url",
    "fleet_token",
    "mqtt_password",
    "region_token",
]


@dataclass(frozen=True)
class EnvVar:
    """One variable: its name and what it sets (shown in the docs and in ``--help``)."""

    name: str
    sets: str

    def get(self) -> str | None:
        return os.environ.get(self.name)


REGION_TOKEN = EnvVar("EDGECLOUD_TOKEN", "bearer token required by `edgecloud cloud serve`")
MQTT_PASSWORD = EnvVar("EDGECLOUD_MQTT_PASSWORD", "MQTT password of a region's workers")
CONTROLLER = EnvVar("EDGECLOUD_CONTROLLER", "fleet controller URL for `edgecloud fleet ...`")
FLEET_TOKEN = EnvVar("EDGECLOUD_FLEET_TOKEN", "fleet API bearer token (served and sent)")

#: Every variable edgecloud reads; docs/architecture.md lists the same names.
VARIABLES: tuple[EnvVar, ...] = (REGION_TOKEN, MQTT_PASSWORD, CONTROLLER, FLEET_TOKEN)


def region_token() -> str | None:
    """``EDGECLOUD_TOKEN``: the bearer token a cloud region requires."""
    return REGION_TOKEN.get()


def mqtt_password() -> str | None:
    """``EDGECLOUD_MQTT_PASSWORD``: the password the region's MQTT workers log in with."""
    return MQTT_PASSWORD.get()


def controller_url() -> str | None:
    """``EDGECLOUD_CONTROLLER``: the fleet controller the fleet commands talk to."""
    return CONTROLLER.get()


def fleet_token() -> str | None:
    """``EDGECLOUD_FLEET_TOKEN``: the fleet API's bearer token."""
    return FLEET_TOKEN.get()
