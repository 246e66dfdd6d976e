"""``edgecloud fleet ...``: run the fleet controller and talk to it.

``serve`` runs the controller; every other command is a thin client of its HTTP API
(``--controller`` or ``EDGECLOUD_CONTROLLER``, default http://127.0.0.1:8780; a bearer token from
``--token`` or ``EDGECLOUD_FLEET_TOKEN``). Every command takes ``--json`` for scripts.

Exit codes: 0 ok; 1 the operation failed (controller unreachable, job ended with failures or was
canceled when waited for); 2 bad input (unknown target, malformed rate or timeout); 3 missing
dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgecloud import environment
from edgecloud.errors import ConfigError, EdgeCloudError
from edgecloud.fleet.jobs import parse_duration, parse_rate, parse_retry
from edgecloud.fleet.messages import validate_policy

__all__ = ["register"]

_FAILS = ("FAILED", "REJECTED", "TIMED_OUT", "CANCELED")


def register(sub: Any) -> None:
    p = sub.add_parser("fleet", help="manage a fleet: devices, deployments, jobs, policy")
    fsub = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)

    def client_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--controller", help="controller URL (env EDGECLOUD_CONTROLLER)")
        q.add_argument("--token", help="API bearer token (env EDGECLOUD_FLEET_TOKEN)")
        q.add_argument("--json", action="store_true", help="machine-readable output")

    s = fsub.add_parser("serve", help="run the fleet controller")
    s.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port")
    s.add_argument("--db", default="fleet.sqlite", help="SQLite path or SQLAlchemy URL")
    s.add_argument("--packages", type=Path, default=Path("fleet-packages"))
    s.add_argument("--http-host", default="127.0.0.1")
    s.add_argument("--http-port", type=int, default=8780)
    s.add_argument("--public-url", default="", help="package base URL devices use")
    s.add_argument("--public-key", type=Path, help="refuse packages not signed by this key")
    s.add_argument("--token", help="require this API bearer token (env EDGECLOUD_FLEET_TOKEN)")
    s.add_argument("--prefix", default="edgecloud", help="MQTT topic prefix")
    s.add_argument(
        "--ha-lease",
        metavar="DURATION",
        help="run as one of several controllers on one database: the holder of a lease of "
        "this length is active, the others stand by and take over (e.g. 10s)",
    )
    s.add_argument(
        "--instance-id", help="this controller's name in the lease (default: host-random)"
    )
    s.set_defaults(func=_serve)

    d = fsub.add_parser("devices", help="list devices")
    d.add_argument("--group", action="append", default=[], help="only this group (repeatable)")
    d.add_argument("--version", action="append", default=[], help="only devices on this version")
    d.add_argument(
        "--status",
        choices=("online", "offline", "failing", "reprovisioned"),
        help="only devices in this state",
    )
    d.add_argument("--seen-within", metavar="DURATION", help="only devices seen in the last 10m")
    d.add_argument("--not-seen-for", metavar="DURATION", help="only devices silent for 1h or more")
    d.add_argument(
        "--sort",
        choices=("device", "group", "version", "status", "last-seen"),
        default="device",
        help="sort order (last-seen: most recent first)",
    )
    client_args(d)
    d.set_defaults(func=_devices)

    sm = fsub.add_parser("summary", help="fleet health at a glance")
    client_args(sm)
    sm.set_defaults(func=_summary)

    dep = fsub.add_parser("deploy", help="deploy a package directory to groups or devices")
    dep.add_argument("package", type=Path, help="a signed package directory")
    dep.add_argument(
        "--upload",
        action="store_true",
        help="send the package over HTTP (default when the controller is not on this machine)",
    )
    _job_args(dep)
    client_args(dep)
    dep.set_defaults(func=_deploy)

    rb = fsub.add_parser("rollback", help="return groups or devices to their previous model")
    rb.add_argument("--version", help="a specific version to return to (default: previous)")
    _job_args(rb)
    client_args(rb)
    rb.set_defaults(func=_rollback)

    j = fsub.add_parser("jobs", help="list jobs")
    client_args(j)
    j.set_defaults(func=_jobs)

    st = fsub.add_parser("status", help="one job's progress")
    st.add_argument("job_id")
    st.add_argument("--wait", action="store_true", help="follow until the job ends")
    st.add_argument("--wait-timeout", default="1h", help="give up waiting after this long")
    client_args(st)
    st.set_defaults(func=_status)

    c = fsub.add_parser("cancel", help="cancel a job")
    c.add_argument("job_id")
    c.add_argument("--force", action="store_true", help="also cancel executions in progress")
    client_args(c)
    c.set_defaults(func=_cancel)

    pol = fsub.add_parser("policy", help="desired routing policy")
    psub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    ps = psub.add_parser("set", help="write the policy into the devices' desired state")
    ps.add_argument("--to", nargs="+", required=True, metavar="GROUP|DEVICE")
    ps.add_argument("--threshold", type=float, help="confidence threshold in [0, 1]")
    ps.add_argument("--mode", help="edge_first, edge_only, cloud_first, cloud_only")
    ps.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any other policy key (value parsed as JSON)",
    )
    client_args(ps)
    ps.set_defaults(func=_policy_set)

    sh = fsub.add_parser("shadow", help="a device's desired, reported and delta state")
    sh.add_argument("device_id")
    client_args(sh)
    sh.set_defaults(func=_shadow)


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


def _client(args: argparse.Namespace) -> Any:
    from edgecloud.fleet.client import ControllerClient

    return ControllerClient(args.controller, token=args.token)


def _print_json(obj: Any) -> None:
    _out(json.dumps(obj, indent=2, sort_keys=True))


def _out(text: str) -> None:
    """Print for a pipe that may close early (``| head``): no BrokenPipeError traceback."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's documented way: point stdout at devnull so the exit flush cannot fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _ago(ts: float) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


