"""What the fleet controller shows: jobs, devices, shadows, telemetry, a summary, metrics.

Read-only views over the controller's memory, each taken under its lock, as plain dicts the
HTTP API and the console serve as JSON.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgecloud.fleet.errors import NotFound
from edgecloud.fleet.jobs import Execution, JobEngine
from edgecloud.fleet.registry import Device, Shadow, compute_delta
from edgecloud.fleet.store import FleetStore

__all__ = ["ControllerViews"]


class ControllerViews:
    """The controller's read side (a part of ``FleetController``, kept apart to be read alone)."""

    clock: Callable[[], float]
    engine: JobEngine
    store: FleetStore
    devices: dict[str, Device]
    shadows: dict[str, Shadow]
    telemetry: dict[str, deque[dict[str, Any]]]
    stats: dict[str, int]
    active: bool
    lease_s: float | None
    _lock: threading.RLock

    @property
    def connected(self) -> bool:  # the controller's broker link
        raise NotImplementedError

    def job_view(self, job_id: str, *, executions: bool = True) -> dict[str, Any]:
        with self._lock:
            if job_id not in self.engine.jobs:
                raise NotFound(f"no job {job_id!r}")
            job = self.engine.jobs[job_id]
            out = job.to_dict()
            out["counts"] = self.engine.counts(job_id)
            out["total"] = len(job.targets)
            out["outcome"] = _job_outcome(job.status, out["counts"], out["total"])
            if executions:
                out["executions"] = [e.to_dict() for e in self.engine.executions_of(job_id)]
        return out

    def jobs_view(self) -> list[dict[str, Any]]:
        with self._lock:
            ids = sorted(self.engine.jobs, key=lambda j: self.engine.jobs[j].created_at)
            return [self.job_view(j, executions=False) for j in ids]

    def devices_view(self) -> list[dict[str, Any]]:
        with self._lock:
            last = self._last_finished()
            return [
                self._device_dict(d, last)
                for d in sorted(self.devices.values(), key=lambda d: d.device_id)
            ]

    def device_view(self, device_id: str) -> dict[str, Any]:
        with self._lock:
            d = self.devices.get(device_id)
            if d is None:
                raise NotFound(f"no device {device_id!r}")
            out = self._device_dict(d, self._last_finished())
            out["shadow"] = self.shadow_view(device_id)
        return out

    def _device_dict(self, d: Device, last: dict[str, Execution]) -> dict[str, Any]:
        out = d.to_dict()
        out.pop("reported", None)
        out.pop("past_epochs", None)
        pending = [e for e in self.engine._pending_of(d.device_id)]
        out["pending_jobs"] = [e.job_id for e in pending]
        out["last_failure"] = self._failure_of(d, last.get(d.device_id))
        return out

    def _last_finished(self) -> dict[str, Execution]:
        """Each device's most recently finished execution (any job)."""
        last: dict[str, Execution] = {}
        for e in self.engine.executions.values():
            if e.terminal:
                cur = last.get(e.device_id)
                if cur is None or e.updated_at >= cur.updated_at:
                    last[e.device_id] = e
        return last

    @staticmethod
    def _failure_of(d: Device, e: Execution | None) -> dict[str, Any] | None:
        """Why a device counts as failing: its last execution did not succeed, or its
        reported state carries a desired-state error. None when it is healthy."""
        if e is not None and e.state.value != "SUCCEEDED":
            return {"job_id": e.job_id, "state": e.state.value, "reason": e.reason}
        if d.reported.get("error"):
            return {"job_id": None, "state": "DESIRED_ERROR", "reason": str(d.reported["error"])}
        return None

    def summary_view(self) -> dict[str, Any]:
        """Fleet health at a glance (``fleet summary``, ``GET /api/summary``).

        Versions in use and online/offline come from the registry (the devices' reported
        shadows and statuses). A device is *failing* when its last finished job execution did
        not succeed or its reported state carries a desired-state error. Offload and degraded
        rates add up each device's latest heartbeat (counts since that agent started).
        """
        with self._lock:
            devices = list(self.devices.values())
            last_exec = self._last_finished()
            versions: dict[str, int] = {}
            failing: list[dict[str, Any]] = []
            requests = cloud = degraded = 0
            for d in sorted(devices, key=lambda d: d.device_id):
                key = f"{d.model_name} {d.model_version}".strip() or "(none)"
                versions[key] = versions.get(key, 0) + 1
                failure = self._failure_of(d, last_exec.get(d.device_id))
                if failure is not None:
                    failing.append({"device_id": d.device_id, **failure})
                ring = self.telemetry.get(d.device_id)
                if ring:
                    data = ring[-1].get("data") or {}
                    requests += int(data.get("requests") or 0)
                    cloud += int(data.get("cloud") or 0)
                    degraded += int(data.get("degraded") or 0)
            online = sum(d.online for d in devices)
            return {
                "devices": len(devices),
                "online": online,
                "offline": len(devices) - online,
                "reprovisioned": sum(d.reprovisioned_at is not None for d in devices),
                "versions": dict(sorted(versions.items())),
                "failing": failing,
                "requests": requests,
                "offload_rate": round(cloud / requests, 4) if requests else None,
                "degraded_rate": round(degraded / requests, 4) if requests else None,
                "jobs_in_progress": sum(
                    j.status == "IN_PROGRESS" for j in self.engine.jobs.values()
                ),
            }

    def telemetry_view(self, device_id: str, after: int = -1) -> list[dict[str, Any]]:
        with self._lock:
            if device_id not in self.devices:
                raise NotFound(f"no device {device_id!r}")
            return [r for r in self.telemetry.get(device_id, ()) if r["seq"] > after]

    def shadow_view(self, device_id: str) -> dict[str, Any]:
        with self._lock:
            d = self.devices.get(device_id)
            s = self.shadows.get(device_id) or Shadow(device_id)
            reported = d.reported if d else {}
            return {
                "device_id": device_id,
                "version": s.version,
                "desired": s.desired,
                "reported": reported,
                "reported_version": d.reported_version if d else 0,
                "delta": compute_delta(s.desired, reported),
            }

    def metrics_text(self) -> str:
        """Prometheus text exposition of the registry and jobs (no client library needed)."""
        with self._lock:
            online = sum(d.online for d in self.devices.values())
            lines = [
                "# HELP edgecloud_fleet_devices Devices known to the controller.",
                "# TYPE edgecloud_fleet_devices gauge",
                f'edgecloud_fleet_devices{{online="true"}} {online}',
                f'edgecloud_fleet_devices{{online="false"}} {len(self.devices) - online}',
                "# HELP edgecloud_fleet_jobs Jobs by status.",
                "# TYPE edgecloud_fleet_jobs gauge",
            ]
            by_status: dict[str, int] = {}
            for j in self.engine.jobs.values():
                by_status[j.status] = by_status.get(j.status, 0) + 1
            for status in ("IN_PROGRESS", "COMPLETED", "CANCELED"):
                lines.append(
                    f'edgecloud_fleet_jobs{{status="{status}"}} {by_status.get(status, 0)}'
                )
            lines += [
                "# HELP edgecloud_fleet_executions Job executions by state (all jobs).",
                "# TYPE edgecloud_fleet_executions gauge",
            ]
            by_state: dict[str, int] = {}
            for e in self.engine.executions.values():
                by_state[e.state.value] = by_state.get(e.state.value, 0) + 1
            for state in sorted(by_state):
                lines.append(f'edgecloud_fleet_executions{{state="{state}"}} {by_state[state]}')
            lines += [
                "# HELP edgecloud_fleet_messages_total Device messages by outcome.",
                "# TYPE edgecloud_fleet_messages_total counter",
            ]
            for k in sorted(self.stats):
                lines.append(f'edgecloud_fleet_messages_total{{outcome="{k}"}} {self.stats[k]}')
            telemetry = sum(d.counters.get("telemetry", 0) for d in self.devices.values())
            dups = sum(d.counters.get("telemetry_duplicates", 0) for d in self.devices.values())
            gaps = sum(d.counters.get("telemetry_gaps", 0) for d in self.devices.values())
            lines += [
                "# HELP edgecloud_fleet_telemetry_records_total Telemetry records by outcome.",
                "# TYPE edgecloud_fleet_telemetry_records_total counter",
                f'edgecloud_fleet_telemetry_records_total{{outcome="accepted"}} {telemetry}',
                f'edgecloud_fleet_telemetry_records_total{{outcome="duplicate"}} {dups}',
                f'edgecloud_fleet_telemetry_records_total{{outcome="missing"}} {gaps}',
                "# HELP edgecloud_fleet_broker_connected Whether the controller has the broker.",
                "# TYPE edgecloud_fleet_broker_connected gauge",
                f"edgecloud_fleet_broker_connected {int(self.connected)}",
            ]
        return "\n".join(lines) + "\n"

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll ``predicate`` under the lock (for tests and the benchmark)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate():
                    return True
            time.sleep(0.02)
        with self._lock:
            return predicate()

    def execution(self, job_id: str, device_id: str) -> Execution | None:
        with self._lock:
            return self.engine.executions.get((job_id, device_id))

    def job_done(self, job_id: str) -> bool:
        with self._lock:
            job = self.engine.jobs.get(job_id)
            return job is not None and job.status != "IN_PROGRESS"


def _job_outcome(status: str, counts: dict[str, int], total: int) -> str:
    """One word for a job's end: what its devices did, not only whether it ended.

    ``IN_PROGRESS``; ``SUCCEEDED`` (every device); ``ALL_FAILED`` (no device succeeded, all
    ended); ``PARTIAL`` (some did); ``CANCELED`` (canceled or aborted before every device ran).
    """
    ok = counts.get("SUCCEEDED", 0)
    ended = sum(n for s, n in counts.items() if s not in ("QUEUED", "IN_PROGRESS"))
    if status == "IN_PROGRESS":
        return "IN_PROGRESS"
    if ok == total:
        return "SUCCEEDED"
    if ok == 0 and ended == total and counts.get("CANCELED", 0) < total:
        return "ALL_FAILED"
    if status == "CANCELED" and ok == 0:
        return "CANCELED"
    return "PARTIAL"
