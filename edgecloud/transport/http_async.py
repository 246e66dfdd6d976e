"""The asyncio V2 HTTP transport (httpx.AsyncClient); its behaviour is ``HttpTransport``'s.

See edgecloud.transport.http for the negotiation, readiness and error rules both follow.
"""

from __future__ import annotations

import time

import httpx

from edgecloud.errors import (
    ConnectionFailed,
    TransportError,
)
from edgecloud.transport.http_common import (
    BinaryMode,
    HttpTransportBase,
    _ready_path,
    _timeout,
    _translate,
    stale_connection,
)
from edgecloud.transport.v2 import (
    InferRequest,
    InferResponse,
)

__all__ = ["AsyncHttpTransport"]


class AsyncHttpTransport(HttpTransportBase):
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
        binary: BinaryMode = "auto",
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
                binary,
            )
        )

    async def _get(self, path: str, timeout: float) -> httpx.Response:  # noqa: ASYNC109
        end = time.monotonic() + timeout
        for attempt in (1, 2):
            try:
                with _translate(self.region):
                    return await self._client.get(
                        path,
                        timeout=_timeout(end - time.monotonic(), self.connect_timeout, self.region),
                    )
            except ConnectionFailed as exc:
                if attempt == 1 and stale_connection(exc) and end - time.monotonic() > 0:
                    continue  # a keep-alive connection closed by the server: once more, anew
                self._forget_server()
                raise
        raise AssertionError("unreachable")

    async def _post(
        self, path: str, body: bytes, headers: dict[str, str], end: float
    ) -> httpx.Response:
        for attempt in (1, 2):
            try:
                with _translate(self.region):
                    return await self._client.post(
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

    async def aserver_metadata(self, *, timeout: float = 5.0) -> frozenset[str]:  # noqa: ASYNC109
        """The asyncio ``HttpTransport.server_metadata``."""
        return self._set_extensions(await self._get("/v2", timeout))

    async def ainfer(self, request: InferRequest, *, timeout: float) -> InferResponse:  # noqa: ASYNC109 (mirrors Transport)
        end = time.monotonic() + timeout
        allow = self._binary_allowed()
        if allow is None and self._wants_binary(request):
            await self.aserver_metadata(timeout=timeout)
            allow = self._binary_allowed()
        path, body, headers, binary = self._build(request, timeout, allow_binary=bool(allow))
        resp = await self._post(path, body, headers, end)
        if binary and self._refused_binary(resp):
            path, body, headers, _ = self._build(
                request, end - time.monotonic(), allow_binary=False
            )
            retry = await self._post(path, body, headers, end)
            if retry.status_code == 200:
                self._remember_binary_refused(resp)
            resp = retry
        return self._check(resp)

    async def aready(self, *, timeout: float) -> bool:  # noqa: ASYNC109 - same
        try:
            resp = await self._get("/v2/health/ready", timeout)
        except TransportError as exc:
            self.ready_detail = str(exc)
            return False
        return self._ready_answer(resp, "server")

    async def amodel_ready(
        self,
        model: str | None,
        version: str | None = None,
        *,
        timeout: float,  # noqa: ASYNC109 - same
    ) -> bool:
        """The asyncio ``HttpTransport.model_ready``."""
        version = version or self.model_version
        if model is None or self._model_ready_unsupported:
            return await self.aready(timeout=timeout)
        end = time.monotonic() + timeout
        try:
            resp = await self._get(_ready_path(model, version), timeout)
        except TransportError as exc:
            self.ready_detail = str(exc)
            return False
        if self._model_path_unrouted(resp):
            return await self.aready(timeout=end - time.monotonic())
        what = f"model '{model}'" + (f" version {version}" if version else "")
        return self._ready_answer(resp, what)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncHttpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
