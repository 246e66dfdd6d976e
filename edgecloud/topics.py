"""Every MQTT topic edgecloud uses, in one place (documented in docs/protocol.md).

Everything a device may touch lives under ``{prefix}/devices/{device_id}/``, so a broker ACL with
``%u`` (username = device id) or ``%c`` (client id) patterns confines each device to its own
topics: it can publish its own inference requests, reported state, job updates, telemetry and
status, and read its own replies, desired state and job notifications, and nothing of any other
device. Cloud workers read every device's requests for their region through a shared
subscription, so any number of workers share a region's load; the fleet controller reads reported
state, job updates, telemetry and status of all devices and writes desired state and jobs.

The same layout works on Mosquitto, EMQX, HiveMQ and AWS IoT Core: only plain topics, ``+``/``#``
wildcards, retained messages, MQTT 5 properties and ``$share`` subscriptions are used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgecloud.errors import ConfigError

__all__ = ["DEFAULT_PREFIX", "Topics", "check_segment"]

DEFAULT_PREFIX = "edgecloud"
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_segment(value: str, what: str) -> str:
    """A device id, region or model name must be one plain topic level (no ``/ + # $``)."""
    if not _SEGMENT.match(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-128 letters, digits, '.', '_' or '-' "
            "(it is used as an MQTT topic level)"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix. All methods return concrete topics or subscription filters."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if (
            not self.prefix
            or any(c in self.prefix for c in "+#")
            or self.prefix.startswith(("/", "$"))
            or self.prefix.endswith("/")
        ):
            raise ConfigError(f"MQTT topic prefix {self.prefix!r} is not a plain topic prefix")

    def device(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{check_segment(device_id, 'device id')}"

    # -- inference (request/response, MQTT 5 Response Topic + Correlation Data) -------------
    def infer_request(self, device_id: str, region: str) -> str:
        """Where a device publishes V2 requests for ``region``."""
        return f"{self.device(device_id)}/infer/{check_segment(region, 'region')}/request"

    def infer_reply(self, device_id: str) -> str:
        """A device's own reply topic (sent as the MQTT 5 Response Topic)."""
        return f"{self.device(device_id)}/infer/reply"

    def infer_worker_filter(self, region: str, group: str | None = None) -> str:
        """The shared subscription a region's workers use to split the load."""
        g = check_segment(group or f"workers-{region}", "share group")
        return f"$share/{g}/{self.prefix}/devices/+/infer/{check_segment(region, 'region')}/request"

    # -- fleet: shadow, jobs, telemetry, status -----------------------------------------------
    def shadow_desired(self, device_id: str) -> str:
        """Retained desired state written by the controller."""
        return f"{self.device(device_id)}/shadow/desired"

    def shadow_reported(self, device_id: str) -> str:
        """Retained reported state written by the device."""
        return f"{self.device(device_id)}/shadow/reported"

    def jobs_notify(self, device_id: str) -> str:
        """Job executions for the device (the controller publishes; QoS 1)."""
        return f"{self.device(device_id)}/jobs/notify"

    def jobs_cancel(self, device_id: str) -> str:
        """Cancel messages for the device's job executions (the controller publishes; QoS 1)."""
        return f"{self.device(device_id)}/jobs/cancel"

    def job_update(self, device_id: str, job_id: str) -> str:
        """Execution status updates from the device for one job."""
        return f"{self.device(device_id)}/jobs/{check_segment(job_id, 'job id')}/update"

    def telemetry(self, device_id: str) -> str:
        return f"{self.device(device_id)}/telemetry"

    def status(self, device_id: str) -> str:
        """Retained online/offline status; the offline message is the device's last will."""
        return f"{self.device(device_id)}/status"

    # -- controller-side filters -------------------------------------------------------------
    def all_reported(self) -> str:
        return f"{self.prefix}/devices/+/shadow/reported"

    def all_job_updates(self) -> str:
        return f"{self.prefix}/devices/+/jobs/+/update"

    def all_telemetry(self) -> str:
        return f"{self.prefix}/devices/+/telemetry"

    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def device_of(self, topic: str) -> str | None:
        """The device id in a topic under ``{prefix}/devices/``, or None."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :]
        dev = rest.split("/", 1)[0]
        return dev if _SEGMENT.match(dev) else None

    def mosquitto_acl(
        self, worker_user: str = "worker", controller_user: str = "controller"
    ) -> str:
        """A Mosquitto ACL file confining devices (username = device id) to their own topics."""
        p = self.prefix
        return "\n".join(
            [
                f"user {worker_user}",
                f"topic read {p}/devices/+/infer/+/request",
                f"topic write {p}/devices/+/infer/reply",
                "",
                f"user {controller_user}",
                f"topic readwrite {p}/devices/#",
                "",
                "# every other user is a device whose username is its device id",
                f"pattern write {p}/devices/%u/infer/+/request",
                f"pattern read {p}/devices/%u/infer/reply",
                f"pattern read {p}/devices/%u/shadow/desired",
                f"pattern readwrite {p}/devices/%u/shadow/reported",
                f"pattern read {p}/devices/%u/jobs/notify",
                f"pattern read {p}/devices/%u/jobs/cancel",
                f"pattern write {p}/devices/%u/jobs/+/update",
                f"pattern write {p}/devices/%u/telemetry",
                f"pattern readwrite {p}/devices/%u/status",
                "",
            ]
        )
