"""The controller's HTTP side: package downloads for devices and a small JSON API for the CLI.

The standard library's ``ThreadingHTTPServer`` is enough: downloads are plain files and the API
is a handful of small JSON calls, so the controller needs no web framework.

Downloads (``GET``/``HEAD /packages/<name>/<version>.tar.gz``) honour one ``Range`` per request
(``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) with ``206``/``Content-Range``, ``416`` for a range
beyond the end, and ``ETag``/``If-Range`` (the archive's sha256), so a device on a flaky link
resumes where it stopped instead of starting over. Packages are signed, so downloads need no
token; the API does when the controller has one (``Authorization: Bearer <token>``).

API (JSON; errors are ``{"error": "..."}`` with 400 bad input, 401 token, 404 unknown, 409
shadow conflict, 503 a standby controller asked to write):

    GET  /metrics                           Prometheus text: devices, jobs, executions, messages
    GET  /api/health                        {"ok", "connected", "devices", "jobs"}
    GET  /api/devices                       [device, ...]
    GET  /api/devices/<id>                  device with its shadow
    GET  /api/devices/<id>/shadow           {"version", "desired", "reported", "delta"}
    POST /api/devices/<id>/shadow           {"desired": patch, "expected_version": n}
    GET  /api/devices/<id>/telemetry?after=N [record, ...]
    GET  /api/summary                       fleet health: online, versions, failing, rates
    GET  /api/jobs                          [job with counts, ...]
    GET  /api/jobs/<id>                     job with counts and executions
    POST /api/packages                      a package .tar.gz as the body -> the stored package
    POST /api/deploy                        {"package": dir | "package_ref": {name, version,
                                             sha256 (optional)},
                                             "targets": [...], job options}
    POST /api/rollback                      {"targets": [...], "version": opt, job options}
    POST /api/jobs/<id>/cancel              {"force": false}
    POST /api/policy                        {"targets": [...], "policy": {...}}

Job options: ``job_id``, ``rollout`` (max_per_minute, base_rate_per_minute, increment_factor,
on_succeeded), ``abort`` ([{failure_type, threshold_percent, min_executed}]), ``timeout_s``,
``job_timeout_s`` (seconds or a duration such as ``"90s"``), ``retry`` (``{"FAILED": 2,
"TIMED_OUT": 1}`` or ``"FAILED:2,TIMED_OUT:1"``). Everything is checked before the job exists.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edgecloud.errors import ConfigError, EdgeCloudError, FleetError, PackageError, ProtocolError
from edgecloud.fleet import console
from edgecloud.fleet.controller import FleetController, NotActive, NotFound
from edgecloud.fleet.jobs import AbortCriterion, RolloutConfig
from edgecloud.fleet.packages import StoredPackage
from edgecloud.fleet.store import ShadowConflict
from edgecloud.guarded_http import GuardedHandler, GuardedThreadingHTTPServer
from edgecloud.limits import DEFAULT_LIMITS, Limits, check_json_depth, parse_decimal
from edgecloud.package import unpack_package

__all__ = ["FleetHTTPServer", "parse_range"]

log = logging.getLogger("edgecloud.fleet.http")

_PKG = re.compile(r"^/packages/([^/]+)/([^/]+)\.tar\.gz$")
MAX_BODY = 1 << 20
MAX_UPLOAD = 4 << 30  # a package archive uploaded with POST /api/packages
_UPLOAD_BYTES_PER_S = 1 << 20  # an upload's deadline grows by a second per MiB


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range -> inclusive (start, end); None for "serve it all".

    Raises ``ValueError`` when the range cannot be satisfied (the caller answers 416).
    Multiple ranges are answered with the whole file, which RFC 9110 allows.
    """
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    a, b = m.group(1), m.group(2)
    if a == "":
        n = int(b)
        if n == 0:
            raise ValueError("empty suffix range")
        return max(0, size - n), size - 1
    start = int(a)
    end = size - 1 if b == "" else min(int(b), size - 1)
    if start >= size or (b != "" and int(b) < start):
        raise ValueError(f"range {header!r} outside 0-{size - 1}")
    return start, end


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class FleetHTTPServer:
    """Serves ``controller`` on ``host:port`` (port 0 picks a free one) in a daemon thread."""

    def __init__(
        self,
        controller: FleetController,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.controller = controller
        self.token = token
        self.limits = limits
        handler = _make_handler(self)
        server_cls = type("FleetHTTPD", (GuardedThreadingHTTPServer,), {"limits": limits})
        try:
            self.httpd = server_cls((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"fleet HTTP server cannot listen on {host}:{port}: {exc}") from exc
        addr = self.httpd.server_address
        self.host = addr[0] if isinstance(addr[0], str) else addr[0].decode()
        self.port = int(addr[1])
        if not controller.public_base_url:
            controller.public_base_url = self.url
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="fleet-http", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FleetHTTPServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FleetHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _job_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if body.get("job_id"):
        kw["job_id"] = str(body["job_id"])
    if body.get("rollout") is not None:
        if not isinstance(body["rollout"], dict):
            raise _ApiError(400, "'rollout' must be an object")
        kw["rollout"] = RolloutConfig.from_dict(body["rollout"])
    abort = body.get("abort") or []
    if not isinstance(abort, list) or not all(isinstance(a, dict) for a in abort):
        raise _ApiError(400, "'abort' must be a list of objects")
    kw["abort"] = [AbortCriterion.from_dict(a) for a in abort]
    for key in ("timeout_s", "job_timeout_s"):
        if body.get(key) is not None:
            # seconds or a duration like "90s"; the controller refuses zero, negatives, junk
            if not isinstance(body[key], int | float | str) or isinstance(body[key], bool):
                raise _ApiError(400, f"'{key}' must be a number of seconds")
            kw[key] = body[key]
    if body.get("retry") is not None:
        if not isinstance(body["retry"], dict | str):
            raise _ApiError(400, "'retry' must be an object like {\"FAILED\": 2}")
        kw["retry"] = body["retry"]
    return kw


def _targets(body: dict[str, Any]) -> list[str]:
    t = body.get("targets")
    if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
        raise _ApiError(400, "'targets' must be a non-empty list of device ids or group names")
    return t


def _make_handler(server: FleetHTTPServer) -> type[BaseHTTPRequestHandler]:
    ctl = server.controller

    class Handler(GuardedHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edgecloud-fleet"
        limits = server.limits

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.client_address[0], *args)

        # -- plumbing --------------------------------------------------------------------
        def _send_json(self, status: int, obj: Any) -> None:
            data = json.dumps(obj, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            try:
                n = parse_decimal(self.headers.get("Content-Length"), "Content-Length") or 0
            except ProtocolError as exc:
                raise _ApiError(400, str(exc)) from None
            if n > MAX_BODY:
                raise _ApiError(413, f"request body of {n} bytes exceeds {MAX_BODY}")
            raw = self.rfile.read(n) if n else b"{}"
            try:
                check_json_depth(raw, server.limits.max_json_depth)
                obj = json.loads(raw or b"{}")
            except ProtocolError as exc:
                raise _ApiError(400, f"request body: {exc}") from None
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, >4300 digits
                raise _ApiError(400, f"request body is not JSON: {str(exc)[:200]}") from None
            if not isinstance(obj, dict):
                raise _ApiError(400, "request body must be a JSON object")
            return obj

        def _upload(self) -> StoredPackage:
            """Stream a ``.tar.gz`` body to disk, unpack it and store it like a directory."""
            try:
                n = parse_decimal(self.headers.get("Content-Length"), "Content-Length") or -1
            except ProtocolError:
                n = -1
            if n <= 0:
                raise _ApiError(411, "upload a package archive with a Content-Length")
            if n > MAX_UPLOAD:
                raise _ApiError(413, f"package archive of {n} bytes exceeds {MAX_UPLOAD}")
            # A large archive on a slow link needs longer than one request's deadline.
            self.deadline = max(self.deadline, time.monotonic() + n / _UPLOAD_BYTES_PER_S)
            root = ctl.packages.root
            with tempfile.TemporaryDirectory(prefix=".upload-", dir=root) as tmp:
                archive = Path(tmp) / "upload.tar.gz"
                with open(archive, "wb") as f:
                    left = n
                    while left > 0:
                        chunk = self.rfile.read(min(left, 1 << 16))
                        if not chunk:
                            raise _ApiError(400, f"upload ended {left} bytes early")
                        f.write(chunk)
                        left -= len(chunk)
                try:
                    pkg_dir = unpack_package(archive, Path(tmp) / "pkg")
                except PackageError as exc:
                    raise _ApiError(400, f"uploaded package refused: {exc}") from exc
                return ctl.packages.add(pkg_dir)

        def _authorized(self) -> bool:
            if not server.token:
                return True
            got = self.headers.get("Authorization", "")
            return hmac.compare_digest(got.encode(), f"Bearer {server.token}".encode())

        def _api(self, method: str) -> None:
            try:
                if not self._authorized():
                    raise _ApiError(401, "missing or wrong bearer token")
                status, obj = self._route(method)
                self._send_json(status, obj)
            except _ApiError as exc:
                self._send_json(exc.status, {"error": str(exc)})
            except NotFound as exc:
                self._send_json(404, {"error": str(exc)})
            except NotActive as exc:
                self._send_json(503, {"error": str(exc)})
            except ShadowConflict as exc:
                self._send_json(409, {"error": str(exc), "current_version": exc.current})
            except EdgeCloudError as exc:
                self._send_json(400, {"error": str(exc)})
            except Exception as exc:
                log.exception("fleet API %s %s failed", method, self.path)
                self._send_json(500, {"error": f"internal error: {exc.__class__.__name__}"})

        def _route(self, method: str) -> tuple[int, Any]:
            url = urlsplit(self.path)
            parts = [p for p in url.path.split("/") if p][1:]  # drop "api"
            q = parse_qs(url.query)
            if method == "GET":
                if parts == ["health"]:
                    return 200, {
                        "ok": True,
                        "connected": ctl.connected,
                        "active": ctl.active,
                        "instance": ctl.instance_id,
                        "devices": len(ctl.devices),
                        "jobs": len(ctl.engine.jobs),
                        "stats": dict(ctl.stats),
                    }
                if parts == ["devices"]:
                    return 200, ctl.devices_view()
                if parts == ["summary"]:
                    return 200, ctl.summary_view()
                if len(parts) == 2 and parts[0] == "devices":
                    return 200, ctl.device_view(parts[1])
                if len(parts) == 3 and parts[0] == "devices" and parts[2] == "shadow":
                    ctl.device_view(parts[1])
                    return 200, ctl.shadow_view(parts[1])
                if len(parts) == 3 and parts[0] == "devices" and parts[2] == "telemetry":
                    try:
                        after = int(q.get("after", ["-1"])[0])
                    except ValueError:
                        raise _ApiError(400, "'after' must be an integer seq") from None
                    return 200, ctl.telemetry_view(parts[1], after)
                if parts == ["jobs"]:
                    return 200, ctl.jobs_view()
                if len(parts) == 2 and parts[0] == "jobs":
                    return 200, ctl.job_view(parts[1])
                if parts == ["packages"]:
                    return 200, [
                        {
                            "name": p.name,
                            "version": p.version,
                            "sha256": p.sha256,
                            "size": p.size,
                            "url": ctl.public_base_url + p.url_path(),
                        }
                        for p in ctl.packages.list()
                    ]
            elif method == "POST" and parts == ["packages"]:
                stored = self._upload()
                return 201, {
                    "name": stored.name,
                    "version": stored.version,
                    "sha256": stored.sha256,
                    "size": stored.size,
                    "url": ctl.public_base_url + stored.url_path(),
                }
            elif method == "POST":
                body = self._body()
                if parts == ["deploy"]:
                    pkg = body.get("package")
                    ref = body.get("package_ref")
                    target: Path | tuple[str, str]
                    if isinstance(ref, dict):
                        name, version = ref.get("name"), ref.get("version")
                        if not (isinstance(name, str) and isinstance(version, str)):
                            raise _ApiError(400, "'package_ref' needs string 'name' and 'version'")
                        sha = ref.get("sha256")
                        if sha is not None and not isinstance(sha, str):
                            raise _ApiError(400, "'package_ref.sha256' must be a string")
                        target = (name, version)
                        if sha:
                            body["expected_sha256"] = sha
                    elif isinstance(pkg, str) and pkg:
                        target = Path(pkg)
                    else:
                        raise _ApiError(
                            400,
                            "give 'package' (a package directory on the controller's machine) "
                            "or 'package_ref' ({name, version} of an uploaded package)",
                        )
                    job = ctl.deploy(
                        target,
                        _targets(body),
                        expected_sha256=body.get("expected_sha256"),
                        **_job_kwargs(body),
                    )
                    return 201, ctl.job_view(job.job_id)
                if parts == ["rollback"]:
                    version = body.get("version")
                    job = ctl.rollback(
                        _targets(body), str(version) if version else None, **_job_kwargs(body)
                    )
                    return 201, ctl.job_view(job.job_id)
                if len(parts) == 3 and parts[0] == "jobs" and parts[2] == "cancel":
                    ctl.cancel(parts[1], force=bool(body.get("force", False)))
                    return 200, ctl.job_view(parts[1])
                if parts == ["policy"]:
                    policy = body.get("policy")
                    if not isinstance(policy, dict) or not policy:
                        raise _ApiError(400, "'policy' must be a non-empty object")
                    return 200, ctl.set_policy(_targets(body), policy)
                if len(parts) == 3 and parts[0] == "devices" and parts[2] == "shadow":
                    patch = body.get("desired")
                    if not isinstance(patch, dict):
                        raise _ApiError(400, "'desired' must be an object (a JSON merge patch)")
                    ev = body.get("expected_version")
                    if ev is not None and (not isinstance(ev, int) or isinstance(ev, bool)):
                        raise _ApiError(400, "'expected_version' must be an integer")
                    return 200, ctl.update_shadow(parts[1], patch, ev)
            extra = console.console_api(ctl, method, parts, q)  # routing, device jobs
            if extra is not None:
                return extra
            raise _ApiError(404, f"no API route {method} {url.path}")

        # -- package downloads -----------------------------------------------------------
        def _package(self, head: bool) -> None:
            m = _PKG.match(urlsplit(self.path).path)
            path = ctl.packages.archive_path(m.group(1), m.group(2)) if m else None
            if path is None:
                self._send_json(404, {"error": f"no package at {self.path}"})
                return
            try:
                stored = ctl.packages.get(m.group(1), m.group(2))  # type: ignore[union-attr]
            except FleetError as exc:
                self._send_json(404, {"error": str(exc)})
                return
            size = stored.size
            etag = f'"{stored.sha256}"'
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            span: tuple[int, int] | None = None
            if rng and (if_range is None or if_range == etag):
                try:
                    span = parse_range(rng, size)
                except ValueError:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            start, end = span if span is not None else (0, size - 1)
            length = end - start + 1 if size else 0
            self.send_response(206 if span is not None else 200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(length))
            if span is not None:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head or length == 0:
                return
            with open(path, "rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    try:
                        self.wfile.write(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the device went away; it resumes with a Range later
                    left -= len(chunk)

        def _metrics(self) -> None:
            if not self._authorized():
                self._send_json(401, {"error": "missing or wrong bearer token"})
                return
            data = ctl.metrics_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._metrics()
            elif self.path.startswith("/packages/"):
                self._package(head=False)
            elif self.path.startswith("/api/"):
                self._api("GET")
            elif self.path in ("/", "/console") or self.path.startswith("/console/"):
                console.respond(self, self.path)  # static page; its data comes from /api/
            else:
                self._send_json(404, {"error": f"no route {self.path}"})

        def do_HEAD(self) -> None:
            if self.path.startswith("/packages/"):
                self._package(head=True)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def do_POST(self) -> None:
            if self.path.startswith("/api/"):
                self._api("POST")
            else:
                self._send_json(404, {"error": f"no route {self.path}"})

    return Handler
