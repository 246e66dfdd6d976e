"""Bytes upstream per offload and the cloud's accuracy for FP32, FP16 and INT8 tensors.

Every held-out row is sent as one request (one offload) to a real region: our server over HTTP
on loopback (JSON and the binary tensor extension), an MQTT worker of the same ``ServingCore``
on a real Mosquitto (JSON and binary) and our gRPC server on the same core. Bytes per offload
are the transports' own counters (``transport.upstream``: encoded HTTP bodies and MQTT payloads,
serialized gRPC messages); FP16 and INT8 requests go through ``downcast_fp16`` and
``quantize_int8``, what ``HybridClient(upstream_fp16=..., upstream_int8=...)`` calls; accuracy
is that of the answers the region returned, and "agree" the share of INT8 (FP16) answers equal
to the FP32 ones. Ratios are against FP32 on the same transport in the same run.

Two tasks: the digits cloud CNN ([1, 8, 8], 360 held-out rows) and the cloud MLP of the harder
pair (samples/build_hard_pair.py, [64], 450 held-out rows). Then the codec alone on a
3x224x224 image-sized tensor (bytes only: no image model ships here).

    python -m benchmarks.bandwidth [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _encodings() -> dict[str, Callable[[Any], Any]]:
    from edgecloud.transport.compact import downcast_fp16, quantize_int8

    return {"FP32": lambda r: r, "FP16": downcast_fp16, "INT8": quantize_int8}


def _send(t: Any, x: np.ndarray, encode: Callable[[Any], Any]) -> tuple[float, np.ndarray]:
    """Every row as one request over ``t``: (bytes per request from its counter, predictions)."""
    from edgecloud.transport.v2 import InferRequest

    pred = []
    for i in range(len(x)):
        req = encode(InferRequest("m", {"input": x[i : i + 1]}))
        out = t.infer(req, timeout=10.0).outputs
        pred.append(int(np.asarray(next(iter(out.values()))).argmax()))
    return float(t.upstream.snapshot()["bytes_per_request"]), np.array(pred)


CLIENTS = ("HTTP JSON", "HTTP binary", "MQTT JSON", "MQTT binary", "gRPC")


def _client(label: str, http: str, grpc: str, broker: str) -> Any:
    """A fresh transport (its own counter) of kind ``label`` to the bench region."""
    from edgecloud.transport.grpc import GrpcTransport
    from edgecloud.transport.http import HttpTransport
    from edgecloud.transport.mqtt import MqttTransport

    threshold = 0 if label.endswith("binary") else 1 << 30
    if label.startswith("HTTP"):
        return HttpTransport(http, region="bench", binary_threshold=threshold)
    if label.startswith("MQTT"):
        return MqttTransport(broker, region="bench", device_id="bw", binary_threshold=threshold)
    return GrpcTransport(grpc, region="bench")


def regions(work: Path, rows: int | None = None) -> None:
    """The table above, on the first ``rows`` held-out rows of each task (None: all)."""
    from edgecloud.cloud.core import ServingCore
    from edgecloud.cloud.grpc_server import GrpcServer
    from edgecloud.cloud.mqtt_worker import start_mqtt_workers
    from edgecloud.cloud.server import CloudServer
    from samples.build_hard_pair import build
    from tests.fixtures.broker import MosquittoBroker

    build(work / "hard")
    cases = [
        ("digits cloud CNN", SAMPLES / "models" / "digits_cloud.onnx",
         np.load(SAMPLES / "data" / "cloud_val.npz")),
        ("hard pair cloud MLP", work / "hard" / "cloud.onnx", np.load(work / "hard" / "test.npz")),
    ]  # fmt: skip
    print("## bytes per offloaded request (1 row) and accuracy, through real regions")
    with MosquittoBroker() as broker:
        for name, model, z in cases:
            x, y = z["input"].astype(np.float32), z["labels"]
            x, y = x[:rows], y[:rows]
            repo = work / f"repo-{model.stem}-{len(y)}"
            (repo / "m" / "1").mkdir(parents=True, exist_ok=True)
            (repo / "m" / "1" / "model.onnx").write_bytes(model.read_bytes())
            core = ServingCore(repo, max_batch_size=8, max_queue_delay_ms=0.5)
            server = CloudServer(core, port=0, region="bench").start()
            grpc_server = GrpcServer(core, region="bench").start()
            pool = start_mqtt_workers(core, broker=broker.url, region="bench", workers=1)
            print(f"\n{name}: input {list(x.shape[1:])}, {len(y)} held-out rows")
            print(
                "  transport       FP32 B   FP16 B (ratio)   INT8 B (ratio)   accuracy FP32 / "
                "FP16 / INT8   INT8 agrees with FP32"
            )
            try:
                for label in CLIENTS:
                    row: dict[str, tuple[float, np.ndarray]] = {}
                    for enc, fn in _encodings().items():
                        t = _client(label, server.url, grpc_server.url, broker.url)
                        try:
                            row[enc] = _send(t, x, fn)
                        finally:
                            t.close()
                    (b32, p32), (b16, p16), (b8, p8) = row["FP32"], row["FP16"], row["INT8"]
                    acc = [float(np.mean(p == y)) for p in (p32, p16, p8)]
                    print(
                        f"  {label:12s} {b32:7.1f}  {b16:7.1f} (x{b16 / b32:.2f})  "
                        f"{b8:7.1f} (x{b8 / b32:.2f})   {acc[0]:.4f} / {acc[1]:.4f} / "
                        f"{acc[2]:.4f}   {np.mean(p8 == p32):.4f} (FP16: {np.mean(p16 == p32):.4f})"
                    )
            finally:
                pool.stop()
                grpc_server.stop()
                server.stop()
                core.close()


def image_codec() -> None:
    """What the same encodings weigh for a 3x224x224 tensor (the codec alone, bytes only)."""
    from edgecloud.transport.v2 import InferRequest, encode_request

    x = np.random.default_rng(0).normal(0, 1, (1, 3, 224, 224)).astype(np.float32)
    print("\n## the codec alone: one 1x3x224x224 FP32 tensor (binary tensor extension)")
    base = 0
    for enc, fn in _encodings().items():
        req = fn(InferRequest("m", {"input": x}, id="ec-1"))
        n = len(encode_request(req, binary=True)[0])
        base = base or n
        back = req.inputs["input"].astype(np.float32)
        if enc == "INT8":
            p = req.input_parameters["input"]
            back = (back - p["dequantize_zero_point"]) * float(p["dequantize_scale"])
        err = float(np.max(np.abs(back - x)))
        print(f"  {enc}: {n:7d} B (x{n / base:.3f}); max abs error after the round trip {err:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bandwidth", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="80 rows per task")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        regions(Path(d), 80 if args.quick else None)
    image_codec()
    return 0


if __name__ == "__main__":
    sys.exit(main())
