"""The HTTP transport: KServe V2 REST over pooled keep-alive httpx connections.

It speaks the Open Inference Protocol as written, nothing edgecloud-specific, so the same transport
reaches edgecloud's own region server, NVIDIA Triton, KServe or Seldon MLServer unchanged.

Feature negotiation: the binary tensor data extension is an *extension*, and not every V2 server
has it (MLServer lists ``"extensions": []`` and answers a binary body with HTTP 500). So the
transport reads the server metadata (``GET /v2``) once, the first time a request would use binary,
and again after the connection to the region failed (it may be another server now). Tensors of at
least ``binary_threshold`` bytes travel in binary (and the outputs are asked for in binary too)
only where the region declares ``binary_tensor_data``; elsewhere, and for small requests, plain
JSON, which every V2 server accepts. A region that still answers a binary request with an error
that says it could not parse it (HTTP 415/422/500/501, or a 400 about the body) gets the same
request once more in JSON; when that succeeds the region is remembered as JSON-only (logged once).
``binary="always"`` or ``"never"`` overrides the negotiation.

Readiness is asked of the model, not of the server: ``model_ready`` probes
``GET /v2/models/{model}[/versions/{v}]/ready`` and falls back to ``GET /v2/health/ready`` only
where that path is not routed at all (a 404/405/501 that is not a V2 error body), which is
remembered.
A server can be up while the model is unknown or still loading (Triton answers
``/v2/health/ready`` 200 then).

Each call's timeout is the request's remaining deadline: connect, write, read and pool waits are
all capped by it, so a slow region costs at most the caller's budget. httpx errors are translated
in one place, ``_translate`` (in edgecloud.transport.http_common), into the edgecloud tree,
each error carrying the region:

    httpx.TimeoutException (connect/read/write/pool)  -> TransportTimeout
    httpx.ConnectError, NetworkError, RemoteProtocolError,
      ProxyError, UnsupportedProtocol                  -> ConnectionFailed
    httpx.LocalProtocolError, DecodingError,
      TooManyRedirects, StreamError, InvalidURL,
      CookieConflict                                   -> ProtocolError
    any other httpx.HTTPError                          -> TransportError
    HTTP 401/403                                       -> AuthError(status)
    other HTTP 4xx/5xx                                 -> RemoteError(status, V2 error message)
    a 200 body that is not a V2 response               -> ProtocolError
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

import httpx

from edgecloud.errors import ConnectionFailed, ProtocolError, TransportError
from edgecloud.transport.base import Transport
from edgecloud.transport.http_async import AsyncHttpTransport
from edgecloud.transport.http_common import (
    BINARY_EXTENSION,
    BinaryMode,
    HttpTransportBase,
    _ready_path,
    _timeout,
    _translate,
    stale_connection,
    translate_httpx_error,
)
from edgecloud.transport.v2 import InferRequest, InferResponse

__all__ = ["BINARY_EXTENSION", "AsyncHttpTransport", "HttpTransport", "translate_httpx_error"]

log = logging.getLogger(__name__)


class HttpTransport(HttpTransportBase, Transport):
    """A V2 HTTP client for one region, with a pool of keep-alive connections.

    ``model_version`` pins a version for requests that name none (otherwise the server's latest).
    ``propagate_deadline`` sends the remaining deadline as the V2 ``timeout`` request parameter
    (microseconds; Triton's schedule-policy extension, honoured by edgecloud's server, ignored by
    servers that do not know it) unless the request sets one itself.
    Thread-safe: httpx.Client may be shared by the router's threads.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        region: str,
        token: str | None = None,
        model_version: str | None = None,
        binary_threshold: int = 16384,
        max_connections: int = 16,
        connect_timeout: float = 2.0,
        verify: bool | str = True,
        propagate_deadline: bool = True,
        binary: BinaryMode = "auto",
    ) -> None:
        self.propagate_deadline = propagate_deadline
        self._client = httpx.Client(
            **self._client_options(
                endpoint,
                region,
                token,
                model_version,
                binary_threshold,
                connect_timeout,
                max_connections,
                verify,
                binary,
            )
        )

    def _get(self, path: str, timeout: float) -> httpx.Response:
        end = time.monotonic() + timeout
        for attempt in (1, 2):
            try:
                with _translate(self.region):
                    return self._client.get(
                        path,
                        timeout=_timeout(end - time.monotonic(), self.connect_timeout, self.region),
                    )
            except ConnectionFailed as exc:
                if attempt == 1 and stale_connection(exc) and end - time.monotonic() > 0:
                    continue  # a keep-alive connection closed by the server: once more, anew
                self._forget_server()
                raise
        raise AssertionError("unreachable")

    def _post(self, path: str, body: bytes, headers: dict[str, str], end: float) -> httpx.Response:
        for attempt in (1, 2):
            try:
                with _translate(self.region):
                    return self._client.post(
                        path,
                        content=body,
                        headers=headers,
                        timeout=_timeout(end - time.monotonic(), self.connect_timeout, self.region),
                    )
            except ConnectionFailed as exc:
                # a pooled keep-alive connection the server closed (MLServer does after a 500):
                # sent once more on a new one. Inference has no side effect to repeat, and the
                # deadline still bounds both attempts.
                if attempt == 1 and stale_connection(exc) and end - time.monotonic() > 0:
                    continue
                self._forget_server()
                raise
        raise AssertionError("unreachable")

    def server_metadata(self, *, timeout: float = 5.0) -> frozenset[str]:
        """Read ``GET /v2`` and remember its ``extensions`` (what ``infer`` negotiates with)."""
        return self._set_extensions(self._get("/v2", timeout))

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        end = time.monotonic() + timeout
        allow = self._binary_allowed()
        if allow is None and self._wants_binary(request):
            self.server_metadata(timeout=timeout)
            allow = self._binary_allowed()
        path, body, headers, binary = self._build(request, timeout, allow_binary=bool(allow))
        resp = self._post(path, body, headers, end)
        if binary and self._refused_binary(resp):
            path, body, headers, _ = self._build(
                request, end - time.monotonic(), allow_binary=False
            )
            retry = self._post(path, body, headers, end)
            if retry.status_code == 200:
                self._remember_binary_refused(resp)
            resp = retry
        return self._check(resp)

    def ready(self, *, timeout: float) -> bool | None:
        """GET /v2/health/ready: True on 200, False on any other answer or no answer."""
        try:
            resp = self._get("/v2/health/ready", timeout)
        except TransportError as exc:
            self.ready_detail = str(exc)
            return False
        return self._ready_answer(resp, "server")

    def model_ready(
        self, model: str | None, version: str | None = None, *, timeout: float
    ) -> bool | None:
        """GET /v2/models/{model}[/versions/{v}]/ready; server readiness where it is not routed."""
        version = version or self.model_version
        if model is None or self._model_ready_unsupported:
            return self.ready(timeout=timeout)
        end = time.monotonic() + timeout
        try:
            resp = self._get(_ready_path(model, version), timeout)
        except TransportError as exc:
            self.ready_detail = str(exc)
            return False
        if self._model_path_unrouted(resp):
            return self.ready(timeout=end - time.monotonic())
        what = f"model '{model}'" + (f" version {version}" if version else "")
        return self._ready_answer(resp, what)

    def metadata(self, model: str, *, timeout: float = 5.0) -> dict[str, Any]:
        """V2 model metadata (names, datatypes, shapes) of ``model`` in this region."""
        resp = self._get(f"/v2/models/{quote(model, safe='')}", timeout)
        if resp.status_code != 200:
            self._check(resp)
        try:
            data = resp.json()
        except ValueError as exc:
            raise ProtocolError(
                f"region '{self.region}': model metadata is not JSON", region=self.region
            ) from exc
        if not isinstance(data, dict):
            raise ProtocolError(
                f"region '{self.region}': model metadata is not an object", region=self.region
            )
        return data

    def close(self) -> None:
        self._client.close()
