"""Cascade accuracy on the held-out digits: edge MLP locally, cloud CNN for the unsure rest.

For each confidence measure (max probability, margin, normalised entropy) and a sweep of
thresholds, prints the hybrid accuracy and the fraction offloaded, next to edge-only and
cloud-only accuracy measured in the same run. The sweep computes both models in-process with
onnxruntime (the routing decision is a pure function of the edge outputs, so this is exact).
Thresholds are also *chosen on the calibration split* and reported on the validation split, which
is what a deployment can actually do. Then one threshold runs end to end: ``HybridClient`` on a
signed edge package, a real V2 region server on loopback serving the cloud model, HttpTransport,
and the figures must match the in-process sweep.

Goal: hybrid accuracy within 0.3 point of cloud-only while offloading at most 20 % of requests.

    python -m benchmarks.cascade [--quick] [--threshold T]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


def _probs(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(1, keepdims=True))
    return np.asarray(e / e.sum(1, keepdims=True))


def _measures(p: np.ndarray) -> dict[str, np.ndarray]:
    s = np.sort(p, axis=1)
    h = -(p * np.log(np.clip(p, 1e-12, 1))).sum(1) / np.log(p.shape[1])
    return {"max_probability": s[:, -1], "margin": s[:, -1] - s[:, -2], "entropy": 1 - h}


def _split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import onnxruntime as ort

    e = np.load(SAMPLES / "data" / f"edge_{split}.npz")
    c = np.load(SAMPLES / "data" / f"cloud_{split}.npz")
    assert np.array_equal(e["labels"], c["labels"]), "edge and cloud data must be aligned"
    se = ort.InferenceSession(str(SAMPLES / "models" / "digits_edge.onnx"))
    sc = ort.InferenceSession(str(SAMPLES / "models" / "digits_cloud.onnx"))
    return (
        se.run(["logits"], {"input": e["input"]})[0],
        sc.run(["logits"], {"input": c["input"]})[0],
        e["labels"],
    )


def _hybrid(
    conf: np.ndarray, t: float, edge_ok: np.ndarray, cloud_ok: np.ndarray
) -> tuple[float, float]:
    off = conf < t
    return float(np.where(off, cloud_ok, edge_ok).mean()), float(off.mean())


def _end_to_end(threshold: float, measure: str) -> tuple[float, float, float, dict[str, int]]:
    """Run the validation split through HybridClient against a real region server."""
    from edgecloud.client import HybridClient
    from edgecloud.cloud.core import ServingCore
    from edgecloud.cloud.server import CloudServer
    from edgecloud.package import (
        Manifest,
        TensorSpec,
        Variant,
        generate_keypair,
        load_private_key,
        write_package,
    )

    data = np.load(SAMPLES / "data" / "edge_val.npz")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        repo = tmp / "repo" / "digits_cloud" / "1"
        repo.mkdir(parents=True)
        (repo / "model.onnx").write_bytes((SAMPLES / "models" / "digits_cloud.onnx").read_bytes())
        priv, pub = generate_keypair(tmp / "k")
        write_package(
            tmp / "pkg",
            Manifest(
                name="digits_edge",
                version="1",
                inputs=(TensorSpec("input", "float32", ("batch", 64)),),
                outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
                variants=(Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),),
                labels=tuple(str(i) for i in range(10)),
            ),
            {"model.onnx": SAMPLES / "models" / "digits_edge.onnx"},
            signing_key=load_private_key(priv),
        )
        core = ServingCore(tmp / "repo", intra_op_threads=1)
        server = CloudServer(core, region="bench").start()
        try:
            region = {
                "name": "bench",
                "endpoint": server.url,
                "model": "digits_cloud",
                "cloud_input_shape": [1, 8, 8],
            }
            with HybridClient(
                tmp / "pkg",
                public_key=pub,
                regions=[region],
                threshold=threshold,
                confidence=measure,
                probe_interval=None,
                deadline=5.0,
            ) as client:
                t0 = time.perf_counter()
                results = [
                    client.infer({"input": data["input"][i : i + 1]})
                    for i in range(len(data["input"]))
                ]
                wall = time.perf_counter() - t0
        finally:
            server.stop()
            core.close()
    preds = np.array([int(r.label or -1) for r in results])
    acc = float((preds == data["labels"]).mean())
    off = float(np.mean([r.source.startswith("cloud:") for r in results]))
    reasons: dict[str, int] = {}
    for r in results:
        reasons[str(r.reason)] = reasons.get(str(r.reason), 0) + 1
    return acc, off, wall / len(results), reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cascade", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="coarser sweep")
    parser.add_argument("--threshold", type=float, default=None, help="for the end-to-end run")
    parser.add_argument("--measure", default="max_probability", help="for the end-to-end run")
    parser.add_argument("--no-tune", action="store_true", help="skip the calibration report")
    args = parser.parse_args(argv)

    le, lc, y = _split("val")
    ce, cc, yc = _split("calib")
    edge_ok, cloud_ok = le.argmax(1) == y, lc.argmax(1) == y
    edge_acc, cloud_acc = float(edge_ok.mean()), float(cloud_ok.mean())
    oracle = float((edge_ok | cloud_ok).mean())
    print(f"held-out digits: {len(y)} samples (calibration split: {len(yc)})")
    print(f"edge-only {edge_acc:.4f}   cloud-only {cloud_acc:.4f}   oracle cascade {oracle:.4f}")
    target = cloud_acc - 0.003
    measures = _measures(_probs(le))
    calib_measures = _measures(_probs(ce))
    calib_edge_ok, calib_cloud_ok = ce.argmax(1) == yc, cc.argmax(1) == yc
    step = 0.1 if args.quick else 0.05
    grid = np.round(np.arange(0.0, 1.0 + 1e-9, step), 3)
    for name, conf in measures.items():
        print(f"\n{name}: threshold  offload  hybrid   vs cloud (pt)")
        for t in grid:
            acc, off = _hybrid(conf, float(t), edge_ok, cloud_ok)
            mark = " <- goal" if acc >= target and off <= 0.20 else ""
            print(f"  {t:9.3f}  {off:7.3f}  {acc:.4f}  {100 * (acc - cloud_acc):+6.2f}{mark}")
        # thresholds chosen on calibration data, evaluated on validation data
        ts = np.unique(calib_measures[name])
        best_20 = max((t for t in ts if (calib_measures[name] < t).mean() <= 0.20), default=0.0)
        acc, off = _hybrid(conf, float(best_20), edge_ok, cloud_ok)
        print(
            f"  chosen on calib for <= 20 % offload: t={best_20:.3f} -> val offload {off:.3f}, "
            f"hybrid {acc:.4f} ({100 * (acc - cloud_acc):+.2f} pt vs cloud)"
        )
        c_target = float(calib_cloud_ok.mean()) - 0.003
        within = [
            t
            for t in ts
            if _hybrid(calib_measures[name], float(t), calib_edge_ok, calib_cloud_ok)[0] >= c_target
        ]
        if within:
            t = float(min(within))
            acc, off = _hybrid(conf, t, edge_ok, cloud_ok)
            print(
                f"  chosen on calib for <= 0.3 pt loss: t={t:.3f} -> val offload {off:.3f}, "
                f"hybrid {acc:.4f} ({100 * (acc - cloud_acc):+.2f} pt vs cloud)"
            )
    met = any(
        _hybrid(conf, float(t), edge_ok, cloud_ok)[0] >= target
        and _hybrid(conf, float(t), edge_ok, cloud_ok)[1] <= 0.20
        for conf in measures.values()
        for t in np.unique(conf)
    )
    print(
        f"\ngoal (hybrid >= {target:.4f} with <= 20 % offloaded) reachable at any threshold: "
        f"{'yes' if met else 'NO'}"
    )

    t = args.threshold
    if t is None:
        t = 0.75
    acc_sweep, off_sweep = _hybrid(measures[args.measure], t, edge_ok, cloud_ok)
    acc, off, per_req, reasons = _end_to_end(t, args.measure)
    print(
        f"\nend to end ({args.measure} >= {t}): HybridClient + real V2 server over HTTP: "
        f"hybrid {acc:.4f}, offload {off:.3f}, {per_req * 1e3:.2f} ms/request; reasons {reasons}"
    )
    print(
        f"in-process sweep at the same threshold: hybrid {acc_sweep:.4f}, offload {off_sweep:.3f}"
    )
    if abs(acc - acc_sweep) > 1e-9 or abs(off - off_sweep) > 1e-9:
        print("MISMATCH between end-to-end and in-process figures", file=sys.stderr)
        return 1
    if not args.no_tune:  # calibration and tuned thresholds, digits and the harder pair
        from benchmarks import calibration

        print("\n# calibration and thresholds from targets (benchmarks/calibration.py)")
        calibration.main(["--quick"] if args.quick else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
