"""The one exception tree of edgecloud.

Every error that edgecloud raises on purpose is an ``EdgeCloudError``, so an application can catch
one class at the edge of its own code. Errors of the libraries underneath (onnxruntime, httpx,
paho-mqtt, onnx, cryptography) are translated where they cross into edgecloud and chained with
``raise ... from exc``: a caller never has to know which library a failure came from, and the
original traceback is still there for whoever debugs it.

    EdgeCloudError
    ├── ConfigError                  a config file, option or keyword argument is invalid
    ├── MissingDependencyError       an optional extra is not installed (names the pip command)
    ├── InputError                   a request's tensors do not fit the model (names the input)
    │   ├── ShapeError
    │   ├── DTypeError
    │   └── NonFiniteError           NaN/Inf where the policy refuses them
    ├── DataError                    calibration or validation data that does not fit the model
    ├── PackageError                 a model package is malformed or unreadable
    │   ├── IntegrityError           a file's size or sha256 differs from the manifest
    │   └── SignatureError           the manifest's signature does not verify
    ├── ConversionError              a converter could not build a variant
    │   └── ValidationError          a variant lost more than the tolerance against the original
    ├── RuntimeBackendError          local inference failed (onnxruntime, TensorRT)
    │   └── BackendUnavailableError  the backend or its hardware is missing on this device
    ├── TransportError               the cloud could not be reached or answered badly
    │   ├── TransportTimeout         the deadline passed before the answer came
    │   ├── ConnectionFailed         no connection (refused, reset, DNS, broker down)
    │   ├── AuthError                401/403, or an MQTT CONNACK/PUBACK refusal for credentials/ACL
    │   ├── RemoteError              the server answered with a V2 error body
    │   └── ProtocolError            a malformed V2 body, header or MQTT payload
    ├── RoutingError
    │   └── NoRouteError             no local answer and no cloud region answered
    ├── FleetError                   fleet controller, jobs, shadows
    └── StoreError                   the device's model store or durable queue

Errors that carry a protocol status keep it: ``RemoteError.status`` is the HTTP status or MQTT
reason code the peer sent, so callers can tell "bad request" from "server overloaded".
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BackendUnavailableError",
    "ConfigError",
    "ConnectionFailed",
    "ConversionError",
    "DTypeError",
    "DataError",
    "EdgeCloudError",
    "FleetError",
    "InputError",
    "IntegrityError",
    "MissingDependencyError",
    "NoRouteError",
    "NonFiniteError",
    "PackageError",
    "ProtocolError",
    "RemoteError",
    "RoutingError",
    "RuntimeBackendError",
    "ShapeError",
    "SignatureError",
    "StoreError",
    "TransportError",
    "TransportTimeout",
    "ValidationError",
]


class EdgeCloudError(Exception):
    """Root of every error edgecloud raises on purpose."""


class ConfigError(EdgeCloudError):
    """A configuration value is invalid; the message names the key and what was expected."""


class MissingDependencyError(EdgeCloudError, ImportError):
    """An optional dependency is missing; the message names the extra to install.

    It is also an ``ImportError`` so code written as ``try: import x except ImportError`` keeps
    working when it calls edgecloud's lazy importers.
    """

    def __init__(self, module: str, extra: str, why: str = "") -> None:
        self.module = module
        self.extra = extra
        reason = f" ({why})" if why else ""
        super().__init__(f"{module} is not installed{reason}: pip install 'edgecloud[{extra}]'")


class InputError(EdgeCloudError, ValueError):
    """A request's inputs do not fit the model; the message names the input."""

    def __init__(self, message: str, *, input_name: str | None = None) -> None:
        self.input_name = input_name
        super().__init__(message)


class ShapeError(InputError):
    """An input's rank or a fixed dimension differs from the model's."""


class DTypeError(InputError):
    """An input's dtype differs from the model's and cannot be cast losslessly."""


class NonFiniteError(InputError):
    """An input holds NaN or Inf and the policy refuses them."""


class DataError(EdgeCloudError, ValueError):
    """Calibration or validation data does not fit the model (names input, expected vs got)."""


class PackageError(EdgeCloudError):
    """A model package is malformed, incomplete or unreadable."""


class IntegrityError(PackageError):
    """A file in a package differs from what the manifest records for it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class SignatureError(PackageError):
    """The manifest's detached signature is missing or does not verify."""


class ConversionError(EdgeCloudError):
    """A converter could not produce a variant."""


class ValidationError(ConversionError):
    """A variant lost more than the tolerance against the original model."""


class RuntimeBackendError(EdgeCloudError):
    """Local inference failed."""


class BackendUnavailableError(RuntimeBackendError):
    """The backend, or the hardware it needs, is not present on this machine."""


class TransportError(EdgeCloudError):
    """The cloud could not be reached, or its answer could not be used."""

    def __init__(self, message: str, *, region: str | None = None) -> None:
        self.region = region
        super().__init__(message)


class TransportTimeout(TransportError, TimeoutError):
    """The request's deadline passed before the cloud answered."""


class ConnectionFailed(TransportError, ConnectionError):
    """No connection to the endpoint or broker could be made or kept."""


class AuthError(TransportError):
    """The peer refused the credentials or the topic (HTTP 401/403, MQTT reason code)."""

    def __init__(
        self, message: str, *, region: str | None = None, status: int | None = None
    ) -> None:
        self.status = status
        super().__init__(message, region=region)


class RemoteError(TransportError):
    """The server answered with an error body; ``status`` is its HTTP status or reason code."""

    def __init__(
        self, message: str, *, region: str | None = None, status: int | None = None
    ) -> None:
        self.status = status
        super().__init__(message, region=region)


class ProtocolError(TransportError):
    """A message did not follow the V2 or MQTT contract."""


class RoutingError(EdgeCloudError):
    """The router could not produce an answer."""


class NoRouteError(RoutingError):
    """Neither a local answer nor any cloud region was available."""


class FleetError(EdgeCloudError):
    """A fleet operation (shadow, job, rollout, registry) failed."""


class StoreError(EdgeCloudError):
    """The device's model store or durable queue failed."""
