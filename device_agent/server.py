"""The local KServe V2 endpoint for other processes on the device (loopback or a Unix socket).

Standard library only (``http.server``): a device should not need a web framework to serve its
own applications, and the import-boundary test keeps starlette/uvicorn out of the agent. The
server is bounded by the same ``Limits`` as the cloud region (``edgecloud.guarded_http``): a body
larger than ``max_body_bytes`` is refused with 413 before it is read, the JSON part, its depth
and the rows per request are checked as in the region, every request has a deadline (not a
timeout per read), idle connections wait without a thread, at most ``max_threads`` requests are
served at once, and every refusal is a V2 error body.

Routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}[/versions/{v}]``
(metadata), ``.../ready``, ``POST .../infer`` (JSON or the binary tensor extension) and
``/metrics`` (Prometheus text).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from http.server import HTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.serving import AgentClient
from edgecloud.errors import EdgeCloudError, InputError, ProtocolError, RuntimeBackendError
from edgecloud.guarded_http import GuardedHandler, GuardedServerMixin
from edgecloud.limits import DEFAULT_LIMITS, LimitExceeded, Limits, check_rows, parse_decimal
from edgecloud.transport.v2 import (
    DTYPE_TO_V2,
    HEADER_LENGTH,
    InferResponse,
    decode_request,
    encode_error,
    encode_response,
    wants_binary_outputs,
)

__all__ = ["LocalEndpoint"]

log = logging.getLogger("device_agent.server")
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")


class _Handler(GuardedHandler):
    server_version = "edgecloud-agent"
    protocol_version = "HTTP/1.1"
    endpoint: LocalEndpoint  # set on the subclass made per server

    def setup(self) -> None:
        if self.request.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body go out in two writes; with Nagle on, the second waits for the
            # client's delayed ACK (~40 ms per request on loopback).
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def address_string(self) -> str:  # AF_UNIX peers have no host
        ca = self.client_address
        return str(ca[0]) if isinstance(ca, tuple) and ca else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing ----------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, encode_error(message))

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    # -- routes ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        ep = self.endpoint
        path = self.path.split("?", 1)[0]
        client = ep.client
        if path == "/v2/health/live":
            self._json({"live": True})
        elif path == "/v2/health/ready":
            ready = client.manifest is not None
            self._json({"ready": ready}, 200 if ready else 503)
        elif path == "/v2":
            self._json(
                {
                    "name": "edgecloud-agent",
                    "version": ep.agent_version,
                    "extensions": ["binary_tensor_data"],
                }
            )
        elif path == "/metrics":
            self._send(200, ep.metrics_text().encode(), "text/plain; version=0.0.4")
        else:
            m = _MODEL_PATH.match(path)
            if m is None or m.group(3) == "/infer":
                self._error(404, f"no route for GET {path}")
                return
            man = self._model(m.group(1), m.group(2))
            if man is None:
                return
            if m.group(3) == "/ready":
                self._json({"name": man.name, "ready": True})
                return
            self._json(
                {
                    "name": man.name,
                    "versions": [man.version],
                    "platform": "onnxruntime",
                    "inputs": [_tensor_meta(t) for t in man.inputs],
                    "outputs": [_tensor_meta(t) for t in man.outputs],
                }
            )

    do_HEAD = do_GET

    def do_POST(self) -> None:
        ep = self.endpoint
        path = self.path.split("?", 1)[0]
        m = _MODEL_PATH.match(path)
        if m is None or m.group(3) != "/infer":
            self._error(404, f"no route for POST {path}")
            return
        try:
            length = parse_decimal(self.headers.get("Content-Length"), "Content-Length")
        except ProtocolError as exc:
            self._error(400, str(exc))
            self.close_connection = True
            return
        if length is None:
            self._error(411, "Content-Length is required")
            self.close_connection = True
            return
        if length > ep.max_body_bytes:
            self._error(
                413, f"request body of {length} bytes exceeds the limit of {ep.max_body_bytes}"
            )
            self.close_connection = True
            return
        body = self.rfile.read(length)  # bounded by the request's deadline (GuardedHandler)
        if len(body) < length:
            self._error(400, f"body ended after {len(body)} of {length} bytes")
            self.close_connection = True
            return
        man = self._model(m.group(1), m.group(2))
        if man is None:
            return
        try:
            header_length = parse_decimal(self.headers.get(HEADER_LENGTH), HEADER_LENGTH)
            req = decode_request(
                body, header_length, model=man.name, version=m.group(2), limits=ep.limits
            )
            check_rows(req.inputs, ep.limits.max_rows)
            outcome = ep.client.answer(req.inputs)
        except LimitExceeded as exc:
            self._error(exc.status or 413, str(exc))
            return
        except ValueError as exc:  # an InputError (a ValueError)
            self._error(400, str(exc))
            return
        except (InputError, ProtocolError) as exc:
            self._error(400, str(exc))
            return
        except RuntimeBackendError as exc:
            self._error(503 if ep.client.manifest is None else 500, str(exc))
            return
        except EdgeCloudError as exc:
            self._error(500, str(exc))
            return
        outputs = outcome.outputs
        if req.outputs:
            unknown = [n for n in req.outputs if n not in outputs]
            if unknown:
                self._error(400, f"unknown output(s) {unknown}; the model has {list(outputs)}")
                return
            outputs = {n: outputs[n] for n in req.outputs}
        params: dict[str, Any] = {
            "route": outcome.route,
            "source": outcome.result.source,
            "reason": str(outcome.result.reason),
        }
        if outcome.confidence is not None:
            params["confidence"] = outcome.confidence
        resp = InferResponse(
            model=outcome.model,
            version=outcome.version,
            id=req.id,
            outputs=outputs,
            parameters=params,
        )
        data, header_len = encode_response(resp, binary=wants_binary_outputs(req))
        headers = {HEADER_LENGTH: str(header_len)} if header_len is not None else {}
        ctype = "application/octet-stream" if header_len is not None else "application/json"
        self._send(200, data, ctype, headers)

    def _model(self, name: str, version: str | None) -> Any:
        man = self.endpoint.client.manifest
        if man is None:
            self._error(503, "no model is active on this device yet")
            return None
        if name != man.name:
            self._error(404, f"unknown model '{name}' (this device serves '{man.name}')")
            return None
        if version is not None and version != man.version:
            self._error(
                404, f"model '{name}' version '{version}' is not active (active: {man.version})"
            )
            return None
        return man


def _tensor_meta(t: Any) -> dict[str, Any]:
    return {
        "name": t.name,
        "datatype": DTYPE_TO_V2.get(np.dtype(t.dtype), t.dtype.upper()),
        "shape": [d if isinstance(d, int) else -1 for d in t.shape],
    }


class _TCPServer(GuardedServerMixin, HTTPServer):
    request_queue_size = 128


class _UnixServer(GuardedServerMixin, socketserver.UnixStreamServer):
    request_queue_size = 128


class LocalEndpoint:
    """Serves ``client`` over HTTP on loopback (``port=0`` picks a free one) or a Unix socket."""

    def __init__(
        self,
        client: AgentClient,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        socket_path: Path | None = None,
        max_body_bytes: int = 16 * 1024 * 1024,
        timeout_s: float = 30.0,
        metrics_text: Callable[[], str] | None = None,
        agent_version: str = "",
        limits: Limits | None = None,
    ) -> None:
        """``timeout_s`` is the whole request's deadline (``limits.request_timeout_s``)."""
        base = limits or DEFAULT_LIMITS.with_(max_threads=16)
        self.limits = base.with_(
            max_body_bytes=max_body_bytes,
            request_timeout_s=timeout_s,
            header_timeout_s=min(base.header_timeout_s, timeout_s),
        )
        self.client = client
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.agent_version = agent_version
        self.metrics_text = metrics_text or (lambda: client.metrics.prometheus())
        handler = type("Handler", (_Handler,), {"endpoint": self, "limits": self.limits})
        self.socket_path = socket_path
        self._server: socketserver.BaseServer
        if socket_path is not None:
            if socket_path.exists():
                if not stat.S_ISSOCK(socket_path.stat().st_mode):
                    raise OSError(f"{socket_path} exists and is not a socket; not removing it")
                socket_path.unlink()  # a stale socket from a previous run
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            server_cls = type("Server", (_UnixServer,), {"limits": self.limits})
            self._server = server_cls(str(socket_path), handler)
            os.chmod(socket_path, 0o660)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            cls = type("Server", (_TCPServer,), {"address_family": family, "limits": self.limits})
            self._server = cls((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        addr = self._server.server_address
        return int(addr[1]) if isinstance(addr, tuple) else 0

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalEndpoint:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="agent-endpoint",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
