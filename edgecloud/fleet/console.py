"""The fleet console: a browser page served by the controller itself, on the documented API only.

``edgecloud fleet serve`` serves ``/console/`` (and redirects ``/`` there): one HTML page, one
stylesheet and one script from ``console_static/``, with no external assets (devices and
operators may be offline) and no build step. The page draws its tables and its plots (inline SVG)
in the browser from the JSON API, polling it at a bounded rate; it has no endpoint of its own.
Where the console needs figures the API lacked, they are API endpoints like any other,
documented in docs/fleet.md and usable by scripts:

    GET /api/routing?window=S&step=S   per group: offload, degraded rate and each region's
                                       requests, failures and latency over time, from telemetry
    GET /api/devices/<id>/jobs         that device's job executions, newest first, with reasons
    GET /api/telemetry/latest          every device's newest telemetry record (variant, health)

The static files carry no data, so they are served without the token; every figure on the page
comes from the API, which asks for the same bearer token as for the CLI. The page reads a token
from the URL's fragment (``#token=...``, never sent to a server or written to a log) or asks for
it, and keeps it in the tab's ``sessionStorage``. A ``Content-Security-Policy`` of ``'self'``
makes the browser refuse anything from elsewhere, so "no external assets" is enforced, not hoped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from edgecloud.errors import FleetError

__all__ = [
    "CONSOLE_PREFIX",
    "console_api",
    "device_jobs_view",
    "latest_telemetry_view",
    "routing_view",
    "static_file",
]

CONSOLE_PREFIX = "/console/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_FILES = ("index.html", "console.css", "console.js", "favicon.svg")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
MAX_WINDOW_S = 24 * 3600.0
MAX_POINTS = 240  # per series: a plot never grows with the window
RECENT_S = 30.0  # "fails every request" is judged over this much of the newest telemetry
_STATE_RANK = {"closed": 0, "half_open": 1, "open": 2}


def static_file(path: str) -> tuple[bytes, str] | None:
    """The console file at ``path`` (``/console/...``) -> (bytes, content type); None if none.

    Only the files shipped in ``console_static/`` are served (a fixed list, so no path from a
    request ever reaches the file system).
    """
    name = path[len(CONSOLE_PREFIX) :] if path.startswith(CONSOLE_PREFIX) else ""
    name = name.split("?", 1)[0].split("#", 1)[0] or "index.html"
    if name not in _FILES:
        return None
    data = resources.files("edgecloud.fleet").joinpath("console_static", name).read_bytes()
    return data, _TYPES[name[name.rindex(".") :]]


class _BadQuery(FleetError):
    """A query parameter the console endpoints cannot use (the API answers 400)."""


def _number(
    q: Mapping[str, Sequence[str]], key: str, default: float, lo: float, hi: float
) -> float:
    raw = q.get(key, [None])[0]
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise _BadQuery(f"'{key}' must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise _BadQuery(f"'{key}' must be between {lo:g} and {hi:g} seconds, got {raw!r}")
    return v


def console_api(
    ctl: Any, method: str, parts: Sequence[str], q: Mapping[str, Sequence[str]]
) -> tuple[int, Any] | None:
    """The API routes this module adds (after ``/api/``); None when ``parts`` is not one."""
    if method != "GET":
        return None
    if list(parts) == ["routing"]:
        window = _number(q, "window", 600.0, 10.0, MAX_WINDOW_S)
        step = _number(q, "step", 0.0, 0.0, MAX_WINDOW_S)
        return 200, routing_view(ctl, window_s=window, step_s=step or None)
    if len(parts) == 3 and parts[0] == "devices" and parts[2] == "jobs":
        return 200, device_jobs_view(ctl, parts[1])
    if list(parts) == ["telemetry", "latest"]:
        return 200, latest_telemetry_view(ctl)
    return None


def latest_telemetry_view(ctl: Any) -> dict[str, Any]:
    """``{device_id: its newest telemetry record}`` for devices that sent one."""
    out: dict[str, Any] = {}
    for dev in ctl.devices_view():
        recs = _telemetry_since(ctl, dev["device_id"], math.inf, newest=1)
        if recs:
            out[dev["device_id"]] = recs[-1]
    return out


def _telemetry_since(
    ctl: Any, device_id: str, since_ts: float, *, newest: int = 0
) -> list[dict[str, Any]]:
    """The device's records from ``since_ts`` on (or its ``newest`` ones), oldest first.

    Walks the controller's in-memory ring from its newest end under the controller's lock and
    stops at the first older record, so a console poll costs what its window holds, not the
    whole ring (``TELEMETRY_KEEP`` records per device). Records are in arrival order, which is
    the device's order (its outbox publishes by ``seq``). A controller without that ring falls
    back to ``telemetry_view``.
    """
    lock, rings = getattr(ctl, "_lock", None), getattr(ctl, "telemetry", None)
    if lock is None or not isinstance(rings, Mapping):
        recs = list(ctl.telemetry_view(device_id))
        return recs[-newest:] if newest else [r for r in recs if r.get("ts", 0) >= since_ts]
    out: list[dict[str, Any]] = []
    with lock:
        for r in reversed(rings.get(device_id) or ()):
            if newest and len(out) >= newest:
                break
            if not newest and float(r.get("ts", 0.0)) < since_ts:
                break
            out.append(r)
    out.reverse()
    return out


def device_jobs_view(ctl: Any, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The device's executions of the newest ``limit`` jobs that target it, newest first.

    Built from the controller's public job views, so it shows what ``GET /api/jobs/<id>``
    shows for that device: state, reason, timestamps, plus the job's operation and document.
    """
    ctl.device_view(device_id)  # NotFound -> 404
    out: list[dict[str, Any]] = []
    for job in reversed(ctl.jobs_view()):
        if len(out) >= limit:
            break
        if device_id not in (job.get("targets") or []):
            continue
        view = ctl.job_view(job["job_id"])
        for e in view.get("executions", []):
            if e.get("device_id") == device_id:
                doc = view.get("document") or {}
                out.append(
                    {
                        **e,
                        "operation": view.get("operation"),
                        "job_status": view.get("status"),
                        "job_reason": view.get("reason", ""),
                        "model": doc.get("model"),
                        "version": doc.get("version"),
                        "created_at": view.get("created_at"),
                    }
                )
    return out


