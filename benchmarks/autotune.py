"""Accuracy-aware INT8 search vs the default setting, measured in the same run.

``python -m benchmarks.autotune [--quick] [--threads 1]``

For each scenario the baseline is one default conversion (the family's default setting,
quantized and scored by the same gate); then ``autotune`` runs with a tolerance the default
fails (80 % of the best full-INT8 setting's loss, measured first in this run, so the search
must keep nodes in float) or, in the "default passes" scenario, a tolerance the default meets.
Reported: trials, search wall time and its ratio to one default conversion, the chosen
variant's loss and latency against the default's and FP32's, and (for static QDQ) the cost of
the same trials without calibration reuse.

Latency is the median of bounded runs at batch 32 with ``intra_op_num_threads`` fixed; on a
shared 2-core VM these small models' sub-millisecond timings are noisy (a few percent). Every
search is bounded by its budget. ``--quick`` (used by a test) runs the encoder scenario only.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "samples" / "models"
DATA = ROOT / "samples" / "data"


@dataclass
class Scenario:
    name: str
    model: Path
    data: str  # samples/data/<data>_{calib,val}.npz, or "synthetic224" (random images)
    task: str
    int8: str
    tight: bool  # tolerance below the best full-INT8 loss (exclusions needed)
    latency_batch: int = 32
    budget: str = "30,120s"
    max_isolated: int = 64

    def calib(self) -> Any:
        return _synthetic(32, 1) if self.data == "synthetic224" else DATA / f"{self.data}_calib.npz"

    def val(self) -> Any:
        return _synthetic(16, 2) if self.data == "synthetic224" else DATA / f"{self.data}_val.npz"

    def val_inputs(self, n: int) -> Any:
        import numpy as np

        if self.data == "synthetic224":
            return _synthetic(n, 2).inputs["input"]
        return np.ascontiguousarray(np.load(DATA / f"{self.data}_val.npz")["input"][:n])


def _synthetic(n: int, seed: int) -> Any:
    """Standard-normal 3x224x224 "images" for the random-weight ResNet (no labels)."""
    import numpy as np

    from converters.data import Dataset

    rng = np.random.default_rng(seed)
    return Dataset(
        {"input": rng.standard_normal((n, 3, 224, 224), dtype=np.float32)},
        None,
        f"synthetic normal 3x224x224 (seed {seed})",
    )


def _resnet_scenario(work: Path) -> Scenario:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_bench_build_resnet18", ROOT / "samples" / "build_resnet18.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError("samples/build_resnet18.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    path = Path(mod.build_resnet18(work / "resnet18.onnx", seed=0))
    return Scenario(
        "ResNet-18 224 static, default fails (rel. L2)",
        path,
        "synthetic224",
        "regression",
        "auto",
        True,
        latency_batch=1,
        budget="12,600s",
        max_isolated=12,
    )


SCENARIOS = [
    Scenario(
        "encoder, default fails (rel. L2)",
        MODELS / "digits_encoder.onnx",
        "edge",
        "regression",
        "auto",
        True,
    ),
    Scenario(
        "encoder, default passes (accuracy)",
        MODELS / "digits_encoder.onnx",
        "edge",
        "classification",
        "auto",
        False,
    ),
    Scenario(
        "CNN static, default fails (rel. L2)",
        MODELS / "digits_cloud.onnx",
        "cloud",
        "regression",
        "auto",
        True,
    ),
    Scenario(
        "MLP dynamic, default fails (rel. L2)",
        MODELS / "digits_edge.onnx",
        "edge",
        "regression",
        "dynamic",
        True,
    ),
]


def _default_conversion(sc: Scenario, work: Path, threads: int) -> dict[str, Any]:
    """One conversion with the family's default, timed like a search trial (fresh calibration)."""
    from converters.autotune import prepare
    from converters.search_space import candidates

    t0 = time.perf_counter()  # a whole conversion: checks, pre-processing, reference, default
    ctx = prepare(
        sc.model,
        sc.calib(),
        sc.val(),
        work_dir=work,
        task=sc.task,
        int8=sc.int8,  # type: ignore[arg-type]
        threads=threads,
        latency_batch=sc.latency_batch,
    )
    cands = candidates(ctx.profile, ctx.families)
    path = ctx.quantizer.quantize(cands[0], work / "default.onnx")
    ev = ctx.evaluator.evaluate(path)
    seconds = time.perf_counter() - t0
    losses = [ev.loss_pct]
    for i, c in enumerate(cands[1:], 1):  # the best full-INT8 loss sets the tight tolerance
        losses.append(
            ctx.evaluator.evaluate(
                ctx.quantizer.quantize(c, work / f"full-{i}.onnx"), latency=False
            ).loss_pct
        )
    return {
        "label": cands[0].label,
        "loss": ev.loss_pct,
        "metric": ev.gate.metric,
        "latency": ev.latency_ms,
        "fp32_latency": ctx.evaluator.reference_latency_ms,
        "seconds": seconds,
        "best_full_loss": min(losses),
        "path": path,
        "fp32": ctx.fp32,
    }


