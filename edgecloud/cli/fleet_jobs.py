"""``edgecloud fleet deploy|rollback|jobs|status|cancel``: create jobs, follow them, end them.

A created job is printed (or followed with ``--wait`` until it ends); the exit code says how it
ended: 0 succeeded, 1 ended with failures or canceled. Options map onto the controller's job
API (rollout rate, abort criteria, timeouts, retries; see docs/fleet.md).
"""

from __future__ import annotations

import argparse
import time
from typing import Any
from urllib.parse import urlsplit

from edgecloud.cli.fleet_common import _client, _console, _print_json
from edgecloud.errors import ConfigError, EdgeCloudError
from edgecloud.fleet.jobs import parse_duration, parse_rate, parse_retry

_FAILS = ("FAILED", "REJECTED", "TIMED_OUT", "CANCELED")


def _job_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--to", nargs="+", required=True, metavar="GROUP|DEVICE")
    q.add_argument("--job-id", help="job id (default: generated)")
    q.add_argument("--rate", help="maximum notifications per minute, e.g. 10/min")
    q.add_argument("--exp-base-rate", help="exponential rollout: starting rate per minute")
    q.add_argument("--exp-factor", type=float, default=2.0, help="exponential rollout factor")
    q.add_argument(
        "--exp-on-succeeded",
        type=int,
        default=1,
        help="multiply the rate each time this many more devices succeeded",
    )
    q.add_argument(
        "--abort-failed-percent",
        type=float,
        help="cancel the job when this %% of executed devices failed",
    )
    q.add_argument(
        "--abort-failure-type", default="ALL", choices=("FAILED", "REJECTED", "TIMED_OUT", "ALL")
    )
    q.add_argument("--abort-min-executed", type=int, default=1)
    q.add_argument("--timeout", default="10m", help="in-progress timeout per device (10m)")
    q.add_argument("--job-timeout", help="time out executions still QUEUED after this long")
    q.add_argument(
        "--retry",
        metavar="TYPE:N,...",
        help="retries per failure type, e.g. FAILED:2,TIMED_OUT:1 (types FAILED, TIMED_OUT, ALL)",
    )
    q.add_argument("--wait", action="store_true", help="follow the job until it ends")


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        rollout: dict[str, Any] = {}
        if args.rate:
            rollout["max_per_minute"] = parse_rate(args.rate)
        if args.exp_base_rate:
            rollout["base_rate_per_minute"] = parse_rate(args.exp_base_rate)
            rollout["increment_factor"] = args.exp_factor
            rollout["on_succeeded"] = args.exp_on_succeeded
        opts: dict[str, Any] = {
            "rollout": rollout,
            "timeout_s": parse_duration(args.timeout, "--timeout"),
            "abort": [],
        }
        if args.job_timeout:
            opts["job_timeout_s"] = parse_duration(args.job_timeout, "--job-timeout")
        if args.retry:
            opts["retry"] = parse_retry(args.retry)
    except EdgeCloudError as exc:
        raise ConfigError(str(exc)) from exc
    if args.abort_failed_percent is not None:
        opts["abort"] = [
            {
                "failure_type": args.abort_failure_type,
                "threshold_percent": args.abort_failed_percent,
                "min_executed": args.abort_min_executed,
            }
        ]
    if args.job_id:
        opts["job_id"] = args.job_id
    return opts


def _jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        jobs = c.jobs()
    if args.json:
        _print_json(jobs)
        return 0
    from rich.table import Table

    t = Table(title=f"{len(jobs)} jobs")
    for col in (
        "job",
        "operation",
        "status",
        "outcome",
        "targets",
        "succeeded",
        "failed",
        "rejected",
        "timed out",
        "canceled",
        "queued",
        "in progress",
        "reason",
    ):
        t.add_column(col)
    for j in jobs:
        n = j["counts"]
        t.add_row(
            j["job_id"],
            j["operation"],
            j["status"],
            j.get("outcome", ""),
            str(j["total"]),
            str(n["SUCCEEDED"]),
            str(n["FAILED"]),
            str(n["REJECTED"]),
            str(n["TIMED_OUT"]),
            str(n["CANCELED"]),
            str(n["QUEUED"]),
            str(n["IN_PROGRESS"]),
            j["reason"],
        )
    _console().print(t)
    return 0


