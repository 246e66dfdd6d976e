"""``edgecloud cloud serve``: run one cloud region (KServe V2 over HTTP, optionally MQTT workers);
``edgecloud cloud mqtt-workers``: the same region over MQTT only (or an echo for benchmarks).

The server prints one line ``edgecloud cloud: region NAME serving MODELS on URL`` to stdout once it
accepts connections, so scripts (and the test fixtures) can start it with ``--port 0`` and read the
port back instead of racing for a free one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import Any

from edgecloud import environment
from edgecloud.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("cloud", help="run a cloud region server (KServe V2 over HTTP/MQTT)")
    csub = p.add_subparsers(dest="cloud_command", metavar="ACTION", required=True)
    s = csub.add_parser(
        "serve",
        help="serve a model repository over KServe V2 HTTP (and MQTT with --mqtt)",
        description="Serve <repository>/<model>/<version>/{model.onnx | package} over KServe V2.",
    )
    s.add_argument("--repository", type=Path, required=True, help="model repository directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    s.add_argument("--region", default="local", help="region name reported in headers and metrics")
    s.add_argument(
        "--max-batch-size", type=int, default=32, help="rows per batch (1 = no batching)"
    )
    s.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=2.0,
        help="how long the first request of a batch waits for others (default 2 ms)",
    )
    s.add_argument(
        "--batch-wait",
        choices=["arrivals", "always"],
        default="arrivals",
        help="when a batch waits up to --max-queue-delay-ms for more requests: only while "
        "requests arrive together (default; a lone request runs at once), or always",
    )
    s.add_argument("--max-queue", type=int, default=1024, help="queued requests per model (503)")
    s.add_argument(
        "--token",
        default=environment.region_token(),
        help="bearer token required on every route but health (default: $EDGECLOUD_TOKEN)",
    )
    s.add_argument(
        "--max-request-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request body accepted (413 above; default 64 MiB)",
    )
    _limit_options(s)
    s.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="SIMULATION: add this delay to every response, to play a farther region in demos",
    )
    s.add_argument("--public-key", type=Path, help="verify package signatures with this key")
    s.add_argument("--threads", type=int, help="onnxruntime intra-op threads per model")
    s.add_argument(
        "--grpc-port",
        type=int,
        help="also serve KServe V2 over gRPC on this port (0 picks a free one; needs [grpc])",
    )
    s.add_argument("--mqtt", metavar="URL", help="also serve over MQTT (mqtt://host:port)")
    _mqtt_flags(s)
    s.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    s.set_defaults(func=_serve)
    w = csub.add_parser(
        "mqtt-workers",
        help="serve a region over MQTT only (workers in a shared subscription, no HTTP)",
        description="Run MQTT workers in front of a model repository (or an echo, for protocol "
        "tests and benchmarks). Prints 'ready' once every worker is subscribed.",
    )
    w.add_argument("--mqtt", metavar="URL", required=True, help="broker (mqtt://host:port)")
    w.add_argument("--region", required=True, help="region name (the request topic's segment)")
    src = w.add_mutually_exclusive_group(required=True)
    src.add_argument("--repository", type=Path, help="model repository directory")
    src.add_argument("--echo", action="store_true", help="answer with the request's tensors")
    w.add_argument(
        "--echo-delay-ms",
        type=float,
        default=0.0,
        help="with --echo: hold each request this long, like a backend that waits on an "
        "accelerator (benchmarks of share-group scaling)",
    )
    w.add_argument(
        "--max-batch-size", type=int, default=32, help="rows per batch (1 = no batching)"
    )
    w.add_argument(
        "--max-request-bytes",
        type=int,
        default=64 * 1024 * 1024,
        help="largest request payload accepted (413 above; default 64 MiB)",
    )
    _limit_options(w)
    _mqtt_flags(w)
    w.add_argument("--qos", type=int, default=1, choices=(0, 1), help="subscription QoS")
    w.set_defaults(func=_mqtt_workers)


def _mqtt_flags(s: Any) -> None:
    """The broker and worker options ``serve --mqtt`` and ``mqtt-workers`` share."""
    s.add_argument("--mqtt-workers", type=int, default=1, help="MQTT workers (shared subscription)")
    s.add_argument("--mqtt-username", help="MQTT user name")
    s.add_argument(
        "--mqtt-password",
        default=environment.mqtt_password(),
        help="MQTT password (default: $EDGECLOUD_MQTT_PASSWORD)",
    )
    s.add_argument("--mqtt-ca", type=Path, help="CA certificate for mqtts://")
    s.add_argument("--mqtt-cert", type=Path, help="client certificate (mutual TLS)")
    s.add_argument("--mqtt-key", type=Path, help="client private key (mutual TLS)")
    s.add_argument("--mqtt-prefix", default="edgecloud", help="topic prefix (default edgecloud)")
    s.add_argument(
        "--group",
        default=None,
        help="MQTT share group of this region's workers (default workers-REGION); must match "
        "the broker's grants for the workers' role",
    )


_LIMIT_FLAGS = {
    "max_json_bytes": ("--max-json-bytes", int, "largest JSON part of a request (413 above)"),
    "max_json_depth": ("--max-json-depth", int, "deepest JSON nesting accepted (400 above)"),
    "max_rows": ("--max-rows", int, "largest dim 0 of any input per request (413 above)"),
    "max_large_decodes": (
        "--max-large-decodes",
        int,
        "large bodies read and decoded at once (others wait, then 503)",
    ),
    "max_connections": ("--max-connections", int, "open HTTP connections (idle ones evicted)"),
    "header_timeout_s": ("--header-timeout", float, "seconds to receive request headers (408)"),
    "request_timeout_s": ("--request-timeout", float, "seconds to receive a request (408)"),
    "idle_timeout_s": ("--idle-timeout", float, "seconds an idle connection is kept"),
}


def _limit_options(s: Any) -> None:
    from edgecloud.limits import DEFAULT_LIMITS

    for field, (flag, kind, text) in _LIMIT_FLAGS.items():
        default = getattr(DEFAULT_LIMITS, field)
        s.add_argument(
            flag, dest=field, type=kind, default=None, help=f"{text} (default {default})"
        )


def limits_from_args(args: argparse.Namespace) -> Any:
    """The ``Limits`` the options ask for (defaults for those not given; ConfigError if bad)."""
    from edgecloud.limits import DEFAULT_LIMITS

    return DEFAULT_LIMITS.with_(
        max_body_bytes=args.max_request_bytes,
        **{f: getattr(args, f) for f in _LIMIT_FLAGS},
    )


def _start_mqtt(core: Any, args: argparse.Namespace, limits: Any = None) -> Any:
    try:
        mod = importlib.import_module("edgecloud.cloud.mqtt_worker")
        start = mod.start_mqtt_workers
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"--mqtt is not available in this build: edgecloud.cloud.mqtt_worker cannot be "
            f"loaded ({exc.__class__.__name__}: {exc})"
        ) from exc
    from edgecloud.mqtt import parse_broker_url

    if limits is None:
        limits = limits_from_args(args)
    broker = parse_broker_url(
        args.mqtt,
        username=args.mqtt_username or None,
        password=args.mqtt_password or None,
        ca=args.mqtt_ca,
        certfile=args.mqtt_cert,
        keyfile=args.mqtt_key,
    )
    opts: dict[str, Any] = {}
    if args.mqtt_prefix != "edgecloud":
        opts["prefix"] = args.mqtt_prefix
    if args.group:
        opts["group"] = args.group
    if getattr(args, "qos", 1) != 1:
        opts["qos"] = args.qos
    return start(
        core,
        broker=broker,
        region=args.region,
        workers=args.mqtt_workers,
        limits=limits,
        **opts,
    )


def _mqtt_workers(args: argparse.Namespace) -> int:
    """Workers without the HTTP server; 'ready' on stdout, then serve until SIGTERM/SIGINT."""
    import signal
    import threading

    if args.mqtt_workers < 1:
        raise ConfigError(f"--mqtt-workers must be >= 1, got {args.mqtt_workers}")
    core: Any = None
    if args.repository is not None:
        from edgecloud.cloud.core import ServingCore

        core = ServingCore(args.repository, max_batch_size=args.max_batch_size)
        target: Any = core
        limits = limits_from_args(args)
    else:
        from edgecloud.cloud.mqtt_worker import delayed_echo_handler

        target = delayed_echo_handler(args.echo_delay_ms / 1000.0)
        # --echo runs no model (no onnxruntime arena to protect): rows are bounded by the
        # payload bytes alone unless --max-rows says otherwise.
        if args.max_rows is None:
            args.max_rows = 2**62
        limits = limits_from_args(args)
    try:
        pool = _start_mqtt(target, args, limits)
    except BaseException:
        if core is not None:
            core.close()
        raise
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    try:
        stop.wait()
    finally:
        pool.stop()
        if core is not None:
            core.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from edgecloud.cloud.core import ModelRepository, ServingCore

    try:
        from edgecloud.cloud.server import CloudServer
    except ImportError as exc:  # pragma: no cover - server.py imports its web stack lazily
        raise MissingDependencyError("starlette", "cloud", "the cloud server") from exc
    if args.mqtt_workers < 1:
        raise ConfigError(f"--mqtt-workers must be >= 1, got {args.mqtt_workers}")
    if args.threads is not None and args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    limits = limits_from_args(args)
    key = None
    if args.public_key is not None:
        from edgecloud.package import load_public_key

        key = load_public_key(args.public_key)
    repo = ModelRepository(args.repository, public_key=key)
    core = ServingCore(
        repo,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue=args.max_queue,
        intra_op_threads=args.threads,
        idle_fast=args.batch_wait == "arrivals",
    )
    mqtt_handle = None
    grpc_handle: Any = None
    try:
        server = CloudServer(
            core,
            host=args.host,
            port=args.port,
            region=args.region,
            token=args.token,
            latency_ms=args.latency_ms,
            log_level=args.log_level,
            limits=limits,
        )
        if args.grpc_port is not None:
            from edgecloud.cloud.grpc_server import GrpcServer

            grpc_handle = GrpcServer(
                core,
                host=args.host,
                port=args.grpc_port,
                region=args.region,
                token=args.token,
                max_request_bytes=args.max_request_bytes,
            ).start()
            print(f"edgecloud cloud: region {args.region} grpc on {grpc_handle.url}", flush=True)
        if args.mqtt:
            mqtt_handle = _start_mqtt(core, args, limits)
        if args.latency_ms:
            log.warning("simulating a farther region: +%.0f ms on every response", args.latency_ms)
        print(
            f"edgecloud cloud: region {args.region} serving {', '.join(core.models())} "
            f"on {server.url}",
            flush=True,
        )
        server.serve_forever()
    finally:
        if grpc_handle is not None:
            grpc_handle.stop()
        if mqtt_handle is not None:
            mqtt_handle.stop()
        core.close()
    return 0
