"""The MQTT cloud path: ``MqttTransport.infer`` (and HybridClient's cloud path) vs raw paho MQTT 5.

``python -m benchmarks.mqtt [--quick] [--requests N]``

Everything talks to one real Mosquitto on loopback (``set_tcp_nodelay true``) and to the same echo
worker (``edgecloud cloud mqtt-workers --echo``, a child process, one per QoS level), so
the only difference between the series is the client side:

- raw: a bare paho-mqtt 2.x MQTT 5 client on paho's own network thread, TCP_NODELAY on. Each
  request builds fresh properties (Response Topic, a new Correlation Data, the model user
  property), publishes a body encoded once up front, and waits for the reply with that correlation
  data; it does not decode the reply.
- transport: ``MqttTransport.infer`` with a V2 ``InferRequest``: encodes the tensors, adds the
  deadline (Message Expiry, ``deadline-ms``), tracks the pending id, checks the status and decodes
  the reply tensors.
- hybrid (256 B, QoS 1 only): ``HybridClient.infer`` in ``cloud_only`` mode over the same region.

Payloads: a 64-value float32 tensor (256 B of tensor data) sent as V2 JSON (the default below the
16 KiB binary threshold: the transport pays JSON encoding and decoding that the raw client, which
sends a body encoded once, does not) and as the binary extension (``binary_threshold=0``), and a
16,384-value one (64 KiB, binary). Series run in small interleaved rounds so noise from other
work on the machine hits all alike. Printed: median and p99 per series and the median ratio
against raw (goal <= 1.2x). Then throughput: 1, 2 and 4 echo worker processes in one share group,
a fixed number of client threads through one ``MqttTransport``, requests per second over a fixed
time: once with a bare echo (CPU-bound: client, broker and workers share the machine's cores) and
once with workers that hold each request 5 ms like a backend waiting on an accelerator (shows how
the share group spreads load, independent of the core count).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "bench-dev"


@contextmanager
def _workers(
    url: str, region: str, n: int, qos: int = 1, delay_ms: float = 0.0
) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(n):
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgecloud",
                    "cloud",
                    "mqtt-workers",
                    "--mqtt",
                    url,
                    "--region",
                    region,
                    "--echo",
                    "--qos",
                    str(qos),
                    "--echo-delay-ms",
                    str(delay_ms),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(p)
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("echo worker did not start")
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
            if p.stdout:
                p.stdout.close()


class RawRequester:
    """The baseline: bare paho MQTT 5 request/response, paho's threaded loop, TCP_NODELAY on."""

    def __init__(self, host: str, port: int, region: str, qos: int) -> None:
        import socket

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from edgecloud.topics import Topics

        t = Topics()
        self.request_topic = t.infer_request(DEVICE + "-raw", region)
        self.reply_topic = t.infer_reply(DEVICE + "-raw")
        self.qos = qos
        self._waiting: dict[bytes, threading.Event] = {}
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"raw-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        sock = self.client.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        self.client.loop_start()
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(self.reply_topic, qos=qos)
        done.wait(5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        ev = self._waiting.get(bytes(msg.properties.CorrelationData))
        if ev is not None:
            ev.set()

    def request(
        self, body: bytes, header_len: int | None, threshold: int = 16384, timeout: float = 5.0
    ) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        props.MessageExpiryInterval = int(timeout)
        # the same user properties MqttTransport sends, so the worker does the same work
        user = [("model", "m"), ("deadline-ms", str(int((time.time() + timeout) * 1000)))]
        if threshold != 16384:
            user.append(("binary-threshold", str(threshold)))
        if header_len is not None:
            user.append(("Inference-Header-Content-Length", str(header_len)))
        props.UserProperty = user
        ev = threading.Event()
        self._waiting[corr] = ev
        self.client.publish(self.request_topic, body, qos=self.qos, properties=props)
        if not ev.wait(timeout):
            raise TimeoutError("raw request timed out")
        del self._waiting[corr]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency(url: str, host: str, port: int, n: int) -> list[dict[str, Any]]:
    from edgecloud.client import HybridClient
    from edgecloud.transport.mqtt import MqttTransport
    from edgecloud.transport.v2 import InferRequest, encode_request

    rows: list[dict[str, Any]] = []
    for qos in (0, 1):
        region = f"lat-q{qos}"
        with _workers(url, region, 1, qos=qos):
            cases = (("256 B JSON", 64, 16384), ("256 B bin", 64, 0), ("64 KiB bin", 16384, 16384))
            for label, values, threshold in cases:
                x = np.random.default_rng(0).standard_normal(values).astype(np.float32)
                req = InferRequest("m", {"x": x})
                body, hl = encode_request(req, binary=threshold)
                raw = RawRequester(host, port, region, qos)
                ours = MqttTransport(
                    url,
                    region=region,
                    device_id=f"{DEVICE}-{threshold}",
                    qos=qos,
                    binary_threshold=threshold,
                )
                hybrid = None
                series: dict[str, Callable[[], Any]] = {
                    "raw paho": lambda raw=raw, b=body, hl=hl, th=threshold: raw.request(b, hl, th),
                    "MqttTransport": lambda ours=ours, req=req: ours.infer(req, timeout=5.0),
                }
                if qos == 1 and label == "256 B JSON":
                    hybrid = HybridClient(
                        regions=[
                            {
                                "name": region,
                                "endpoint": url,
                                "model": "m",
                                "options": {"device_id": DEVICE + "-h", "qos": qos},
                            }
                        ],
                        mode="cloud_only",
                        probe_interval=None,
                        deadline=5.0,
                    )
                    series["HybridClient cloud"] = lambda h=hybrid, x=x: h.infer({"x": x})
                times: dict[str, list[float]] = {k: [] for k in series}
                for fn in series.values():  # connect and warm
                    for _ in range(30):
                        fn()
                rounds = max(1, n // 50)
                for _ in range(rounds):
                    for name, fn in series.items():
                        ts = times[name]
                        for _ in range(50):
                            t0 = time.perf_counter()
                            fn()
                            ts.append(time.perf_counter() - t0)
                base = statistics.median(times["raw paho"])
                for name, ts in times.items():
                    med = statistics.median(ts)
                    rows.append(
                        {
                            "qos": qos,
                            "payload": label,
                            "series": name,
                            "median_ms": med * 1e3,
                            "p99_ms": _pct(ts, 0.99) * 1e3,
                            "ratio": med / base,
                        }
                    )
                raw.close()
                ours.close()
                if hybrid is not None:
                    hybrid.close()
    return rows


def throughput(
    url: str, seconds: float, threads: int, delay_ms: float = 0.0
) -> list[dict[str, Any]]:
    from edgecloud.transport.mqtt import MqttTransport
    from edgecloud.transport.v2 import InferRequest

    rows = []
    x = np.arange(64, dtype=np.float32)
    for n in (1, 2, 4):
        region = f"tp-{n}-{int(delay_ms)}"
        with (
            _workers(url, region, n, delay_ms=delay_ms),
            MqttTransport(url, region=region, device_id=DEVICE + "-tp", max_pending=4096) as t,
        ):
            for _ in range(50):
                t.infer(InferRequest("m", {"x": x}), timeout=5)
            stop = time.monotonic() + seconds
            counts = [0] * threads
            errors = [0] * threads

            def loop(
                i: int, stop: float = stop, counts: list[int] = counts, errors: list[int] = errors
            ) -> None:
                req = InferRequest("m", {"x": x})
                while time.monotonic() < stop:
                    try:
                        t.infer(req, timeout=5)
                        counts[i] += 1
                    except Exception:
                        errors[i] += 1

            start = time.monotonic()
            ths = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            elapsed = time.monotonic() - start
            rows.append({"workers": n, "rps": sum(counts) / elapsed, "errors": sum(errors)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mqtt", description=__doc__)
    p.add_argument("--quick", action="store_true", help="300 requests per series, 1 s throughput")
    p.add_argument("--requests", type=int, default=None, help="requests per latency series")
    p.add_argument("--threads", type=int, default=16, help="client threads for throughput")
    args = p.parse_args(argv)
    n = args.requests or (300 if args.quick else 2000)
    seconds = 1.0 if args.quick else 4.0
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.broker import MosquittoBroker

    with MosquittoBroker() as broker:
        print(f"broker {broker.url} (set_tcp_nodelay true); {n} requests per series")
        head = f"{'qos':>3} {'payload':>10} {'series':<20} {'median ms':>10} {'p99 ms':>8}"
        print(f"{head} {'ratio':>6}")
        worst = 0.0
        for r in latency(broker.url, broker.host, broker.port, n):
            print(
                f"{r['qos']:>3} {r['payload']:>10} {r['series']:<20} {r['median_ms']:>10.3f} "
                f"{r['p99_ms']:>8.3f} {r['ratio']:>5.2f}x"
            )
            if r["series"] == "MqttTransport":
                worst = max(worst, r["ratio"])
        print(f"worst MqttTransport/raw median ratio: {worst:.2f}x (goal <= 1.2x)")
        for delay in (0.0, 5.0):
            what = "echo" if not delay else f"echo holding each request {delay:.0f} ms"
            print(f"\nthroughput: {what}, 256 B, QoS 1, {args.threads} client threads, {seconds} s")
            base = None
            for r in throughput(broker.url, seconds, args.threads, delay_ms=delay):
                base = base or r["rps"]
                print(
                    f"  {r['workers']} worker(s): {r['rps']:8.0f} req/s  ({r['rps'] / base:.2f}x)"
                    f"  errors {r['errors']}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
