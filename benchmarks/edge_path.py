"""Edge path cost: ``HybridClient.infer`` on a confident input vs raw ``InferenceSession.run``.

Same model (the digits edge MLP), same input, same session options (1 intra-op thread, all graph
optimisations), batch 1. Calls alternate raw / client one by one so that CPU frequency, caches and
other processes on the machine affect both alike; each call is timed alone with
``perf_counter_ns``. Prints median and p99 of both, the ratio and the added microseconds, then a
breakdown of the client's overhead by stage (validation, confidence, routing and result) so the
figure can be explained. Goal: <= 1.05x and <= 30 us added at batch 1.

    python -m benchmarks.edge_path [--quick] [--iterations N] [--model edge|cloud]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


MODELS = {
    # name: (ONNX file, input shape, validation data)
    "edge": ("digits_edge.onnx", ("batch", 64), "edge_val.npz"),
    "cloud": ("digits_cloud.onnx", ("batch", 1, 8, 8), "cloud_val.npz"),
}


def _build_package(tmp: Path, model: str = "edge") -> tuple[Path, Path]:
    from edgecloud.package import (
        Manifest,
        TensorSpec,
        Variant,
        generate_keypair,
        load_private_key,
        write_package,
    )

    onnx_file, shape, _ = MODELS[model]
    priv, pub = generate_keypair(tmp / "bench.key")
    manifest = Manifest(
        name=f"digits_{model}",
        version="1",
        inputs=(TensorSpec("input", "float32", shape),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),),
        confidence="logits",
        labels=tuple(str(i) for i in range(10)),
    )
    out = tmp / "pkg"
    write_package(
        out,
        manifest,
        {"model.onnx": SAMPLES / "models" / onnx_file},
        signing_key=load_private_key(priv),
    )
    return out, pub


def _pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def _time_one(fn: Callable[[], object], n: int) -> float:
    """Median per-call microseconds of ``fn`` over ``n`` calls (for the breakdown)."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return statistics.median(samples) / 1000.0


def _locked(client: object) -> None:
    with client._lock:  # type: ignore[attr-defined]
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.edge_path", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 iterations instead of 50,000")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="edge",
        help="edge: the digits MLP (default); cloud: the larger digits CNN",
    )
    args = parser.parse_args(argv)
    n = args.iterations or (2000 if args.quick else 50000)

    import onnxruntime as ort

    from edgecloud.client import HybridClient

    data = np.load(SAMPLES / "data" / MODELS[args.model][2])["input"]
    with tempfile.TemporaryDirectory() as d:
        pkg, pub = _build_package(Path(d), args.model)
        client = HybridClient(pkg, public_key=pub, threads=1, threshold=0.5, probe_interval=None)
        backend = client.backend
        assert backend is not None
        # the most confident validation sample: the client answers it locally
        conf = np.array(
            [r.confidence for r in client.infer_batch({"input": data})], dtype=np.float64
        )
        x = np.ascontiguousarray(data[int(np.argmax(conf)) : int(np.argmax(conf)) + 1])
        feed = {"input": x}
        r = client.infer(feed)
        assert (r.source, r.reason) == ("edge", "confident"), (r.source, r.reason)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(
            str(pkg / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        names = ["logits"]
        np.testing.assert_allclose(sess.run(names, feed)[0], r.outputs["logits"], rtol=1e-6)

        raw_run = sess.run
        infer = client.infer
        for _ in range(min(2000, n)):  # warm-up both
            raw_run(names, feed)
            infer(feed)
        clock = time.perf_counter_ns
        raw: list[int] = []
        hyb: list[int] = []
        gc.disable()
        t_start = time.monotonic()
        try:
            for _ in range(n):
                t0 = clock()
                raw_run(names, feed)
                t1 = clock()
                infer(feed)
                t2 = clock()
                raw.append(t1 - t0)
                hyb.append(t2 - t1)
        finally:
            gc.enable()
        wall = time.monotonic() - t_start

        raw_med, hyb_med = statistics.median(raw) / 1000, statistics.median(hyb) / 1000
        raw_p99, hyb_p99 = _pct(raw, 0.99), _pct(hyb, 0.99)
        what = "digits MLP" if args.model == "edge" else "digits CNN"
        print(f"edge path, batch 1, {what}, {n} interleaved iterations ({wall:.1f} s)")
        print(f"{'':24s}{'median us':>12s}{'p99 us':>12s}")
        print(f"{'raw session.run':24s}{raw_med:12.2f}{raw_p99:12.2f}")
        print(f"{'HybridClient.infer':24s}{hyb_med:12.2f}{hyb_p99:12.2f}")
        print(
            f"ratio median {hyb_med / raw_med:.3f}x, p99 {hyb_p99 / raw_p99:.3f}x; "
            f"added median {hyb_med - raw_med:.2f} us, p99 {hyb_p99 - raw_p99:.2f} us"
        )
        goal_ratio = hyb_med / raw_med <= 1.05
        goal_added = hyb_med - raw_med <= 30.0
        print(
            f"goal <= 1.05x: {'met' if goal_ratio else 'NOT met'}; "
            f"goal <= 30 us added: {'met' if goal_added else 'NOT met'}"
        )

        # Where the added time goes (medians of each stage alone).
        m = 5000 if not args.quick else 1000
        slot = client._slot
        assert slot is not None
        assert slot.confidence is not None
        validated = backend.validate(feed)
        outputs = backend.run_validated(validated)
        policy = slot.confidence
        from edgecloud.client import HybridResult
        from edgecloud.routing.modes import Reason
        from edgecloud.runtime.base import InputPolicy

        check = backend._checks[0]
        lax = check.__class__(backend.input_specs[0], InputPolicy(nonfinite="allow"))
        stages = {
            "validate inputs": lambda: backend.validate(feed),
            "  of which NaN/Inf check": lambda: check._finite(x),
            "  (validate, nonfinite=allow)": lambda: {"input": lax.check(x)},
            "backend run (validated)": lambda: backend.run_validated(validated),
            "raw session.run (again)": lambda: raw_run(names, feed),
            "confidence (max softmax)": lambda: policy.lowest(outputs),
            "capacity acquire+release": lambda: (
                client.capacity.try_acquire(),
                client.capacity.release(),
            ),
            "in-flight count (2 locks)": lambda: (_locked(client), _locked(client)),
            "HybridResult()": lambda: HybridResult(outputs, "edge", Reason.CONFIDENT, 0.9),
            "HybridClient.infer (again)": lambda: infer(feed),
            "empty call (loop cost)": lambda: None,
        }
        print("breakdown (median us per stage, measured alone):")
        for name, fn in stages.items():
            print(f"  {name:28s}{_time_one(fn, m):8.2f}")
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
