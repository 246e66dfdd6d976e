"""What an MQTT worker hands requests to, and the echo handlers for tests and benchmarks."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

from edgecloud.errors import InputError, ProtocolError
from edgecloud.transport.v2 import InferRequest, InferResponse

__all__ = ["Handler", "Submit", "default_status", "delayed_echo_handler", "echo_handler"]


#: ``handler(request)`` returns a response or a future of one; it may raise EdgeCloudError.
Handler = Callable[[InferRequest], "concurrent.futures.Future[InferResponse] | InferResponse"]
Submit = Callable[
    [InferRequest, "float | None"], "concurrent.futures.Future[InferResponse] | InferResponse"
]


def echo_handler(request: InferRequest) -> InferResponse:
    """Answers with the request's own tensors: for protocol tests and transport benchmarks."""
    return InferResponse(model=request.model, version=request.version, outputs=dict(request.inputs))


def delayed_echo_handler(delay_s: float) -> Handler:
    """An echo that holds each request ``delay_s``, like a backend waiting on an accelerator
    (the benchmark of share-group scaling)."""
    if delay_s <= 0:
        return echo_handler

    def handler(request: InferRequest) -> InferResponse:
        time.sleep(delay_s)
        return echo_handler(request)

    return handler


def default_status(exc: BaseException) -> int:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 100 <= status < 600:
        return status
    if isinstance(exc, InputError | ProtocolError):
        return 400
    return 500
