"""Device agent: local inference cost, the local V2 endpoint, and the durable queue.

What a device pays for going through the agent instead of calling onnxruntime itself, measured
against baselines taken in the same run on the same machine:

1. in process, batch 1, the digits edge MLP on a confident input: ``agent.infer`` (metrics,
   capture hooks, version tag) and ``agent.client.infer`` vs ``InferenceSession.run`` of the very
   session the agent serves with. Calls alternate one by one so that frequency changes and other
   processes hit all three alike;
2. over HTTP, one ``httpx.Client`` (keep-alive), V2 JSON, batch 1: the agent's local endpoint vs
   ``edgecloud cloud serve`` (a child process, same ONNX model) on loopback. Absolute overhead of
   the endpoint over ``session.run`` in microseconds, and the endpoint / cloud-server ratio;
3. the durable outbox (SQLite WAL): enqueue + ack per second with an fsync per record (the
   agent's setting) and without (``DurableQueue(fsync=False)``).

    python -m benchmarks.agent [--quick]

A real Mosquitto (/usr/sbin/mosquitto) is started for the agent; without it the MQTT link stays
down, which does not change the figures.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
EDGE_ONNX = SAMPLES / "models" / "digits_edge.onnx"


def _us(samples: list[int], q: float = 0.5) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def _interleaved(
    fns: dict[str, Callable[[], object]], n: int, budget_s: float
) -> dict[str, list[int]]:
    """Time each function once per round, round after round, until ``n`` rounds or the budget."""
    clock = time.perf_counter_ns
    out: dict[str, list[int]] = {k: [] for k in fns}
    items = list(fns.items())
    end = time.monotonic() + budget_s
    gc.disable()
    try:
        for i in range(n):
            for name, fn in items:
                t0 = clock()
                fn()
                out[name].append(clock() - t0)
            if i % 64 == 0 and time.monotonic() > end:
                break
    finally:
        gc.enable()
    return out


def _package(tmp: Path) -> tuple[Path, Path]:
    """A signed package of the edge MLP (logits confidence) and its fleet public key."""
    from edgecloud.package import (
        Manifest,
        TensorSpec,
        Variant,
        generate_keypair,
        load_private_key,
        pack_package,
        write_package,
    )

    priv, pub = generate_keypair(tmp / "fleet.key")
    manifest = Manifest(
        name="digits",
        version="1.0.0",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),),
        confidence="logits",
        labels=tuple(str(i) for i in range(10)),
    )
    write_package(
        tmp / "pkg", manifest, {"model.onnx": EDGE_ONNX}, signing_key=load_private_key(priv)
    )
    archive = tmp / "digits-1.0.0.tar.gz"
    pack_package(tmp / "pkg", archive)
    return archive, pub


def _start_agent(tmp: Path, broker_url: str) -> Any:
    from device_agent.agent import Agent
    from device_agent.config import load_config
    from device_agent.store import ModelStore
    from edgecloud.package import load_public_key

    archive, pub = _package(tmp)
    store = ModelStore(tmp / "store", load_public_key(pub))
    store.set_active("A", store.stage(archive, "A"))
    cfg = tmp / "agent.toml"
    cfg.write_text(
        f"""
[device]
id = "bench-1"

[broker]
url = "{broker_url}"
reconnect_min_s = 0.5
reconnect_max_s = 5

[store]
path = "{tmp / "store"}"
public_key = "{pub}"
min_free_mb = 0

[policy]
mode = "edge_first"
threshold = 0.5

[telemetry]
interval_s = 3600

