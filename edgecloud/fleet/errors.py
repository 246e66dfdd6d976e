"""The fleet controller's refusals that callers tell apart (the HTTP side maps them to codes)."""

from __future__ import annotations

from edgecloud.errors import FleetError

__all__ = ["NotActive", "NotFound", "UnknownTarget"]


class NotFound(FleetError):
    """A device, job or package the caller named does not exist."""


class NotActive(FleetError):
    """This controller is a standby: writes go to the active one (HTTP 503)."""


class UnknownTarget(FleetError):
    """A job or policy names a target that is neither a known device nor a group (bad input)."""