def _num(d: Mapping[str, Any], key: str) -> float | None:
    v = d.get(key)
    # a tuple, not int | float: this runs for every figure of every heartbeat in a window
    return float(v) if isinstance(v, (int, float)) and v.__class__ is not bool else None


def routing_view(
    ctl: Any, *, window_s: float = 600.0, step_s: float | None = None, now: float | None = None
) -> dict[str, Any]:
    """Per group, the routing its devices reported over the last ``window_s`` seconds.

    Agents send cumulative counters in every heartbeat (requests, edge, cloud, degraded, and per
    region the attempts, failures, breaker state and latency percentiles of the requests it
    answered); the differences between a device's consecutive records are summed into buckets
    of ``step_s`` (default: the window over 120, at least 1 s). A counter that went down means the
    agent restarted, so that interval is skipped rather than counted negative.

    A region is ``failing`` when, over the newest ``RECENT_S`` seconds of telemetry, every
    attempt sent to it failed, or every device that knows it has its circuit open.
    """
    now = ctl.clock() if now is None else now
    step = step_s or max(1.0, window_s / 120.0)
    n_buckets = min(MAX_POINTS, max(1, math.ceil(window_s / step)))
    step = max(step, window_s / n_buckets)
    start = now - n_buckets * step
    groups: dict[str, dict[str, Any]] = {}
    for dev in ctl.devices_view():
        name = dev.get("group") or ""
        g = groups.get(name)
        if g is None:
            g = groups[name] = {"group": name, "devices": [], "online": 0, "b": {}, "r": {}}
        g["devices"].append(dev["device_id"])
        g["online"] += bool(dev.get("online"))
        recs = _telemetry_since(ctl, dev["device_id"], start - step)
        prev: Mapping[str, Any] | None = None
        for rec in recs:
            data = rec.get("data") or {}
            if not isinstance(data, Mapping):
                continue
            if prev is not None:
                _accumulate(g, prev, data, rec, start, step, n_buckets, now)
            prev = data
        if prev is not None:  # the newest record says each region's breaker state now
            for rname, rs in (prev.get("regions") or {}).items():
                if isinstance(rs, Mapping):
                    reg = _region(g, str(rname))
                    reg["states"].append(str(rs.get("state") or ""))
                    if rs.get("last_error"):
                        reg["last_error"] = str(rs["last_error"])
    return {
        "now": now,
        "window_s": n_buckets * step,
        "step_s": step,
        "groups": [_finish(groups[k], start, step, n_buckets, now) for k in sorted(groups)],
    }


def _region(g: dict[str, Any], name: str) -> dict[str, Any]:
    regions: dict[str, dict[str, Any]] = g["r"]
    if name not in regions:
        regions[name] = {"b": {}, "states": [], "last_error": "", "recent": [0.0, 0.0]}
    return regions[name]


def _delta(prev: Mapping[str, Any], cur: Mapping[str, Any], key: str) -> float | None:
    """How much a cumulative counter grew; None if missing or reset (the agent restarted)."""
    a, b = _num(prev, key), _num(cur, key)
    return None if a is None or b is None or b < a else b - a