# -- serve -----------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from edgecloud.fleet.controller import FleetController
    from edgecloud.fleet.packages import PackageStore
    from edgecloud.fleet.server import FleetHTTPServer
    from edgecloud.fleet.store import open_store
    from edgecloud.package import load_public_key

    key = load_public_key(args.public_key) if args.public_key else None
    token = args.token or environment.fleet_token() or None
    if token is None and args.http_host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"edgecloud fleet serve: warning: the API on {args.http_host} has no --token; anyone "
            "who can reach it can deploy to the fleet",
            file=sys.stderr,
        )
    try:
        lease = parse_duration(args.ha_lease, "--ha-lease") if args.ha_lease else None
    except EdgeCloudError as exc:
        raise ConfigError(str(exc)) from exc
    store = open_store(args.db)
    ctl = FleetController(
        args.broker,
        store,
        PackageStore(args.packages, key),
        prefix=args.prefix,
        public_base_url=args.public_url,
        lease_s=lease,
        instance_id=args.instance_id,
    )
    http = FleetHTTPServer(ctl, args.http_host, args.http_port, token=token)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctl.start()
    http.start()
    print(f"fleet controller: API and packages on {http.url}, broker {args.broker}", flush=True)
    print(f"fleet console: {http.url}/console/ (same token as the API)", flush=True)
    try:
        stop.wait()
    finally:
        http.close()
        ctl.close()
    return 0


# -- reads -----------------------------------------------------------------------------------
def _device_status(d: dict[str, Any]) -> str:
    if d.get("reprovisioned_at") and time.time() - float(d["reprovisioned_at"]) < 86400:
        return "reprovisioned" if d["online"] else "offline"
    return "online" if d["online"] else "offline"


