"""The cloud region: a serving core with dynamic batching behind KServe V2 over HTTP (and MQTT).

``ServingCore`` holds the sessions and batchers; ``CloudServer`` puts V2 REST in front of it, and
the MQTT workers (``edgecloud.cloud.mqtt_worker``) put the same core behind MQTT topics. Importing
this package needs neither Starlette, uvicorn nor onnxruntime; they load when a server starts.
"""

from edgecloud.cloud.core import (
    BatchEvent,
    DeadlineExceeded,
    ModelEntry,
    ModelNotFoundError,
    ModelRepository,
    OverloadedError,
    ServingCore,
    status_for,
)
from edgecloud.cloud.server import DEFAULT_MAX_REQUEST_BYTES, CloudServer, create_app

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "BatchEvent",
    "CloudServer",
    "DeadlineExceeded",
    "ModelEntry",
    "ModelNotFoundError",
    "ModelRepository",
    "OverloadedError",
    "ServingCore",
    "create_app",
    "status_for",
]