def _interleaved_latency(paths: list[Path], sc: Scenario, threads: int, rounds: int) -> list[float]:
    """Median latency (ms) per model at the scenario's batch, in interleaved rounds.

    Round r times every model before round r + 1, so a burst of someone else's work on the
    shared CPU hits all of them alike instead of one.
    """
    import statistics

    import onnxruntime as ort

    x = sc.val_inputs(sc.latency_batch)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in paths]
    for s in sessions:
        s.run(None, {"input": x})
    per: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            times = []
            for _ in range(5 if sc.latency_batch > 1 else 2):
                t0 = time.perf_counter()
                s.run(None, {"input": x})
                times.append(time.perf_counter() - t0)
            per[i].append(min(times))
    return [1000 * statistics.median(t) for t in per]


def _no_reuse_seconds(sc: Scenario, result: Any, work: Path, threads: int) -> float | None:
    """The static trials of ``result`` again, each calibrating from scratch."""
    from converters.autotune import prepare
    from converters.quantize import StaticInt8Settings
    from converters.search_space import Candidate

    static = [t for t in result.trials if t.family == "static"]
    if len(static) < 2:
        return None
    ctx = prepare(
        sc.model,
        sc.calib(),
        sc.val(),
        work_dir=work,
        task=sc.task,
        int8="static",
        threads=threads,
        latency_batch=sc.latency_batch,
    )
    t0 = time.perf_counter()
    for i, t in enumerate(static):
        s = dict(t.settings)
        s.pop("family")
        settings = StaticInt8Settings(
            calib_method=s["calib_method"],
            per_channel=s["per_channel"],
            activation_type=s["activation_type"],
            weight_type=s["weight_type"],
            reduce_range=s["reduce_range"],
            exclude_nodes=tuple(s["exclude_nodes"]),
            activation_symmetric=bool(s.get("activation_symmetric")),
        )
        for f in ctx.quantizer.cache_dir.glob("*.json"):
            f.unlink()
        ctx.quantizer.quantize(Candidate("static", settings, t.label), work / f"nr-{i}.onnx")
        ctx.evaluator.evaluate(work / f"nr-{i}.onnx")
    return time.perf_counter() - t0