def _filter_devices(
    args: argparse.Namespace, devices: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    try:
        within = parse_duration(args.seen_within, "--seen-within") if args.seen_within else None
        silent = parse_duration(args.not_seen_for, "--not-seen-for") if args.not_seen_for else None
    except EdgeCloudError as exc:
        raise ConfigError(str(exc)) from exc
    now = time.time()
    out = []
    for d in devices:
        if args.group and d.get("group", "") not in args.group:
            continue
        if args.version and d.get("model_version", "") not in args.version:
            continue
        st = args.status
        if st in ("online", "offline") and bool(d["online"]) != (st == "online"):
            continue
        if st == "reprovisioned" and not d.get("reprovisioned_at"):
            continue
        if st == "failing" and not d.get("last_failure"):
            continue
        seen = float(d.get("last_seen") or 0.0)
        if within is not None and now - seen > within:
            continue
        if silent is not None and now - seen < silent:
            continue
        out.append(d)
    keys: dict[str, Any] = {
        "device": lambda d: d["device_id"],
        "group": lambda d: (d.get("group", ""), d["device_id"]),
        "version": lambda d: (d.get("model_version", ""), d["device_id"]),
        "status": lambda d: (_device_status(d), d["device_id"]),
        "last-seen": lambda d: (-float(d.get("last_seen") or 0.0), d["device_id"]),
    }
    return sorted(out, key=keys[args.sort])


def _console() -> Any:
    """A rich console; not a terminal (a pipe, a file) gets full widths, never cut columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=10_000, soft_wrap=True)


def _devices(args: argparse.Namespace) -> int:
    with _client(args) as c:
        devices = _filter_devices(args, c.devices())
    if args.json:
        _print_json(devices)
        return 0
    from rich.table import Table

    t = Table(title=f"{len(devices)} devices")
    for col in (
        "device",
        "status",
        "group",
        "model",
        "version",
        "last seen",
        "telemetry",
        "jobs ok/failed",
        "pending",
        "last failure",
    ):
        t.add_column(col)
    for d in devices:
        cn = d.get("counters", {})
        failed = sum(cn.get(f"jobs_{s.lower()}", 0) for s in _FAILS)
        st = _device_status(d)
        colour = {"online": "green", "offline": "red", "reprovisioned": "yellow"}[st]
        lf = d.get("last_failure") or {}
        t.add_row(
            d["device_id"],
            f"[{colour}]{st}[/{colour}]",
            d.get("group", ""),
            d.get("model_name", ""),
            d.get("model_version", "") or "-",
            _ago(d.get("last_seen", 0.0)),
            f"{cn.get('telemetry', 0)} (dup {cn.get('telemetry_duplicates', 0)}, "
            f"gap {cn.get('telemetry_gaps', 0)})",
            f"{cn.get('jobs_succeeded', 0)}/{failed}",
            ", ".join(d.get("pending_jobs", [])),
            f"{lf.get('state', '')} {lf.get('reason', '')}".strip(),
        )
    _console().print(t)
    return 0


def _summary(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.summary()
    if args.json:
        _print_json(s)
        return 0
    con = _console()

    def pct(x: float | None) -> str:
        return "n/a (no requests yet)" if x is None else f"{100 * x:.1f}%"

    con.print(
        f"[bold]{s['devices']} devices[/bold]: [green]{s['online']} online[/green], "
        f"[red]{s['offline']} offline[/red], {s['reprovisioned']} re-provisioned; "
        f"{s['jobs_in_progress']} jobs in progress"
    )
    con.print("versions in use: " + ", ".join(f"{v} x{n}" for v, n in s["versions"].items()))
    con.print(
        f"requests {s['requests']}: offloaded to the cloud {pct(s['offload_rate'])}, "
        f"degraded answers {pct(s['degraded_rate'])}"
    )
    if s["failing"]:
        con.print(f"[red]{len(s['failing'])} failing devices[/red]:")
        for f in s["failing"]:
            con.print(f"  {f['device_id']}: {f['state']} {f['job_id'] or ''} {f['reason']}")
    else:
        con.print("no failing devices")
    return 0


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


# -- writes ----------------------------------------------------------------------------------
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


def _policy_set(args: argparse.Namespace) -> int:
    policy: dict[str, Any] = {}
    if args.threshold is not None:
        if not (0.0 <= args.threshold <= 1.0):
            raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
        policy["threshold"] = args.threshold
    if args.mode:
        policy["mode"] = args.mode
    for kv in args.set:
        key, sep, raw = kv.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {kv!r} must look like KEY=JSON")
        try:
            policy[key] = json.loads(raw)
        except json.JSONDecodeError:
            policy[key] = raw
    if not policy:
        raise ConfigError("nothing to set: give --threshold, --mode or --set KEY=VALUE")
    try:
        validate_policy(policy, "policy")  # the controller checks again; fail fast here
    except EdgeCloudError as exc:
        raise ConfigError(str(exc)) from exc
    with _client(args) as c:
        shadows = c.set_policy(list(args.to), policy)
    if args.json:
        _print_json(shadows)
    else:
        for s in shadows:
            print(
                f"{s['device_id']}: desired version {s['version']}, policy {s['desired']['policy']}"
            )
    return 0


def _shadow(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.shadow(args.device_id)
    if args.json:
        _print_json(s)
    else:
        print(json.dumps(s, indent=2, sort_keys=True))
    return 0
