"""Where INT8 time goes on CNNs: MobileNetV3-Small, MobileNetV2 and ResNet-50 at 224x224.

``python -m benchmarks.int8_cnn [--quick] [--models mobilenet_v3,mobilenet_v2,resnet50]``

Issue #14 asks for static INT8 >= 2.5x faster than FP32 at batch 1 on the CNNs. ResNet-50 gets
there; MobileNet-class models do not. This benchmark shows why, with figures a reader can
reproduce: each model (torchvision, random init with BatchNorm statistics re-estimated and a
fitted head, built the way ``samples/build_zoo.py`` builds its CNNs) is converted with
``edgecloud convert --int8 static`` defaults (U8S8 QDQ, per-channel), then:

- batch-1 latency of FP32 vs INT8 in interleaved rounds (median over rounds, both with the same
  ``intra_op_num_threads``: 1 and 2), as the ratio FP32 / INT8;
- onnxruntime's own profile of both sessions, summed per operator type (the convolutions are
  ``Conv`` in FP32, after the NCHWc layout pass, and ``QLinearConv`` in INT8), so the share of
  the time each kind of operator takes, and the cost of the float islands (QuantizeLinear /
  DequantizeLinear pairs around HardSigmoid/HardSwish and the squeeze-excite ReduceMean), are
  visible;
- the same INT8 model with its stem convolution (3 input channels: an im2col of depth 27, which
  integer GEMM kernels run poorly) kept in float, the first thing one would try.

Every figure is a ratio measured in the same run; ``--quick`` runs MobileNetV3 only with fewer
rounds. Needs the ``zoo`` extra (torchvision).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("mobilenet_v3", "mobilenet_v2", "resnet50")


def _build(name: str, work: Path) -> Path:
    """Full-size (224x224) model ``name`` under ``work``; returns its folder."""
    from samples import build_zoo as zoo

    sizes = zoo.Sizes.pick(small=False)
    if name == "mobilenet_v2":  # not in the zoo (the zoo's MobileNet is V3); same recipe
        from torchvision.models import mobilenet_v2

        zoo.build_cnn(
            name, lambda: mobilenet_v2(weights=None), lambda m: m.classifier[-1], work, sizes
        )
    else:
        zoo.BUILDERS[name](work, sizes)
    return work / name


def _session(path: Path, threads: int, profile: bool = False) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(path.with_suffix("")) + f"-t{threads}"
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _interleaved(
    paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int
) -> dict[str, float]:
    """Median batch-1 ms per variant; each round times every variant (10 runs) once."""
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    feed = {"input": x}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(10):
                s.run(None, feed)
            times[k].append((time.perf_counter() - t0) * 100.0)
    return {k: statistics.median(v) for k, v in times.items()}


def _profile(path: Path, x: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    """Microseconds per run spent in each operator type (onnxruntime's own profiler)."""
    s = _session(path, threads, profile=True)
    for _ in range(10):
        s.run(None, {"input": x})
    for _ in range(runs):
        s.run(None, {"input": x})
    trace = Path(s.end_profiling())
    per: collections.Counter[str] = collections.Counter()
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"]
    trace.unlink()
    return {k: v / (runs + 10) for k, v in per.items()}


def _stem_float(model: Path, calib: Path, out: Path) -> Path | None:
    """The same static INT8 with the first Conv (and its activation) kept in float."""
    import onnx

    from converters import ConvertOptions, convert

    src = onnx.load(str(model), load_external_data=False)
    first = src.graph.node[0]
    if first.op_type != "Conv" or not first.name:
        return None
    convert(
        model,
        out,
        ConvertOptions(
            int8=("static",),
            calib=calib,
            exclude_nodes=(first.name,),
            force=True,
            keep_rejected=True,
            search_on_failure=False,
        ),
    )
    p = out / "int8_static.onnx"
    return p if p.is_file() else None


def run_model(name: str, work: Path, rounds: int, threads: list[int]) -> dict[str, Any]:
    from converters import ConvertOptions, convert

    d = _build(name, work)
    pkg = work / f"{name}-pkg"
    report = convert(
        d / "model.onnx",
        pkg,
        ConvertOptions(
            int8=("static",),
            calib=d / "calib.npz",
            val=d / "val.npz",
            force=True,
            keep_rejected=True,  # timed even when the gate or the speed check refuses it
            search_on_failure=False,  # every Conv in INT8: the speed question, not the search's
        ),
    )
    static = report.variant("int8_static")
    if not (pkg / "int8_static.onnx").is_file():
        raise SystemExit(f"{name}: no int8_static written: {static.verdict} {static.error}")
    paths = {"fp32": pkg / "fp32.onnx", "int8": pkg / "int8_static.onnx"}
    stem = _stem_float(d / "model.onnx", d / "calib.npz", work / f"{name}-stem")
    if stem is not None:
        paths["int8, stem float"] = stem
    x = np.load(d / "val.npz")["input"][:1].astype(np.float32)
    out: dict[str, Any] = {
        "model": name,
        "gate": f"{static.gate.metric} {static.gate.value:.4f}" if static.gate else "-",
        "verdict": f"{static.verdict}{': ' + static.error if static.error else ''}",
        "size": static.size / report.variant("fp32").size,
        "ms": {},
        "ops": {},
    }
    for t in threads:
        out["ms"][t] = _interleaved(paths, x, t, rounds)
    for k in ("fp32", "int8"):
        out["ops"][k] = _profile(paths[k], x, 1, 100 if rounds > 10 else 30)
    return out


def _print(r: dict[str, Any], threads: list[int]) -> None:
    print(
        f"\n## {r['model']} (224x224, batch 1): INT8 gate {r['gate']}, size {r['size']:.0%} of FP32"
    )
    print(f"  converter's verdict on int8_static: {r['verdict']}")
    for t in threads:
        ms = r["ms"][t]
        f = ms["fp32"]
        parts = [f"fp32 {f:.3f} ms"] + [
            f"{k} {v:.3f} ms ({f / v:.2f}x)" for k, v in ms.items() if k != "fp32"
        ]
        print(f"  threads={t}: " + ", ".join(parts))
    f32, i8 = r["ops"]["fp32"], r["ops"]["int8"]
    tf, ti = sum(f32.values()), sum(i8.values())
    print(f"  profile, 1 thread (profiler on): fp32 {tf:.0f} us, int8 {ti:.0f} us per run")
    conv_f = f32.get("Conv", 0.0)
    conv_i = i8.get("QLinearConv", 0.0) + i8.get("Conv", 0.0)
    print(
        f"  convolutions: fp32 Conv {conv_f:.0f} us vs int8 QLinearConv {conv_i:.0f} us "
        f"({conv_f / conv_i if conv_i else float('nan'):.2f}x)"
    )
    islands = sum(i8.get(k, 0.0) for k in ("QuantizeLinear", "DequantizeLinear"))
    print(
        f"  int8 float islands (QuantizeLinear + DequantizeLinear): {islands:.0f} us "
        f"({islands / ti:.0%})"
    )
    for label, ops, tot in (("fp32", f32, tf), ("int8", i8, ti)):
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
        print(f"  {label} top ops: " + ", ".join(f"{k} {v / tot:.0%}" for k, v in top))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.int8_cnn", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="MobileNetV3 only, few rounds")
    ap.add_argument("--models", help=f"NAME,NAME of {', '.join(MODELS)}")
    args = ap.parse_args(argv)
    names = (
        args.models.split(",")
        if args.models
        else (["mobilenet_v3"] if args.quick else list(MODELS))
    )
    bad = [n for n in names if n not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; known: {', '.join(MODELS)}")
    import onnxruntime as ort

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}; ratios from interleaved rounds"
    )
    threads = [1, 2]
    rounds = 8 if args.quick else 30
    with tempfile.TemporaryDirectory(prefix="bench-int8-cnn-") as tmp:
        for n in names:
            _print(run_model(n, Path(tmp), rounds, threads), threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
