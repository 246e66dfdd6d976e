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
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edgecloud import environment
from edgecloud.cli.fleet_common import _ago, _client, _console, _print_json
from edgecloud.cli.fleet_jobs import _FAILS, _cancel, _deploy, _job_args, _jobs, _rollback, _status
from edgecloud.errors import ConfigError, EdgeCloudError
from edgecloud.fleet.jobs import parse_duration
from edgecloud.fleet.messages import validate_policy

__all__ = ["register"]


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


# -- writes ----------------------------------------------------------------------------------


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
