"""The HTTP fallback path: ``HttpTransport.infer`` vs a raw httpx POST of the same V2 body.

``python -m benchmarks.http [--quick] [--requests N]``

Both clients keep one connection alive to the same real ``edgecloud cloud serve`` child process
(batching delay 0, so the server adds as little as it can), send batch-1 digits inputs, and take
turns in small interleaved rounds so that noise from other work on the machine hits both alike.
The raw baseline posts a body encoded once, up front, and reads the bytes back; the transport
encodes each request, builds the deadline-derived timeout, checks the status and decodes the
tensors. Printed: median and p99 latency of each and the median ratio (goal <= 1.2x), for JSON
and for the binary tensor extension.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _measure(url: str, x: np.ndarray, n: int, binary: bool) -> tuple[list[float], list[float]]:
    import httpx

    from edgecloud.transport.http import HttpTransport
    from edgecloud.transport.v2 import HEADER_LENGTH, InferRequest, encode_request

    model = "digits_cloud"
    threshold = 0 if binary else 1 << 30
    body, hl = encode_request(
        InferRequest(model, {"input": x[:1]}), binary=binary, binary_outputs=binary
    )
    headers = {"Content-Type": "application/octet-stream" if hl else "application/json"}
    if hl is not None:
        headers[HEADER_LENGTH] = str(hl)
    path = f"/v2/models/{model}/infer"
    raw_t: list[float] = []
    ours_t: list[float] = []
    with (
        httpx.Client(base_url=url, timeout=30, trust_env=False) as raw,
        HttpTransport(url, region="bench", binary_threshold=threshold) as ours,
    ):
        for _ in range(20):  # connect and warm both
            raw.post(path, content=body, headers=headers).raise_for_status()
            ours.infer(InferRequest(model, {"input": x[:1]}), timeout=30)
        rounds = max(1, n // 10)
        for r in range(rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for which in order:
                for i in range(10):
                    j = (r * 10 + i) % len(x)
                    if which == 0:
                        t0 = time.perf_counter()
                        resp = raw.post(path, content=body, headers=headers)
                        _ = resp.content
                        raw_t.append(time.perf_counter() - t0)
                    else:
                        req = InferRequest(model, {"input": x[j : j + 1]})
                        t0 = time.perf_counter()
                        ours.infer(req, timeout=30)
                        ours_t.append(time.perf_counter() - t0)
    return raw_t, ours_t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http", description=__doc__)
    p.add_argument("--quick", action="store_true", help="300 requests each instead of 3000")
    p.add_argument("--requests", type=int)
    args = p.parse_args(argv)
    n = args.requests or (300 if args.quick else 3000)
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.servers import make_repository, running_cloud_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    repo = make_repository(tmp, {"digits_cloud": ROOT / "samples" / "models" / "digits_cloud.onnx"})
    x = np.load(ROOT / "samples" / "data" / "cloud_val.npz")["input"]
    print(f"batch-1 digits requests, {n} per client, one keep-alive connection each")
    worst = 0.0
    with running_cloud_server(repo, region="bench", max_queue_delay_ms=0.0) as srv:
        for binary in (False, True):
            raw_t, ours_t = _measure(srv.url, x, n, binary)
            raw_med, ours_med = statistics.median(raw_t), statistics.median(ours_t)
            ratio = ours_med / raw_med
            worst = max(worst, ratio)
            p99 = lambda v: sorted(v)[int(0.99 * (len(v) - 1))]  # noqa: E731
            kind = "binary" if binary else "JSON  "
            print(
                f"{kind}  raw httpx p50 {1000 * raw_med:6.3f} ms p99 {1000 * p99(raw_t):6.3f} ms | "
                f"HttpTransport p50 {1000 * ours_med:6.3f} ms p99 {1000 * p99(ours_t):6.3f} ms | "
                f"ratio {ratio:5.3f}x (goal <= 1.2x)"
            )
    return 0 if worst <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
