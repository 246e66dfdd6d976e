"""The transport seam: one required method, ``infer``.

The router only ever sees this interface, so HTTP, MQTT, a user's own transport, or a
``MockTransport`` for tests of application code all fit the same region slot. A transport raises
only ``TransportError`` subclasses: it translates its library's errors at its edge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType

from edgecloud.transport.v2 import InferRequest, InferResponse

__all__ = ["MockTransport", "Transport"]


class Transport(ABC):
    """Carries a V2 request to one cloud region and brings back its answer."""

    #: Region name used in results, logs and errors.
    region: str = ""

    @abstractmethod
    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        """Send ``request`` and wait at most ``timeout`` seconds for the answer."""

    def ready(self, *, timeout: float) -> bool | None:
        """Probe the region's readiness; ``None`` when this transport has no cheap probe.

        The router then judges the region by real requests alone.
        """
        return None

    def model_ready(
        self, model: str | None, version: str | None = None, *, timeout: float
    ) -> bool | None:
        """Probe whether ``model`` (``version``) can answer here; ``None`` without a cheap probe.

        A server can be ready while the model it should serve is unknown or still loading, so
        the router asks this rather than ``ready``. The default asks ``ready``: a transport that
        cannot ask about a model reports the server.
        """
        return self.ready(timeout=timeout)

    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class MockTransport(Transport):
    """A transport that calls ``handler(request)``: lets applications test without a network.

    edgecloud's own tests use the real transports; this is for users' tests of their code.
    """

    def __init__(
        self, handler: Callable[[InferRequest], InferResponse], *, region: str = "mock"
    ) -> None:
        self._handler = handler
        self.region = region

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        return self._handler(request)
