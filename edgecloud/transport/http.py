"""The HTTP transport: KServe V2 REST over pooled keep-alive httpx connections.

It speaks the Open Inference Protocol as written, nothing edgecloud-specific, so the same transport
reaches edgecloud's own region server, NVIDIA Triton, KServe or Seldon MLServer unchanged. Tensors
of at least ``binary_threshold`` bytes travel with the binary tensor data extension (and the
outputs are then asked for in binary too); small requests stay plain JSON, which every V2 server
accepts.

Each call's timeout is the request's remaining deadline: connect, write, read and pool waits are
all capped by it, so a slow region costs at most the caller's budget. httpx errors are translated
in one place, ``_translate``, into the edgecloud tree, each error carrying the region:

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

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any
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
from edgecloud.transport.base import Transport
from edgecloud.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    decode_error,
    decode_response,
    encode_request,
)

__all__ = ["AsyncHttpTransport", "HttpTransport", "translate_httpx_error"]

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


def _timeout(total: float, connect: float, region: str) -> httpx.Timeout:
    if total <= 0:
        raise TransportTimeout(
            f"region '{region}': the request's deadline has already passed", region=region
        )
    return httpx.Timeout(total, connect=min(connect, total))


class _Common:
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
    ) -> dict[str, str]:
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
    ) -> dict[str, Any]:
        """One httpx configuration for the sync and async clients, so the two cannot drift."""
        headers = self._setup(
            endpoint, region, token, model_version, binary_threshold, connect_timeout
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

    def _build(self, request: InferRequest, timeout: float) -> tuple[str, bytes, dict[str, str]]:
        version = request.version or self.model_version
        if self.propagate_deadline and "timeout" not in request.parameters and timeout > 0:
            # V2 schedule-policy parameter (microseconds, as Triton reads it): the server may drop
            # the request once the caller has given up on it instead of computing it anyway.
            params = {**request.parameters, "timeout": max(1, int(timeout * 1e6))}
            request = dataclasses.replace(request, parameters=params)
        binary = any(a.nbytes >= self.binary_threshold for a in request.inputs.values())
        with _codec(self.region):
            body, hl = encode_request(
                request, binary=self.binary_threshold if binary else False, binary_outputs=binary
            )
        headers = {"Content-Type": "application/json"}
        if hl is not None:
            headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(hl)}
        return _infer_path(request.model, version), body, headers

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


class HttpTransport(_Common, Transport):
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
            )
        )

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        path, body, headers = self._build(request, timeout)
        with _translate(self.region):
            resp = self._client.post(
                path,
                content=body,
                headers=headers,
                timeout=_timeout(timeout, self.connect_timeout, self.region),
            )
        return self._check(resp)

    def ready(self, *, timeout: float) -> bool | None:
        """GET /v2/health/ready: True on 200, False on any other answer or no answer."""
        try:
            with _translate(self.region):
                resp = self._client.get(
                    "/v2/health/ready", timeout=_timeout(timeout, self.connect_timeout, self.region)
                )
        except TransportError:
            return False
        return resp.status_code == 200

    def metadata(self, model: str, *, timeout: float = 5.0) -> dict[str, Any]:
        """V2 model metadata (names, datatypes, shapes) of ``model`` in this region."""
        with _translate(self.region):
            resp = self._client.get(
                f"/v2/models/{quote(model, safe='')}",
                timeout=_timeout(timeout, self.connect_timeout, self.region),
            )
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


class AsyncHttpTransport(_Common):
    """The asyncio twin of ``HttpTransport`` (httpx.AsyncClient), for asyncio applications."""

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
    ) -> None:
        self.propagate_deadline = propagate_deadline
        self._client = httpx.AsyncClient(
            **self._client_options(
                endpoint,
                region,
                token,
                model_version,
                binary_threshold,
                connect_timeout,
                max_connections,
                verify,
            )
        )

    async def ainfer(self, request: InferRequest, *, timeout: float) -> InferResponse:  # noqa: ASYNC109 (mirrors Transport)
        path, body, headers = self._build(request, timeout)
        with _translate(self.region):
            resp = await self._client.post(
                path,
                content=body,
                headers=headers,
                timeout=_timeout(timeout, self.connect_timeout, self.region),
            )
        return self._check(resp)

    async def aready(self, *, timeout: float) -> bool:  # noqa: ASYNC109 - same
        try:
            with _translate(self.region):
                resp = await self._client.get(
                    "/v2/health/ready", timeout=_timeout(timeout, self.connect_timeout, self.region)
                )
        except TransportError:
            return False
        return resp.status_code == 200

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncHttpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
