"""The gRPC path: ``GrpcTransport.infer`` vs raw grpc, and vs ``HttpTransport``, on the same model.

``python -m benchmarks.grpc_transport [--quick] [--requests N]``

One real ``edgecloud cloud serve --grpc-port 0`` child process (batching delay 0) serves both
protocols from one ``ServingCore``. Four clients, each with one connection (channel) kept alive,
send batch-1 requests in small interleaved rounds so that noise from other work on the machine
hits all alike:

- raw grpc: the generated stub, a ``ModelInferRequest`` serialised once up front, the response
  bytes not even parsed (the least a gRPC client can do: the baseline);
- ``GrpcTransport``: builds the message from numpy, sets the deadline, decodes the tensors;
- ``HttpTransport`` with the binary tensor extension, and with JSON.

Two models: the digits CNN (a 256-byte input) and an image classifier with a 3x224x224 input
(588 KiB). Printed: median and p99 latency of each client and the median ratios
GrpcTransport / raw grpc (goal <= 1.2x) and GrpcTransport / HttpTransport.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _clients(
    http_url: str, grpc_url: str, model: str, x: np.ndarray
) -> dict[str, Callable[[], object]]:
    import grpc

    from edgecloud.transport._proto import grpc_predict_v2_pb2 as pb
    from edgecloud.transport.grpc import GrpcTransport
    from edgecloud.transport.http import HttpTransport
    from edgecloud.transport.v2 import InferRequest

    msg = pb.ModelInferRequest(model_name=model)
    msg.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    msg.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    payload = msg.SerializeToString()
    channel = grpc.insecure_channel(
        grpc_url.removeprefix("grpc://"),
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    raw = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    gt = GrpcTransport(grpc_url, region="bench")
    hb = HttpTransport(
        http_url, region="bench", binary="always", binary_threshold=0, max_connections=1
    )
    hj = HttpTransport(http_url, region="bench", binary="never", max_connections=1)
    req = InferRequest(model, {"input": x})
    return {
        "raw grpc": lambda: raw(payload, timeout=30),
        "GrpcTransport": lambda: gt.infer(req, timeout=30),
        "HttpTransport binary": lambda: hb.infer(req, timeout=30),
        "HttpTransport JSON": lambda: hj.infer(req, timeout=30),
    }


def _measure(clients: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    for fn in clients.values():
        for _ in range(10):  # connect and warm
            fn()
    times: dict[str, list[float]] = {k: [] for k in clients}
    names = list(clients)
    rounds = max(1, n // 10)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = clients[name]
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpc_transport", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer requests")
    p.add_argument("--requests", type=int, help="requests per client and model (default 2000)")
    args = p.parse_args(argv)
    n = args.requests or (300 if args.quick else 2000)
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.mlserver import make_image_model
    from tests.fixtures.servers import make_repository, running_cloud_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    digits = ROOT / "samples" / "models" / "digits_cloud.onnx"
    image = make_image_model(tmp / "image10.onnx")
    repo = make_repository(tmp, {"digits_cloud": digits, "image10": image})
    inputs = {
        "digits_cloud": np.load(ROOT / "samples" / "data" / "cloud_val.npz")["input"][:1],
        "image10": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32),
    }
    print(f"{n} batch-1 requests per client and model, interleaved rounds of 10")
    worst = 0.0
    with running_cloud_server(
        repo, region="bench", max_queue_delay_ms=0.0, extra_args=["--grpc-port", "0"]
    ) as srv:
        out = "".join(getattr(srv, "output", []))
        m = re.search(r" grpc on (grpc://\S+)", out)
        if m is None:
            raise SystemExit(f"no gRPC address in the server's output:\n{out}")
        for model, x in inputs.items():
            clients = _clients(srv.url, m.group(1), model, x)
            times = _measure(clients, n)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"\nmodel {model}, input {list(x.shape)} ({x.nbytes} bytes):")
            for name, v in times.items():
                v = sorted(v)
                print(
                    f"  {name:22s} p50 {1000 * med[name]:7.3f} ms  "
                    f"p99 {1000 * v[int(0.99 * (len(v) - 1))]:7.3f} ms"
                )
            ratio = med["GrpcTransport"] / med["raw grpc"]
            worst = max(worst, ratio)
            print(f"  GrpcTransport / raw grpc:              {ratio:5.2f}x  (goal <= 1.2x)")
            for h in ("HttpTransport binary", "HttpTransport JSON"):
                print(f"  GrpcTransport / {h + ':':24s} {med['GrpcTransport'] / med[h]:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
