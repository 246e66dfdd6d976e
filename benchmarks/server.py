"""Cloud server throughput: dynamic batching under concurrent clients vs in-process onnxruntime.

``python -m benchmarks.server [--quick] [--clients N] [--seconds S]``

Baseline, measured in the same run: in-process onnxruntime running the same model at batch 32
(rows per second, the best a region could do with no HTTP at all). Then a real
``edgecloud cloud serve`` child process, hammered by N client threads (HttpTransport, batch-1
requests, one keep-alive connection each), once with dynamic batching on (max batch 32) and once
off (max batch 1). Printed: requests/s, ratios, latency percentiles, the mean batch the server ran.

Goal: batching on >= 0.8x the in-process batch-32 rate. On a small model the HTTP/JSON cost per
request, not the model, bounds the rate; ``--model resnet18`` shows the compute-bound case.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _ort_batch_rate(model: Path, x1: np.ndarray, batch: int, seconds: float) -> float:
    """Rows per second of in-process onnxruntime at ``batch`` (default session options)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    xb = np.repeat(x1, batch, axis=0)
    for _ in range(3):
        sess.run(None, {"input": xb})
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {"input": xb})
        n += batch
    return n / (time.perf_counter() - t0)


def _core_rate(
    repo: Path, model: str, x: np.ndarray, clients: int, seconds: float, mbs: int
) -> float:
    """Requests per second through ServingCore alone (no HTTP), ``clients`` submitting threads."""
    from edgecloud.cloud.core import ServingCore
    from edgecloud.transport.v2 import InferRequest

    done = [0] * clients
    stop = threading.Event()
    with ServingCore(repo, max_batch_size=mbs, max_queue_delay_ms=2.0) as core:
        core.infer(InferRequest(model, {"input": x[:1]}), timeout=60)

        def run(k: int) -> None:
            while not stop.is_set():
                core.infer(
                    InferRequest(model, {"input": x[k % len(x) : k % len(x) + 1]}), timeout=60
                )
                done[k] += 1

        threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        return sum(done) / (time.perf_counter() - t0)


def _metric_sum(text: str, name: str) -> float:
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})?\s+(\S+)$", text, re.M)
    )


def _load(
    url: str, model: str, x: np.ndarray, clients: int, seconds: float, pid: int
) -> dict[str, Any]:
    import httpx
    import psutil

    from edgecloud.transport.http import HttpTransport
    from edgecloud.transport.v2 import InferRequest

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)
    stop = threading.Event()

    def run(k: int) -> None:
        with HttpTransport(url, region="bench", max_connections=1) as t:
            t.infer(InferRequest(model, {"input": x[:1]}), timeout=60)  # connect + warm
            barrier.wait()
            i = k
            while not stop.is_set():
                j = i % len(x)
                t0 = time.perf_counter()
                try:
                    t.infer(InferRequest(model, {"input": x[j : j + 1]}), timeout=60)
                    lat[k].append(time.perf_counter() - t0)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                i += clients

    before = httpx.get(f"{url}/metrics").text
    server = psutil.Process(pid)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    cpu0 = server.cpu_times()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = server.cpu_times()
    server_cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    after = httpx.get(f"{url}/metrics").text
    all_lat = sorted(v for per in lat for v in per)
    batches = _metric_sum(after, "edgecloud_cloud_batch_requests_count") - _metric_sum(
        before, "edgecloud_cloud_batch_requests_count"
    )
    reqs = _metric_sum(after, "edgecloud_cloud_batch_requests_sum") - _metric_sum(
        before, "edgecloud_cloud_batch_requests_sum"
    )
    return {
        "rps": len(all_lat) / wall,
        "p50_ms": 1000 * statistics.median(all_lat) if all_lat else float("nan"),
        "p99_ms": 1000 * all_lat[int(0.99 * (len(all_lat) - 1))] if all_lat else float("nan"),
        "mean_batch": reqs / batches if batches else float("nan"),
        "server_cpu_ms": 1000 * server_cpu / len(all_lat) if all_lat else float("nan"),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.server", description=__doc__)
    p.add_argument("--quick", action="store_true", help="3 s per phase instead of 15 s")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float)
    p.add_argument("--model", choices=["digits_cloud", "resnet18"], default="digits_cloud")
    args = p.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.servers import make_repository, running_cloud_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    if args.model == "resnet18":
        sys.path.insert(0, str(ROOT / "samples"))
        from build_resnet18 import build_resnet18

        onnx = build_resnet18(tmp / "resnet18.onnx")
        x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    else:
        onnx = ROOT / "samples" / "models" / "digits_cloud.onnx"
        x = np.load(ROOT / "samples" / "data" / "cloud_val.npz")["input"]
    name = args.model
    repo = make_repository(tmp, {name: onnx})
    print(f"model {name}; {args.clients} clients, batch-1 requests, {seconds:.0f} s per phase")
    base = _ort_batch_rate(onnx, x[:1], 32, seconds)
    print(f"in-process onnxruntime, batch 32:        {base:10.1f} rows/s   (baseline)")
    for mbs in (32, 1):
        rate = _core_rate(repo, name, x, args.clients, seconds, mbs)
        print(
            f"ServingCore alone (no HTTP), max batch {mbs:2d}: {rate:10.1f} req/s   "
            f"{rate / base:6.3f}x baseline"
        )
    results: dict[str, dict[str, Any]] = {}
    for label, mbs in (("batching on (max 32)", 32), ("batching off (max 1)", 1)):
        with running_cloud_server(
            repo, region="bench", max_batch_size=mbs, max_queue_delay_ms=2.0
        ) as srv:
            r = _load(srv.url, name, x, args.clients, seconds, srv.proc.pid)  # type: ignore[union-attr]
        results[label] = r
        print(
            f"server, {label}:   {r['rps']:10.1f} req/s    {r['rps'] / base:6.3f}x baseline  "
            f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
            f"mean batch {r['mean_batch']:5.1f}  server CPU {r['server_cpu_ms']:5.2f} ms/req  "
            f"errors {r['errors']} {r['first_error']}"
        )
    on, off = results["batching on (max 32)"], results["batching off (max 1)"]
    print(f"batching on / off:                       {on['rps'] / off['rps']:6.2f}x")
    print(f"batching on / in-process batch 32:       {on['rps'] / base:6.3f}x  (goal >= 0.8x)")
    return 1 if on["errors"] or off["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