def _accumulate(
    g: dict[str, Any],
    prev: Mapping[str, Any],
    cur: Mapping[str, Any],
    rec: Mapping[str, Any],
    start: float,
    step: float,
    n: int,
    now: float,
) -> None:
    ts = float(rec.get("ts", 0.0))
    if ts < start:
        return
    i = min(int((ts - start) // step), n - 1)
    deltas: dict[str, float] = {}
    for key in ("requests", "edge", "cloud", "degraded"):
        d = _delta(prev, cur, key)
        if d is None:
            return  # a restarted agent (counters from zero) or a record without counters
        deltas[key] = d
    bucket = g["b"].setdefault(i, {"requests": 0.0, "edge": 0.0, "cloud": 0.0, "degraded": 0.0})
    for k, v in deltas.items():
        bucket[k] += v
    pregions = prev.get("regions") or {}
    for rname, rs in (cur.get("regions") or {}).items():
        ps = pregions.get(rname) if isinstance(pregions, Mapping) else None
        if not isinstance(rs, Mapping) or not isinstance(ps, Mapping):
            continue
        attempts, failures = _delta(ps, rs, "requests"), _delta(ps, rs, "failures")
        if attempts is None or failures is None:
            continue
        reg = _region(g, str(rname))
        rb = reg["b"].setdefault(i, {"requests": 0.0, "failures": 0.0, "p50": [], "p95": []})
        rb["requests"] += attempts
        rb["failures"] += failures
        if attempts > failures:  # it answered something: its latency is current
            lat = rs.get("latency") or {}
            if isinstance(lat, Mapping):
                for p in ("p50", "p95"):
                    ms = _num(lat, f"{p}_ms")
                    if ms is not None:
                        rb[p].append(ms)
        if ts >= now - RECENT_S:
            reg["recent"][0] += attempts
            reg["recent"][1] += failures


def _finish(g: dict[str, Any], start: float, step: float, n: int, now: float) -> dict[str, Any]:
    series = []
    totals = {"requests": 0.0, "edge": 0.0, "cloud": 0.0, "degraded": 0.0}
    for i in range(n):
        b = g["b"].get(i)
        t = start + (i + 1) * step
        if b is None:
            series.append({"t": t, "requests": 0, "offload": None, "degraded_rate": None})
            continue
        for k in totals:
            totals[k] += b[k]
        req = b["requests"]
        series.append(
            {
                "t": t,
                "requests": req,
                "edge": b["edge"],
                "cloud": b["cloud"],
                "degraded": b["degraded"],
                "rate_per_s": req / step,
                "offload": b["cloud"] / req if req else None,
                "degraded_rate": b["degraded"] / req if req else None,
            }
        )
    regions = []
    for rname in sorted(g["r"]):
        reg = g["r"][rname]
        rseries = []
        req_total = fail_total = 0.0
        for i in range(n):
            rb = reg["b"].get(i)
            t = start + (i + 1) * step
            if rb is None:
                rseries.append({"t": t, "requests": 0, "failures": 0, "p50_ms": None})
                continue
            req_total += rb["requests"]
            fail_total += rb["failures"]
            rseries.append(
                {
                    "t": t,
                    "requests": rb["requests"],
                    "failures": rb["failures"],
                    "p50_ms": sum(rb["p50"]) / len(rb["p50"]) if rb["p50"] else None,
                    "p95_ms": max(rb["p95"]) if rb["p95"] else None,
                }
            )
        states = [s for s in reg["states"] if s]
        worst = max(states, key=lambda s: _STATE_RANK.get(s, 0)) if states else ""
        recent_req, recent_fail = reg["recent"]
        failing = (recent_req > 0 and recent_fail >= recent_req) or (
            bool(states) and all(s == "open" for s in states)
        )
        regions.append(
            {
                "name": rname,
                "state": worst,
                "states": sorted(set(states)),
                "requests": req_total,
                "failures": fail_total,
                "recent_requests": recent_req,
                "recent_failures": recent_fail,
                "failing": failing,
                "last_error": reg["last_error"],
                "series": rseries,
            }
        )
    req = totals["requests"]
    return {
        "group": g["group"],
        "devices": g["devices"],
        "online": g["online"],
        "requests": req,
        "offload": totals["cloud"] / req if req else None,
        "degraded_rate": totals["degraded"] / req if req else None,
        "series": series,
        "regions": regions,
    }


def respond(handler: Any, path: str) -> None:
    """Answer a GET for ``/`` (a redirect) or ``/console/...`` on ``handler`` (http.server's)."""
    if path.split("?", 1)[0] in ("/", "/console"):
        handler.send_response(302)
        handler.send_header("Location", CONSOLE_PREFIX)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return
    found = static_file(path)
    if found is None:
        body = b'{"error":"no console file at this path"}'
        handler.send_response(404)
        handler.send_header("Content-Type", "application/json")
    else:
        body, ctype = found
        handler.send_response(200)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Content-Security-Policy", CSP)
        handler.send_header("X-Content-Type-Options", "nosniff")
        handler.send_header("Referrer-Policy", "no-referrer")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