[endpoint]
port = 0
"""
    )
    return Agent(load_config(cfg)).start()


def _queue_rate(path: Path, fsync: bool, seconds: float, payload: bytes) -> float:
    from device_agent.queue import DurableQueue

    q = DurableQueue(path, fsync=fsync)
    try:
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            q.ack(q.put("telemetry", "edgecloud/devices/bench-1/telemetry", payload))
            n += 1
            if n % 16 == 0 and time.perf_counter() > end:
                break
        return n / (time.perf_counter() - t0)
    finally:
        q.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agent", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few seconds instead of about a minute")
    args = p.parse_args(argv)
    n_local = 2000 if args.quick else 30000
    n_http = 200 if args.quick else 3000
    q_seconds = 0.5 if args.quick else 5.0

    import httpx

    from tests.fixtures.broker import MosquittoBroker
    from tests.fixtures.servers import make_repository, running_cloud_server

    data = np.load(SAMPLES / "data" / "edge_val.npz")["input"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    try:
        (tmp / "broker").mkdir()
        broker: MosquittoBroker | None = MosquittoBroker(workdir=tmp / "broker")
    except RuntimeError:  # no mosquitto: the agent serves locally all the same
        broker = None
    agent = None
    try:
        if broker is not None:
            broker.start()
        agent = _start_agent(tmp, broker.url if broker else "mqtt://127.0.0.1:9")
        client = agent.client
        backend = client.backend
        assert backend is not None
        conf = [r.confidence for r in client.infer_batch({"input": data[:64]})]
        i = int(np.argmax(conf))
        feed = {"input": np.ascontiguousarray(data[i : i + 1], dtype=np.float32)}
        out = agent.infer(feed)
        assert out.route == "edge", out.route
        assert out.version == "1.0.0", out.version
        session = backend.session  # the very session the agent serves with
        names = ["logits"]
        np.testing.assert_allclose(session.run(names, feed)[0], out.outputs["logits"], rtol=1e-6)

        print(f"device agent, batch 1, digits MLP ({'quick' if args.quick else 'full'} run)")
        fns: dict[str, Callable[[], object]] = {
            "raw session.run": lambda: session.run(names, feed),
            "agent.client.infer": lambda: client.infer(feed),
            "agent.infer": lambda: agent.infer(feed),
        }
        _interleaved(fns, min(500, n_local), 5.0)  # warm-up
        t = _interleaved(fns, n_local, 20.0 if args.quick else 60.0)
        base = _us(t["raw session.run"])
        print(f"{'in process':28s} {'median us':>10s} {'p99 us':>10s} {'ratio':>8s} {'added':>9s}")
        for name, xs in t.items():
            med = _us(xs)
            print(
                f"  {name:26s} {med:10.2f} {_us(xs, 0.99):10.2f} {med / base:7.2f}x "
                f"{med - base:9.2f}"
            )

        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "data": feed["input"].ravel().tolist(),
                }
            ]
        }
        assert agent.endpoint is not None
        repo = make_repository(tmp, {"digits": EDGE_ONNX})
        with (
            running_cloud_server(repo, max_queue_delay_ms=0.0, threads=1) as cloud,
            httpx.Client(timeout=10.0) as http,
        ):
            urls = {
                "agent endpoint": f"{agent.endpoint.url}/v2/models/digits/infer",
                "cloud server": f"{cloud.url}/v2/models/digits/infer",
            }
            for url in urls.values():
                r = http.post(url, json=body)
                r.raise_for_status()
                got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
                np.testing.assert_allclose(got, out.outputs["logits"].ravel(), rtol=1e-5)
            hfns: dict[str, Callable[[], object]] = {
                "raw session.run": lambda: session.run(names, feed),
                **{k: (lambda u=u: http.post(u, json=body)) for k, u in urls.items()},
            }
            _interleaved(hfns, min(100, n_http), 5.0)
            h = _interleaved(hfns, n_http, 20.0 if args.quick else 60.0)
        base_h = _us(h["raw session.run"])
        ep, cl = _us(h["agent endpoint"]), _us(h["cloud server"])
        print(f"{'HTTP V2 JSON, httpx':28s} {'median us':>10s} {'p99 us':>10s}")
        for name, xs in h.items():
            print(f"  {name:26s} {_us(xs):10.1f} {_us(xs, 0.99):10.1f}")
        print(
            f"  endpoint overhead over session.run: {ep - base_h:.1f} us; "
            f"endpoint / cloud server round trip: {ep / cl:.2f}x"
        )

        payload = b"x" * 256
        full = _queue_rate(tmp / "q-fsync.db", True, q_seconds, payload)
        normal = _queue_rate(tmp / "q-nofsync.db", False, q_seconds, payload)
        print("durable queue, enqueue + ack of a 256-byte record (SQLite WAL)")
        print(f"  fsync per record (agent default)  {full:10.0f} /s")
        print(f"  no fsync (synchronous=NORMAL)     {normal:10.0f} /s   ({normal / full:.1f}x)")
    finally:
        if agent is not None:
            agent.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
