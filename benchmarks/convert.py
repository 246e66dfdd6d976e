"""Converter variants side by side: FP32 vs FP16 vs INT8 (static QDQ U8S8 / S8S8, dynamic).

``python -m benchmarks.convert [--quick] [--threads 1,2] [--models edge,cloud,resnet]``

For each model (the sample edge MLP and cloud CNN, and a ResNet-18-shaped graph at 224x224 with
random weights from samples/build_resnet18.py) the variants are made with the converter's own
functions and measured in the same run against the FP32 variant (pre-processed the same way):
file size, accuracy on the held-out split (agreement with FP32 for the random ResNet), and median
latency at batch 1 and 32, as ratios to FP32 with the same ``intra_op_num_threads``.

Timing on a shared 2-core VM is noisy, so variants are measured in interleaved rounds (round r
times every variant once before round r+1) and the median over rounds is reported: a burst of
someone else's work then hits all variants alike instead of one. Every measurement is bounded by
a time budget. ``--quick`` (used by a test) runs the sample models only, with few rounds.

Goal on this CPU (AVX-512 VNNI): static INT8 >= 3x faster than FP32 on the ResNet at batch 1.

The accuracy search (``--search``, on by default, also with ``--quick``): ``convert`` itself on
the sample encoder, three ways in the same run: ``--int8 dynamic`` with the default settings
(the baseline, whose loss sets the tolerance: 80 % of it, so the default fails), the same with
search-on-failure, and ``--int8 auto``. Reported: trials, convert wall time against the
baseline conversion, the variant's gate metric, and its latency at batch 32 against FP32 and the
default variant (interleaved rounds). Without ``--quick`` the search-vs-default table of
``benchmarks.autotune`` follows (its scenarios, the same figures).

The model zoo (``--zoo [--zoo-only NAME,...] [--zoo-full]``): each model of
``samples/build_zoo.py`` converted with the defaults a user would type
(``--fp16 --int8 auto --calib C --val V``); per model the wall time, the task inferred, the
variant a CPU device would load, its gate metric and its batch-1 speedup over FP32 (median of
interleaved rounds, with the interquartile range), and every INT8 verdict. Needs the ``zoo``
extra. Small input sizes unless ``--zoo-full``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Row:
    model: str
    variant: str
    path: Path
    size: int = 0
    quality: float | None = None
    quality_kind: str = ""
    rel_l2: float | None = None
    lat: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (threads, batch)
    note: str = ""


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    reps = int(np.ceil(batch / x.shape[0]))
    return {"input": np.ascontiguousarray(np.concatenate([x] * reps)[:batch])}


def _interleaved(
    rows: list[Row],
    x: np.ndarray,
    threads: int,
    batch: int,
    rounds: int,
    budget_s: float,
    skip: Callable[[Row], bool],
) -> None:
    active = [r for r in rows if not skip(r)]
    sessions = {r.variant: _session(r.path, threads) for r in active}
    feed = _feed(x, batch)
    for r in active:
        sessions[r.variant].run(None, feed)  # warm-up
        r.lat[(threads, batch)] = []
    deadline = time.perf_counter() + budget_s
    for i in range(rounds):
        for r in active:
            t0 = time.perf_counter()
            sessions[r.variant].run(None, feed)
            r.lat[(threads, batch)].append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() > deadline:
            break


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    sess = _session(path, 2)
    return np.concatenate([sess.run(None, {"input": x[i : i + 8]})[0] for i in range(0, len(x), 8)])


def _quality(out: np.ndarray, labels: np.ndarray | None, ref: np.ndarray) -> tuple[float, float]:
    """(accuracy with labels, else top-1 agreement with FP32; relative L2 error vs FP32)."""
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    if labels is not None:
        return float((out.argmax(1) == labels).mean()), rel
    return float((out.argmax(1) == ref.argmax(1)).mean()), rel


def _build_variants(
    model: str, src: Path, work: Path, calib: np.ndarray, resnet: bool
) -> list[Row]:
    from converters.data import ArrayCalibrationReader, Dataset
    from converters.model import preprocess, slim_variant
    from converters.quantize import (
        DynamicInt8Settings,
        StaticInt8Settings,
        convert_fp16,
        quantize_dynamic_int8,
        quantize_static_int8,
    )

    d = work / model
    d.mkdir()
    fp32 = preprocess(src, d / "fp32.onnx")
    reader = ArrayCalibrationReader(Dataset({"input": calib}, None, "calib"), batch_size=8)
    made: list[tuple[str, Path, str]] = [("fp32", fp32, "")]
    made.append(("fp16", convert_fp16(fp32, d / "fp16.onnx"), "meant for GPUs"))
    made.append(
        (
            "int8 static u8s8 pc",
            quantize_static_int8(fp32, d / "u8s8.onnx", reader, StaticInt8Settings()).path,
            "default",
        )
    )
    made.append(
        (
            "int8 static s8s8 pc",
            quantize_static_int8(
                fp32, d / "s8s8.onnx", reader, StaticInt8Settings(activation_type="int8")
            ).path,
            "",
        )
    )
    if resnet:
        made.append(
            (
                "int8 static u8s8 pt",
                quantize_static_int8(
                    fp32, d / "u8s8pt.onnx", reader, StaticInt8Settings(per_channel=False)
                ).path,
                "per-tensor",
            )
        )
    made.append(
        ("int8 dynamic", quantize_dynamic_int8(fp32, d / "dyn.onnx", DynamicInt8Settings()), "")
    )
    rows = []
    for name, path, note in made:
        slim_variant(path)
        rows.append(Row(model, name, path, path.stat().st_size, note=note))
    return rows


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _zoo(args: argparse.Namespace) -> int:
    """Convert every zoo model with the defaults; one line per model."""
    import importlib.util

    from converters import ConvertOptions, convert

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("build_zoo", ROOT / "samples/build_zoo.py")
    assert spec is not None
    assert spec.loader is not None
    zoo = importlib.util.module_from_spec(spec)
    sys.modules["build_zoo"] = zoo
    spec.loader.exec_module(zoo)
    names = args.zoo_only.split(",") if args.zoo_only else list(zoo.ALL)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, onnxruntime "
        f"{__import__('onnxruntime').__version__}; load average {os.getloadavg()[0]:.1f} "
        "(a shared machine: ratios are from interleaved rounds)"
    )
    header = (
        f"{'model':<16} {'task':<15} {'convert s':>9}  {'CPU loads':<12} {'metric':<22} "
        f"{'b1 speedup (IQR)':<20} int8 verdicts"
    )
    print(header)
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as tmp:
        for name in names:
            zm = zoo.build(name, Path(tmp) / "zoo", small=not args.zoo_full)
            t0 = time.perf_counter()
            report = convert(
                zm.model,
                Path(tmp) / "pkg" / name,
                ConvertOptions(fp16=True, int8=("auto",), calib=zm.calib, val=zm.val),
            )
            secs = time.perf_counter() - t0
            cpu = report.device_choice["cpu"]["variant"]
            v = report.variant(cpu)
            metric = "-"
            if v.gate is not None:
                metric = f"{v.gate.metric} {v.gate.value:.4f}"
            speed = "-"
            if v.speedup_b1 is not None:
                lo, hi = v.speedup_b1_range or (v.speedup_b1, v.speedup_b1)
                speed = f"{v.speedup_b1:.2f}x ({lo:.2f}-{hi:.2f})"
            int8 = ", ".join(
                f"{r.name}={r.verdict}"
                + (f" ({r.gate.metric} {r.gate.value:.3f})" if r.gate else "")
                for r in report.variants
                if r.precision == "int8"
            )
            print(
                f"{name:<16} {report.task:<15} {secs:>9.1f}  {cpu:<12} {metric:<22} "
                f"{speed:<20} {int8}",
                flush=True,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.convert", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="sample models only, few rounds")
    ap.add_argument("--threads", default="1,2", help="intra_op_num_threads values (default 1,2)")
    ap.add_argument(
        "--models",
        default="edge,cloud,resnet",
        help="which of edge,cloud,resnet (default all; --quick: edge,cloud)",
    )
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--no-search", dest="search", action="store_false", help="skip the accuracy-search section"
    )
    ap.add_argument("--zoo", action="store_true", help="convert the model zoo with defaults")
    ap.add_argument("--zoo-only", help="NAME,NAME of samples/build_zoo.py (default all)")
    ap.add_argument("--zoo-full", action="store_true", help="full input sizes (slow)")
    args = ap.parse_args(argv)
    if args.zoo:
        return _zoo(args)
    threads = [int(t) for t in args.threads.split(",") if t]
    rounds_small = args.rounds or (10 if args.quick else 60)
    rounds_big = args.rounds or 12
    t_start = time.perf_counter()
    samples = ROOT / "samples"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, onnxruntime {__import__('onnxruntime').__version__}"
    )
    models: list[tuple[str, Path, np.ndarray, np.ndarray, np.ndarray | None, bool]] = []
    chosen = set(args.models.split(","))
    if args.quick:
        chosen -= {"resnet"}
    for role in ("edge", "cloud"):
        if role not in chosen:
            continue
        calib = np.load(samples / f"data/{role}_calib.npz")["input"]
        val = np.load(samples / f"data/{role}_val.npz")
        models.append(
            (
                f"digits_{role}",
                samples / f"models/digits_{role}.onnx",
                calib,
                val["input"],
                val["labels"],
                False,
            )
        )
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        if "resnet" in chosen:
            from samples.build_resnet18 import build_resnet18, make_inputs

            src = ROOT / "build/resnet18_random.onnx"
            if not src.exists():
                build_resnet18(src, seed=0)
            models.append(
                (
                    "resnet18_224",
                    src,
                    make_inputs(32, seed=11),
                    make_inputs(32, seed=12),
                    None,
                    True,
                )
            )
        all_rows: list[Row] = []
        for name, src, calib, val_x, labels, big in models:
            print(f"\n## {name}: building variants ...", flush=True)
            t0 = time.perf_counter()
            rows = _build_variants(name, src, work, calib, big)
            print(f"   built in {time.perf_counter() - t0:.1f} s", flush=True)
            ref = _outputs(rows[0].path, val_x)
            for r in rows:
                r.quality, r.rel_l2 = _quality(_outputs(r.path, val_x), labels, ref)
                r.quality_kind = "accuracy" if labels is not None else "top1 agreement"
            one = val_x[:1]
            for t in threads:
                _interleaved(
                    rows,
                    one,
                    t,
                    1,
                    rounds_big if big else rounds_small,
                    60.0 if big else 10.0,
                    skip=lambda r: False,
                )
                fp32_b1 = statistics.median(rows[0].lat[(t, 1)])

                def too_slow(r: Row, t: int = t, fp32_b1: float = fp32_b1, big: bool = big) -> bool:
                    # ConvInteger at batch 32 would take minutes; batch 1 already tells the story
                    return big and statistics.median(r.lat[(t, 1)]) > 3 * fp32_b1

                _interleaved(
                    rows,
                    val_x[:32],
                    t,
                    32,
                    max(3, (rounds_big if big else rounds_small) // 3),
                    90.0 if big else 10.0,
                    skip=too_slow,
                )
            _print(rows, threads)
            all_rows += rows
        if args.search:
            _search_section(work / "search", threads[0], rounds_small)
    if args.search and not args.quick:
        from benchmarks import autotune as bench_autotune

        print("\n## accuracy search vs the default setting (benchmarks.autotune)", flush=True)
        print(bench_autotune.report(bench_autotune.run(False, threads[0]), threads[0]))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


def _search_section(work: Path, threads: int, rounds: int) -> None:
    """``convert`` on the encoder: default dynamic INT8 vs search-on-failure vs ``--int8 auto``."""
    from converters import ConvertOptions, convert

    samples = ROOT / "samples"
    model = samples / "models/digits_encoder.onnx"
    common: dict[str, Any] = dict(
        calib=samples / "data/edge_calib.npz",
        val=samples / "data/edge_val.npz",
        task="regression",
        latency_runs=5,
        threads=threads,
    )
    print("\n## digits_encoder: edgecloud convert with the accuracy search", flush=True)
    convert(model, work / "warm", ConvertOptions(**common))  # imports, first sessions
    runs: list[tuple[str, Any, float]] = []
    t0 = time.perf_counter()
    base = convert(
        model,
        work / "default",
        ConvertOptions(int8=("dynamic",), tolerance=100.0, search_on_failure=False, **common),
    )
    runs.append(("--int8 dynamic (default settings)", base, time.perf_counter() - t0))
    default = base.variant("int8_dynamic")
    assert default.gate is not None
    tolerance = 0.8 * default.gate.drop_pct
    for label, int8 in (("--int8 dynamic, search on failure", "dynamic"), ("--int8 auto", "auto")):
        t0 = time.perf_counter()
        rep = convert(
            model, work / int8, ConvertOptions(int8=(int8,), tolerance=tolerance, **common)
        )  # type: ignore[arg-type]
        runs.append((label, rep, time.perf_counter() - t0))
    # one interleaved latency measurement of every variant, so the ratios share the CPU's noise
    rows = [Row("fp32", "fp32", work / "default/fp32.onnx")]
    for label, rep, _ in runs:
        v = rep.variants[1]
        rows.append(Row(v.name, label, Path(rep.package or "") / v.file))
    x = np.load(samples / "data/edge_val.npz")["input"][:32]
    _interleaved(rows, x, threads, 32, rounds, 20.0, skip=lambda r: False)
    med = {r.variant: statistics.median(r.lat[(threads, 32)]) for r in rows}
    fp32_ms = med["fp32"]
    default_ms = med[runs[0][0]]
    print(
        f"tolerance {tolerance:.3f} % rel. L2 (80 % of the default's loss), threads={threads}, "
        f"batch 32, FP32 {fp32_ms:.3f} ms"
    )
    print(
        "| convert | trials | wall s | x default convert | rel. L2 % | verdict | b32 ms | "
        "x FP32 | x default variant |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rep, wall in runs:
        v = rep.variants[1]
        found = rep.searches.get(v.name)
        ms = med[label]
        print(
            f"| {label} | {len(found.trials) if found else 1} | {wall:.2f} | "
            f"x{wall / runs[0][2]:.1f} | {v.gate.drop_pct if v.gate else float('nan'):.3f} | "
            f"{v.verdict} | {ms:.3f} | {fp32_ms / ms:.2f}x | {default_ms / ms:.2f}x |"
        )
    sys.stdout.flush()


def _print(rows: list[Row], threads: list[int]) -> None:
    base = rows[0]
    head = (
        f"| {'model':<13} | {'variant':<20} | {'size MB':>8} | {'vs fp32':>7} | "
        f"{'quality':>16} | {'rel L2':>7} |"
    )
    for t in threads:
        head += f" b1 ms t{t} | b1 x t{t} | b32 ms t{t} | b32 x t{t} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        line = (
            f"| {r.model:<13} | {r.variant:<20} | {r.size / 1e6:>8.3f} | "
            f"{r.size / base.size:>7.2f} | {r.quality_kind[:8]} {_fmt(r.quality, '.4f'):>7} | "
            f"{_fmt(r.rel_l2, '.4f'):>7} |"
        )
        for t in threads:
            for b in (1, 32):
                lat = r.lat.get((t, b))
                ref = base.lat.get((t, b))
                med = statistics.median(lat) if lat else None
                speed = statistics.median(ref) / med if (lat and ref and med) else None
                width = len(f"b{b} ms t{t}")
                sw = len(f"b{b} x t{t}") - 1
                line += f" {_fmt(med, '.3f'):>{width}} | {_fmt(speed):>{sw}}x |"
        print(line + (f" {r.note}" if r.note else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