def run(quick: bool, threads: int, resnet: bool = False) -> list[dict[str, Any]]:
    from converters.autotune import autotune

    rows = []
    scenarios = SCENARIOS[:1] if quick else list(SCENARIOS)
    build = tempfile.TemporaryDirectory(prefix="bench-autotune-r18-")
    if resnet:
        scenarios.append(_resnet_scenario(Path(build.name)))
    with tempfile.TemporaryDirectory(prefix="bench-autotune-warm-") as tmp:
        # imports and first-session costs are paid here, not by the first scenario's baseline
        _default_conversion(SCENARIOS[-1], Path(tmp), threads)
    for sc in scenarios:
        with tempfile.TemporaryDirectory(prefix="bench-autotune-") as tmp:
            work = Path(tmp)
            base = _default_conversion(sc, work / "default", threads)
            tolerance = 0.8 * base["best_full_loss"] if sc.tight else 1.0
            t0 = time.perf_counter()
            result = autotune(
                sc.model,
                sc.calib(),
                sc.val(),
                tolerance=tolerance,
                task=sc.task,
                int8=sc.int8,  # type: ignore[arg-type]
                budget=sc.budget,
                threads=threads,
                check=False,
                work_dir=work / "search",
                latency_batch=sc.latency_batch,
                max_isolated=sc.max_isolated,
            )
            wall = time.perf_counter() - t0
            static_trials = sum(t.family == "static" for t in result.trials)
            no_reuse = None
            if not quick and static_trials >= 2:
                no_reuse = _no_reuse_seconds(sc, result, work / "noreuse", threads)
            with_reuse = sum(t.seconds for t in result.trials if t.family == "static")
            ch = result.chosen
            if ch is not None and ch.path is not None:
                fp32_ms, default_ms, chosen_ms = _interleaved_latency(
                    [base["fp32"], base["path"], ch.path],
                    sc,
                    threads,
                    5 if quick or sc.latency_batch == 1 else 30,
                )
                base["fp32_latency"], base["latency"] = fp32_ms, default_ms
                ch = replace(ch, latency_ms=chosen_ms)
            rows.append(
                {
                    "scenario": sc.name,
                    "default": base,
                    "tolerance": tolerance,
                    "trials": len(result.trials),
                    "passed": result.passed,
                    "wall": wall,
                    "chosen": None
                    if ch is None
                    else {
                        "label": ch.label,
                        "float_nodes": len(ch.excluded),
                        "loss": ch.loss_pct,
                        "latency": ch.latency_ms,
                    },
                    "calibrations": result.calibrations,
                    "static_trials": static_trials,
                    "static_seconds_reuse": with_reuse,
                    "static_seconds_no_reuse": no_reuse,
                    "latency_batch": sc.latency_batch,
                }
            )
    build.cleanup()
    return rows


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def report(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [
        f"machine: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, onnxruntime threads={threads}, "
        f"date {time.strftime('%Y-%m-%d', time.gmtime())}",
        "",
        "| scenario | metric | tolerance % | default: setting, loss % | trials | search s "
        "(x one default conversion; per trial) | chosen: setting, float nodes, loss % | latency ms "
        "FP32 / default / chosen | chosen vs default latency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, c = r["default"], r["chosen"]
        ratio = r["wall"] / d["seconds"] if d["seconds"] else None
        lat_ratio = (c["latency"] / d["latency"]) if c and c["latency"] and d["latency"] else None
        batch = "" if r["latency_batch"] == 32 else f" [batch {r['latency_batch']}]"
        lines.append(
            f"| {r['scenario']}{batch} | {d['metric']} | {r['tolerance']:.3f} | {d['label']}, "
            f"{d['loss']:.3f} ({'pass' if d['loss'] <= r['tolerance'] else 'fail'}) | "
            f"{r['trials']} | {r['wall']:.2f} (x{_f(ratio, '.1f')}; "
            f"x{_f(ratio / r['trials'] if ratio else None, '.2f')}) | "
            + (f"{c['label']}, {c['float_nodes']}, {c['loss']:.3f}" if c else "none passed")
            + f" | {_f(d['fp32_latency'])} / {_f(d['latency'])} / {_f(c and c['latency'])} | "
            f"x{_f(lat_ratio, '.2f')} |"
        )
    reuse = [r for r in rows if r["static_seconds_no_reuse"]]
    if reuse:
        lines += [
            "",
            "| scenario | static trials | calibration runs | static trial time with "
            "reuse s | without reuse s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r in reuse:
            lines.append(
                f"| {r['scenario']} | {r['static_trials']} | {r['calibrations']} | "
                f"{r['static_seconds_reuse']:.2f} | {r['static_seconds_no_reuse']:.2f} | "
                f"x{r['static_seconds_no_reuse'] / max(r['static_seconds_reuse'], 1e-9):.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="encoder scenario only (for tests)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument(
        "--resnet",
        action="store_true",
        help="add a ResNet-18 at 224x224 (random weights, synthetic data; minutes)",
    )
    args = ap.parse_args(argv)
    rows = run(args.quick, args.threads, args.resnet)
    print(report(rows, args.threads))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
