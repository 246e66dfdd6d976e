"""What both V2 HTTP transports share: the httpx error map, paths, binary negotiation, decoding.

``HttpTransport`` (edgecloud.transport.http) and ``AsyncHttpTransport``
(edgecloud.transport.http_async) differ only in how they wait; everything they decide
(feature negotiation, readiness fallback, error translation, deadlines) is here, once. The
rules are in edgecloud.transport.http's docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import quote

import httpx

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    ProtocolError,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from edgecloud.transport.compact import UpstreamCounter
from edgecloud.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    decode_error,
    decode_response,
    encode_request,
)

__all__ = ["BINARY_EXTENSION", "BinaryMode", "HttpTransportBase", "translate_httpx_error"]

log = logging.getLogger(__name__)

#: The V2 extension name a server lists in ``GET /v2`` when it reads and writes binary tensors.
BINARY_EXTENSION = "binary_tensor_data"

BinaryMode = Literal["auto", "always", "never"]

#: Statuses with which servers that lack the binary extension answer a binary body.
_BINARY_REFUSED_STATUS = frozenset({415, 422, 500, 501})
#: A 400 that talks about the body's encoding, not about a tensor's shape or datatype.
_BINARY_REFUSED_400 = re.compile(
    r"pars|decod|json|binary|utf-?8|header|content.length|expecting value|octet", re.IGNORECASE
)

#: What a GET on a pooled keep-alive connection that the server closed meanwhile fails with
#: (a reset, or a close before any response). A GET is idempotent, so it is sent once more on a
#: new connection (RFC 9110 9.2.2, as urllib3 does); a connect error is not retried here.
STALE_CONNECTION = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def stale_connection(exc: BaseException) -> bool:
    """Whether ``exc`` (a translated ``ConnectionFailed``) came from a connection gone stale."""
    return isinstance(exc.__cause__, STALE_CONNECTION)


#: httpx error class -> edgecloud error class, most specific first.
_HTTPX_MAP: tuple[tuple[type[Exception], type[TransportError]], ...] = (
    (httpx.TimeoutException, TransportTimeout),
    (httpx.ConnectError, ConnectionFailed),
    (httpx.RemoteProtocolError, ConnectionFailed),
    (httpx.LocalProtocolError, ProtocolError),
    (httpx.ProxyError, ConnectionFailed),
    (httpx.UnsupportedProtocol, ConnectionFailed),
    (httpx.NetworkError, ConnectionFailed),
    (httpx.DecodingError, ProtocolError),
    (httpx.TooManyRedirects, ProtocolError),
    (httpx.StreamError, ProtocolError),
    (httpx.InvalidURL, ProtocolError),
    (httpx.CookieConflict, ProtocolError),
    (httpx.HTTPError, TransportError),
)
_CAUGHT = tuple(foreign for foreign, _ in _HTTPX_MAP)


def translate_httpx_error(exc: Exception, region: str) -> TransportError:
    """The edgecloud error for an httpx error (``TransportError`` for one not listed)."""
    for foreign, ours in _HTTPX_MAP:
        if isinstance(exc, foreign):
            detail = str(exc) or exc.__class__.__name__
            return ours(f"region '{region}': {exc.__class__.__name__}: {detail}", region=region)
    return TransportError(f"region '{region}': {exc.__class__.__name__}: {exc}", region=region)


@contextlib.contextmanager
def _translate(region: str) -> Iterator[None]:
    """Translate httpx's errors at the edge, as httpx does with httpcore's."""
    try:
        yield
    except _CAUGHT as exc:
        raise translate_httpx_error(exc, region) from exc


def _infer_path(model: str, version: str | None) -> str:
    m = quote(model, safe="")
    if version:
        return f"/v2/models/{m}/versions/{quote(version, safe='')}/infer"
    return f"/v2/models/{m}/infer"


def _ready_path(model: str, version: str | None) -> str:
    m = quote(model, safe="")
    if version:
        return f"/v2/models/{m}/versions/{quote(version, safe='')}/ready"
    return f"/v2/models/{m}/ready"


def _is_v2_error(resp: httpx.Response) -> bool:
    """Whether a non-200 body is a V2 error object (the server routed the path and refused)."""
    try:
        data = resp.json()
    except ValueError:
        return False
    return isinstance(data, dict) and "error" in data


def _timeout(total: float, connect: float, region: str) -> httpx.Timeout:
    if total <= 0:
        raise TransportTimeout(
            f"region '{region}': the request's deadline has already passed", region=region
        )
    return httpx.Timeout(total, connect=min(connect, total))


class HttpTransportBase:
    """Request building and response checking shared by the sync and async transports."""

    region: str
    propagate_deadline: bool = True

    def _setup(
        self,
        endpoint: str,
        region: str,
        token: str | None,
        model_version: str | None,
        binary_threshold: int,
        connect_timeout: float,
        binary: BinaryMode = "auto",
    ) -> dict[str, str]:
        if binary not in ("auto", "always", "never"):
            raise ConfigError(f"binary must be 'auto', 'always' or 'never', got {binary!r}")
        self.binary = binary
        #: Extensions from ``GET /v2``; None until read (and again after a reconnect).
        self._extensions: frozenset[str] | None = None
        #: Set once the region failed to parse a binary request that it then answered in JSON.
        self._binary_refused = False
        #: Set once the model readiness path turned out not to be routed on this server.
        self._model_ready_unsupported = False
        #: Why the last readiness probe said not ready (for health summaries and logs).
        self.ready_detail: str | None = None
        self._state_lock = threading.Lock()
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"HTTP endpoint must start with http:// or https://, got {endpoint!r}"
            )
        if binary_threshold < 0:
            raise ConfigError(f"binary_threshold must be >= 0 bytes, got {binary_threshold}")
        if connect_timeout <= 0:
            raise ConfigError(f"connect_timeout must be > 0 s, got {connect_timeout}")
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self.model_version = model_version
        self.binary_threshold = binary_threshold
        self.upstream = UpstreamCounter()  # encoded request bodies (edgecloud/transport/compact.py)
        self.connect_timeout = connect_timeout
        headers = {"User-Agent": "edgecloud-http"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _client_options(
        self,
        endpoint: str,
        region: str,
        token: str | None,
        model_version: str | None,
        binary_threshold: int,
        connect_timeout: float,
        max_connections: int,
        verify: bool | str,
        binary: BinaryMode = "auto",
    ) -> dict[str, Any]:
        """One httpx configuration for the sync and async clients, so the two cannot drift."""
        headers = self._setup(
            endpoint, region, token, model_version, binary_threshold, connect_timeout, binary
        )
        return {
            "base_url": self.endpoint,
            "headers": headers,
            "limits": httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            "timeout": httpx.Timeout(30.0, connect=connect_timeout),
            "verify": verify,
            "trust_env": False,
        }

    # -- feature negotiation
    @property
    def features(self) -> dict[str, Any]:
        """What this transport knows of the region's protocol features (for health summaries)."""
        ext = self._extensions
        return {
            "extensions": None if ext is None else sorted(ext),
            "binary": self._binary_allowed(),
            "binary_refused": self._binary_refused,
            "model_ready_path": not self._model_ready_unsupported,
        }

    def _binary_allowed(self) -> bool | None:
        """Whether binary may be used; None while the server metadata has not been read."""
        if self.binary == "never" or self._binary_refused:
            return False
        if self.binary == "always":
            return True
        ext = self._extensions
        return None if ext is None else BINARY_EXTENSION in ext

    def _wants_binary(self, request: InferRequest) -> bool:
        return any(a.nbytes >= self.binary_threshold for a in request.inputs.values())

    def _set_extensions(self, resp: httpx.Response) -> frozenset[str]:
        """Remember the extensions of a ``GET /v2`` answer; none when it has no usable list.

        A server without the metadata route gets plain JSON, which every V2 server reads. An
        answer that says nothing about the server (401/403, 429, 5xx) means JSON for this request
        and is not remembered: the metadata is asked again next time.
        """
        ext: frozenset[str] = frozenset()
        if resp.status_code in (401, 403, 429) or resp.status_code >= 500:
            return ext
        if resp.status_code == 200:
            try:
                data = resp.json()
            except ValueError:
                data = None
            raw = data.get("extensions") if isinstance(data, dict) else None
            if isinstance(raw, list):
                ext = frozenset(str(e) for e in raw)
        with self._state_lock:
            first = self._extensions is None
            self._extensions = ext
        if first:
            log.info(
                "region '%s': server extensions %s; binary tensors %s",
                self.region,
                sorted(ext),
                "on" if self._binary_allowed() else "off",
            )
        return ext

    def _forget_server(self) -> None:
        """After a connection failure: the region may come back as another server."""
        with self._state_lock:
            self._extensions = None
            self._model_ready_unsupported = False

    def _refused_binary(self, resp: httpx.Response) -> bool:
        """Whether this answer to a binary request says the server could not parse binary."""
        if resp.status_code in _BINARY_REFUSED_STATUS:
            return True
        if resp.status_code == 400:
            return bool(_BINARY_REFUSED_400.search(decode_error(resp.content)))
        return False

    def _remember_binary_refused(self, first: httpx.Response) -> None:
        with self._state_lock:
            already = self._binary_refused
            self._binary_refused = True
        if not already:
            log.warning(
                "region '%s' could not parse a binary tensor request (HTTP %d: %s) and answered "
                "it in JSON: sending JSON only to this region from now on",
                self.region,
                first.status_code,
                decode_error(first.content)[:200],
            )

    def _ready_answer(self, resp: httpx.Response, what: str) -> bool:
        if resp.status_code == 200:
            self.ready_detail = None
            return True
        message = decode_error(resp.content)
        self.ready_detail = f"{what} not ready (HTTP {resp.status_code}: {message})"
        return False

    def _model_path_unrouted(self, resp: httpx.Response) -> bool:
        if resp.status_code in (404, 405, 501) and not _is_v2_error(resp):
            if not self._model_ready_unsupported:
                log.info(
                    "region '%s' does not route the V2 model readiness path (HTTP %d): "
                    "probing server readiness instead",
                    self.region,
                    resp.status_code,
                )
            self._model_ready_unsupported = True
            return True
        return False

    def _build(
        self, request: InferRequest, timeout: float, *, allow_binary: bool = True
    ) -> tuple[str, bytes, dict[str, str], bool]:
        version = request.version or self.model_version
        if self.propagate_deadline and "timeout" not in request.parameters and timeout > 0:
            # V2 schedule-policy parameter (microseconds, as Triton reads it): the server may drop
            # the request once the caller has given up on it instead of computing it anyway.
            params = {**request.parameters, "timeout": max(1, int(timeout * 1e6))}
            request = dataclasses.replace(request, parameters=params)
        binary = allow_binary and self._wants_binary(request)
        with _codec(self.region):
            body, hl = encode_request(
                request, binary=self.binary_threshold if binary else False, binary_outputs=binary
            )
        self.upstream.add(len(body))
        headers = {"Content-Type": "application/json"}
        if hl is not None:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(hl)}
        return _infer_path(request.model, version), body, headers, binary

    def _check(self, resp: httpx.Response) -> InferResponse:
        if resp.status_code != 200:
            message = decode_error(resp.content)
            text = f"region '{self.region}': HTTP {resp.status_code}: {message}"
            if resp.status_code in (401, 403):
                raise AuthError(text, region=self.region, status=resp.status_code)
            raise RemoteError(text, region=self.region, status=resp.status_code)
        hl_text = resp.headers.get(HEADER_LENGTH)
        header_length: int | None = None
        if hl_text is not None:
            try:
                header_length = int(hl_text)
            except ValueError as exc:
                raise ProtocolError(
                    f"region '{self.region}': bad {HEADER_LENGTH} header {hl_text!r}",
                    region=self.region,
                ) from exc
        with _codec(self.region):
            return decode_response(resp.content, header_length)


@contextlib.contextmanager
def _codec(region: str) -> Iterator[None]:
    """Stamp the region on codec errors (the codec does not know it)."""
    try:
        yield
    except ProtocolError as exc:
        if exc.region is None:
            raise ProtocolError(f"region '{region}': {exc}", region=region) from exc
        raise
