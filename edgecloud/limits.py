"""Limits: how much one request, one connection or one client may take from a server.

Every port edgecloud opens (the region's HTTP server, its MQTT workers, the device agent's local
V2 endpoint and the fleet controller's API) faces input nobody vetted. Each one reads its bounds
from one frozen ``Limits`` value, so a limit means the same thing everywhere and is documented
once (docs/protocol.md, "Limits"). What exceeding each one returns:

===========================  ===================================================================
``max_body_bytes``           413 (MQTT: a ``413`` error reply) before the body is decoded
``max_json_bytes``           413: the JSON part of a body (a whole JSON body, or the header of a
                             binary one); JSON costs 7-12x its size in memory to decode, raw
                             tensor bytes about 1x, so JSON gets the smaller bound
``max_json_depth``           400 naming the depth; checked on the raw bytes before ``json.loads``
``max_rows``                 413: dim 0 of any input (a batch of more rows than this is refused
                             instead of growing onnxruntime's memory arena for good)
``max_large_decodes``        bodies over ``large_body_bytes`` are read, decoded and run at most
                             this many at a time; others wait up to ``header_timeout_s``, then
                             503
``max_connections``          HTTP: beyond it the oldest idle connection is closed; when none is
                             idle the new one gets 503 and is closed
``max_header_bytes``         431 (request line and headers together)
``header_timeout_s``         408 when a started request's headers take longer
``request_timeout_s``        408 when a started request (headers and body) takes longer
``idle_timeout_s``           an idle connection (no request started) is closed, without a reply
``log_per_minute``           warnings about refused input are logged at most this often per
                             kind; the rest are counted and summarised
===========================  ===================================================================

Why not bigger defaults: one 60 MiB JSON body decoded as Python floats takes more than 400 MiB,
and glibc keeps much of it; a 65,536-row batch grew onnxruntime's arena by 1.6 GiB for good.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from edgecloud.errors import ConfigError, ProtocolError, RemoteError

__all__ = [
    "DEFAULT_LIMITS",
    "LimitExceeded",
    "Limits",
    "RateLimitedLog",
    "check_json_depth",
    "check_rows",
    "parse_decimal",
    "release_memory",
]

_MiB = 1024 * 1024


class LimitExceeded(RemoteError):
    """A request over one of the ``Limits``; ``status`` is the HTTP status it is answered with.

    A ``RemoteError`` so that ``status_for`` (HTTP and MQTT alike) answers with ``status``.
    """

    def __init__(self, message: str, *, status: int = 413) -> None:
        super().__init__(message, status=status)


@dataclass(frozen=True)
class Limits:
    """The bounds one server enforces; frozen, validated, shared by HTTP, MQTT and the agent."""

    max_body_bytes: int = 64 * _MiB
    max_json_bytes: int = 8 * _MiB
    max_json_depth: int = 32
    max_rows: int = 4096
    large_body_bytes: int = 256 * 1024
    max_large_decodes: int = 2
    max_connections: int = 1000
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    request_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    max_threads: int = 64
    log_per_minute: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"limit {f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"limit {f.name} must be positive, got {value!r}")
        if self.header_timeout_s > self.request_timeout_s:
            raise ConfigError(
                f"header_timeout_s ({self.header_timeout_s}) must not exceed "
                f"request_timeout_s ({self.request_timeout_s})"
            )

    def with_(self, **changes: Any) -> Limits:
        """A copy with ``changes`` (validated again); None values keep the current setting."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


DEFAULT_LIMITS = Limits()

_DIGITS = re.compile(r"[0-9]{1,19}")


def parse_decimal(text: str | None, what: str) -> int | None:
    """A header's non-negative ASCII decimal, or ProtocolError naming it.

    ``str.isdigit`` accepts ``²`` and 5,000-digit strings, which ``int`` then chokes on; this
    takes 1-19 ASCII digits only (every value that fits in int64).
    """
    if text is None:
        return None
    t = text.strip()
    if not _DIGITS.fullmatch(t):
        raise ProtocolError(f"{what} must be a non-negative decimal integer, got {text[:40]!r}")
    return int(t)


# A JSON string (escapes included) or one bracket: strings may hold brackets that do not nest.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def check_json_depth(data: bytes | memoryview, max_depth: int) -> None:
    """Raise ProtocolError when ``data`` nests arrays/objects deeper than ``max_depth``.

    Runs before ``json.loads`` (whose C scanner recurses) and costs two ``bytes.count`` calls on
    ordinary bodies: a body with fewer brackets than the limit cannot nest deeper than it.
    """
    b = bytes(data) if isinstance(data, memoryview) else data
    if b.count(b"[") + b.count(b"{") <= max_depth:
        return
    depth = 0
    for m in _JSON_TOKEN.finditer(b):
        c = m.group()[0]
        if c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise ProtocolError(f"JSON nests deeper than {max_depth} levels")
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1


def check_rows(inputs: dict[str, Any], max_rows: int) -> None:
    """LimitExceeded (413) when an input's first dimension is larger than ``max_rows``."""
    for name, arr in inputs.items():
        shape = getattr(arr, "shape", ())
        if shape and shape[0] > max_rows:
            raise LimitExceeded(
                f"input '{name}' has {shape[0]} rows; this server takes at most {max_rows} "
                "per request (split the batch)"
            )


class RateLimitedLog:
    """Log warnings about refused input at most ``per_minute`` times a minute per kind.

    A client that sends garbage must not be able to grow the log at will; what is not logged is
    counted, and the next logged line says how many were suppressed.
    """

    def __init__(
        self, logger: logging.Logger, per_minute: int, *, clock: Any = time.monotonic
    ) -> None:
        self._log = logger
        self._per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (start, logged, dropped)

    def warning(self, kind: str, msg: str, *args: Any) -> bool:
        """Log ``msg`` unless ``kind`` used its share this minute; True when it was logged."""
        now = self._clock()
        with self._lock:
            start, logged, dropped = self._windows.get(kind, (now, 0, 0))
            if now - start >= 60.0:
                start, logged = now, 0
            if logged >= self._per_minute:
                self._windows[kind] = (start, logged, dropped + 1)
                return False
            self._windows[kind] = (start, logged + 1, 0)
        if dropped:
            msg += " (%d similar messages suppressed)"
            args = (*args, dropped)
        self._log.warning(msg, *args)
        return True


_libc: Any = None
_trim_lock = threading.Lock()
_last_trim = 0.0


def release_memory(min_interval_s: float = 1.0) -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), at most once per interval.

    After a large body is decoded and freed, glibc keeps the pages in its heap, so RSS would
    ratchet up with every big request; a trim after large requests keeps it near its baseline.
    A no-op where there is no glibc.
    """
    global _libc, _last_trim
    now = time.monotonic()
    with _trim_lock:
        if now - _last_trim < min_interval_s:
            return
        _last_trim = now
        if _libc is None:
            try:
                _libc = ctypes.CDLL("libc.so.6")
                _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                _libc = False
        if _libc:
            _libc.malloc_trim(0)