def _job_exit(job: dict[str, Any]) -> int:
    ok = job["status"] == "COMPLETED" and job["counts"]["SUCCEEDED"] == job["total"]
    return 0 if ok else 1


def _print_job(job: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    n = job["counts"]
    console.print(
        f"[bold]{job['job_id']}[/bold] {job['operation']} {job['status']}"
        + (f" [{job['outcome']}]" if job.get("outcome") else "")
        + (f" ({job['reason']})" if job["reason"] else "")
        + "  "
        + "  ".join(f"{k}={v}" for k, v in n.items() if v)
    )
    if job.get("executions"):
        t = Table()
        for col in ("device", "state", "attempt", "reason"):
            t.add_column(col)
        for e in job["executions"]:
            t.add_row(e["device_id"], e["state"], str(e.get("execution_number", 1)), e["reason"])
        console.print(t)


def _follow(c: Any, job_id: str, timeout_s: float, quiet: bool) -> dict[str, Any]:
    """Follow a job: one bar per state that has devices, the elapsed time, and each device that
    fails printed with its reason as soon as it does."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + timeout_s
    job = c.job(job_id)
    reported: set[tuple[str, str, int]] = set()
    with Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=quiet,
        transient=False,
        console=_console(),
    ) as progress:
        tasks: dict[str, Any] = {}
        while True:
            n = job["counts"]
            for state in ("SUCCEEDED", *_FAILS, "IN_PROGRESS", "QUEUED"):
                if n.get(state) and state not in tasks:
                    tasks[state] = progress.add_task(state, total=job["total"])
                if state in tasks:
                    progress.update(tasks[state], completed=n.get(state, 0))
            for e in job.get("executions", []):
                key = (e["device_id"], e["state"], int(e.get("execution_number", 1)))
                if e["state"] in _FAILS and key not in reported:
                    reported.add(key)
                    progress.console.print(
                        f"  [red]{e['device_id']}[/red] {e['state']}: {e['reason']}"
                    )
            if job["status"] != "IN_PROGRESS" and n["IN_PROGRESS"] == 0:
                if not quiet:
                    progress.console.print(
                        f"job {job_id} {job['status']}: {job.get('outcome', '')}"
                        + (" (every device failed)" if job.get("outcome") == "ALL_FAILED" else "")
                    )
                return dict(job)
            if time.monotonic() > deadline:
                raise EdgeCloudError(f"job {job_id} still {job['status']} after {timeout_s:g}s")
            time.sleep(0.5)
            job = c.job(job_id)


def _status(args: argparse.Namespace) -> int:
    try:
        wait_s = parse_duration(args.wait_timeout, "--wait-timeout")
    except EdgeCloudError as exc:
        raise ConfigError(str(exc)) from exc
    with _client(args) as c:
        job = _follow(c, args.job_id, wait_s, args.json) if args.wait else c.job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        _print_job(job)
    return _job_exit(job) if args.wait else 0


def _after_create(args: argparse.Namespace, c: Any, job: dict[str, Any]) -> int:
    if args.wait:
        job = _follow(c, job["job_id"], 24 * 3600.0, args.json)
    if args.json:
        _print_json(job)
    else:
        print(f"job {job['job_id']}: {job['operation']} to {job['total']} devices, {job['status']}")
    return _job_exit(job) if args.wait else 0


def _deploy(args: argparse.Namespace) -> int:
    if not args.package.is_dir():
        raise ConfigError(f"{args.package} is not a package directory")
    opts = _job_options(args)
    with _client(args) as c:
        host = urlsplit(c.base_url).hostname or ""
        upload = args.upload or host not in ("127.0.0.1", "::1", "localhost")
        job = c.deploy(args.package, list(args.to), upload=upload, **opts)
        return _after_create(args, c, job)


def _rollback(args: argparse.Namespace) -> int:
    opts = _job_options(args)
    with _client(args) as c:
        job = c.rollback(list(args.to), args.version, **opts)
        return _after_create(args, c, job)


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.cancel(args.job_id, force=args.force)
    if args.json:
        _print_json(job)
    else:
        print(f"job {job['job_id']}: {job['status']}")
    return 0
