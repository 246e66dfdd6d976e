"""Accuracy-aware INT8 (``edgecloud convert --int8 auto``): the fastest variant within tolerance.

Default post-training quantization is a gamble: most models lose nothing, some lose everything
(a published ResNet-50 fell from 70 % to 0.1 % top-1 under one setting). Intel Neural
Compressor's answer is accuracy-aware tuning; this module does the same inside the converter,
with the converter's own validation gate as the judge, so it is on by default and cheap:

1. **Settings** (``converters.search_space``): the family's default first, then the other
   full-INT8 settings (per-channel or not, minmax/percentile/entropy calibration, symmetric
   activations) in order of expected speed. It stops at the first variant that passes unless
   ``exhaustive``. Calibration runs once per method and is reused (``search_runner``).
2. **Exclusions**, when no setting passes: the best setting's nodes are ranked by sensitivity
   (``converters.sensitivity``: the output error when only that node is quantized, SQNR for
   QDQ), and the top k are kept in float. k doubles (1, 2, 4, ...) until a variant passes, then
   bisects down to the smallest k that passes: about 2 log2(N) trials for N nodes.
3. **Choice**: the fastest passing trial; trials within 5 % of the fastest count as ties (the
   timing noise of a shared CPU), broken by fewer float nodes, then by trial order.

Every trial (settings, metric, loss, latency, size) goes into ``SearchResult``, its JSON
report and its rich table. The search stops at ``Budget`` (trials or seconds); if nothing
passed, ``SearchResult.raise_for_status()`` raises ValidationError with the best trial's numbers
and the nodes that hurt most.

The tolerance is the gate's: relative, in percent of the original's metric (docs/autotune.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from converters.data import ArrayCalibrationReader, Dataset, load_dataset
from converters.model import inspect_model, preprocess
from converters.progress import NullReporter, Reporter
from converters.search_runner import Evaluation, TrialEvaluator, TrialQuantizer, dump_json
from converters.search_space import (
    Budget,
    Candidate,
    Family,
    candidates,
    fragile_nodes,
    model_profile,
)
from converters.search_space import parse_budget as parse_budget
from converters.sensitivity import SensitivityReport, measure_sensitivity
from converters.validate import Task
from edgecloud.errors import ConfigError, ConversionError, EdgeCloudError, ValidationError

__all__ = [
    "SearchContext",
    "SearchResult",
    "Trial",
    "add_search_arguments",
    "autotune",
    "parse_budget",
    "prepare",
    "register_inspect_quant",
    "run_inspect_quant",
    "run_search_for_convert",
]

Int8Mode = Literal["auto", "static", "dynamic"]
#: latencies within this fraction of the fastest are ties (noise on a shared CPU)
TIE_FRACTION = 0.05
_TASK_ALIASES = {
    "classification": "classification",
    "classifier": "classification",
    "embedding": "embedding",
    "embeddings": "embedding",
    "feature-extraction": "embedding",
    "sentence-similarity": "embedding",
    "regression": "regression",
    "detection": "detection",
    "object-detection": "detection",
    "segmentation": "regression",
}


@dataclass(frozen=True)
class Trial:
    """One quantized variant and the gate's figures for it."""

    index: int
    label: str
    phase: Literal["settings", "exclusion"]
    family: Family
    settings: dict[str, Any]
    excluded: tuple[str, ...]
    passed: bool
    metric: str
    reference: float
    value: float
    loss_pct: float
    rel_l2: float
    cosine: float
    latency_ms: float | None
    speedup: float | None
    size: int
    seconds: float
    reason: str = ""
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "phase": self.phase,
            "family": self.family,
            "settings": self.settings,
            "excluded_nodes": list(self.excluded),
            "passed": self.passed,
            "metric": self.metric,
            "reference": self.reference,
            "value": self.value,
            "loss_pct": self.loss_pct,
            "rel_l2": self.rel_l2,
            "cosine": self.cosine,
            "latency_ms": self.latency_ms,
            "speedup_vs_fp32": self.speedup,
            "size_bytes": self.size,
            "seconds": self.seconds,
            "reason": self.reason,
        }


@dataclass
class SearchResult:
    """The whole search: every trial, the chosen one (``None`` if none passed), and why."""

    model: str
    task: str
    tolerance_pct: float
    budget: str
    profile: str
    families: tuple[Family, ...]
    reference_latency_ms: float | None
    reference_size: int
    trials: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    sensitivity: SensitivityReport | None = None
    calibrations: int = 0
    seconds: float = 0.0
    output: Path | None = None
    stopped_by_budget: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    @property
    def best(self) -> Trial | None:
        """The chosen trial, or the lowest-loss one when none passed."""
        if self.chosen is not None:
            return self.chosen
        return min(self.trials, key=lambda t: t.loss_pct, default=None)

    def failure_message(self) -> str:
        best = self.best
        parts = [
            f"no INT8 variant of {Path(self.model).name} met the {self.tolerance_pct:g} % "
            f"tolerance in {len(self.trials)} trial(s) ({self.seconds:.1f} s"
            + (", budget exhausted" if self.stopped_by_budget else "")
            + ")"
        ]
        if best is not None:
            parts.append(
                f"best: '{best.label}' {best.metric} {best.value:.4f} vs original "
                f"{best.reference:.4f}, loss {best.loss_pct:.2f} %"
                + (f", {len(best.excluded)} node(s) in float" if best.excluded else "")
            )
        if self.sensitivity is not None and self.sensitivity.nodes:
            worst = ", ".join(
                f"{n.name} ({n.op_type}"
                + (f", rel.L2 {n.isolated_error:.4f}" if n.isolated_error is not None else "")
                + (f", {n.sqnr_db:.1f} dB" if n.sqnr_db is not None else "")
                + ")"
                for n in self.sensitivity.worst(5)
            )
            parts.append(f"layers that hurt most: {worst}")
        parts.append(
            "raise --tolerance, give a larger --search-budget, or ship the FP16/FP32 variant"
        )
        return "; ".join(parts)

    def raise_for_status(self) -> SearchResult:
        """Raise ValidationError (with the best numbers and worst layers) if nothing passed."""
        if not self.passed:
            raise ValidationError(self.failure_message())
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "passed": self.passed,
            "task": self.task,
            "metric": self.trials[0].metric if self.trials else None,
            "tolerance_pct": self.tolerance_pct,
            "budget": self.budget,
            "stopped_by_budget": self.stopped_by_budget,
            "profile": self.profile,
            "families": list(self.families),
            "reference": {
                "latency_ms": self.reference_latency_ms,
                "size_bytes": self.reference_size,
            },
            "chosen": None if self.chosen is None else self.chosen.index,
            "output": None if self.output is None else str(self.output),
            "calibrations": self.calibrations,
            "seconds": self.seconds,
            "trials": [t.to_dict() for t in self.trials],
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
            "message": "" if self.passed else self.failure_message(),
            "warnings": list(self.warnings),
        }

    def write_json(self, path: Path) -> Path:
        dump_json(self.to_dict(), Path(path))
        return Path(path)

    def table(self) -> Any:
        from rich.table import Table

        metric = self.trials[0].metric if self.trials else "metric"
        t = Table(
            title=(
                f"INT8 search for {Path(self.model).name}: tolerance {self.tolerance_pct:g} %, "
                f"{len(self.trials)} trials in {self.seconds:.1f} s"
            ),
            caption=(
                f"FP32 latency {_ms(self.reference_latency_ms)} ms; * = chosen; "
                f"{self.calibrations} calibration run(s) shared by all static trials"
            ),
        )
        for col, just in (
            ("#", "right"),
            ("settings", "left"),
            ("float nodes", "right"),
            (metric, "right"),
            ("loss %", "right"),
            ("pass", "center"),
            ("latency ms", "right"),
            ("x FP32", "right"),
            ("size KB", "right"),
            ("s", "right"),
        ):
            t.add_column(col, justify=just)  # type: ignore[arg-type]
        for tr in self.trials:
            mark = "*" if self.chosen is not None and tr.index == self.chosen.index else ""
            t.add_row(
                f"{mark}{tr.index}",
                tr.label,
                str(len(tr.excluded)),
                f"{tr.value:.4f}",
                f"{tr.loss_pct:.2f}",
                "yes" if tr.passed else "no",
                _ms(tr.latency_ms),
                "-" if tr.speedup is None else f"{tr.speedup:.2f}",
                f"{tr.size / 1024:.1f}",
                f"{tr.seconds:.2f}",
            )
        return t


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


@dataclass
class SearchContext:
    """What every trial shares: the pre-processed FP32 model, data, quantizer and evaluator."""

    source: Path
    fp32: Path
    task: Task
    profile: Literal["conv", "matmul"]
    families: tuple[Family, ...]
    quantizer: TrialQuantizer
    evaluator: TrialEvaluator
    work_dir: Path


def _model_task(path: Path) -> str | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for p in model.metadata_props:
        if p.key == "task":
            return str(p.value)
    return None


def resolve_task(task: str | None, model_path: Path) -> Task:
    """The gate's task: the argument, else the model's ``task`` metadata, else classification."""
    raw = task if task is not None else (_model_task(model_path) or "classification")
    key = _TASK_ALIASES.get(raw.lower())
    if key is None:
        raise ConfigError(
            f"task {raw!r} is not known; use classification, embedding, regression or detection "
            f"(or one of {sorted(_TASK_ALIASES)})"
        )
    return key  # type: ignore[return-value]


def prepare(
    model_path: Path,
    calib: Path | Dataset,
    val: Path | Dataset,
    *,
    work_dir: Path,
    task: str | None = None,
    tolerance_pct: float = 1.0,
    int8: Int8Mode = "auto",
    preprocessed: bool = False,
    score_output: str | None = None,
    threads: int = 1,
    calib_batch_size: int = 16,
    latency_batch: int = 32,
    gated: tuple[str, ...] = (),
    roles: dict[str, str] | None = None,
) -> SearchContext:
    """Check the model and data, pre-process, run the FP32 reference once."""
    model_path = Path(model_path)
    if int8 not in ("auto", "static", "dynamic"):
        raise ConfigError(f"--int8 {int8!r}: expected auto, static or dynamic")
    info = inspect_model(model_path, need_quant_opset=True)
    calib_ds = (
        calib
        if isinstance(calib, Dataset)
        else load_dataset(Path(calib), info.inputs, what="calibration data")
    )
    val_ds = (
        val
        if isinstance(val, Dataset)
        else load_dataset(Path(val), info.inputs, what="validation data")
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32 = model_path if preprocessed else preprocess(model_path, work_dir / "fp32.onnx")
    resolved = resolve_task(task, model_path)
    profile = model_profile(fp32)
    families: tuple[Family, ...]
    if int8 == "auto":
        families = ("static",) if profile == "conv" else ("dynamic", "static")
    else:
        families = (int8,)
    quantizer = TrialQuantizer(
        fp32, ArrayCalibrationReader(calib_ds, batch_size=calib_batch_size), work_dir / "calib"
    )
    evaluator = TrialEvaluator(
        fp32,
        val_ds,
        task=resolved,
        tolerance_pct=tolerance_pct,
        score_output=score_output,
        threads=threads,
        latency_batch=latency_batch,
        gated=gated,
        roles=roles,
    )
    return SearchContext(
        model_path, fp32, resolved, profile, families, quantizer, evaluator, work_dir
    )


class _Search:
    def __init__(
        self, ctx: SearchContext, budget: Budget, result: SearchResult, reporter: Reporter
    ) -> None:
        self.ctx = ctx
        self.budget = budget
        self.result = result
        self.reporter = reporter
        self.started = time.monotonic()

    def exhausted(self) -> bool:
        if not self.result.trials:
            return False  # the default setting is always tried, however small the budget
        if self.budget.exhausted(len(self.result.trials), self.started):
            self.result.stopped_by_budget = True
            return True
        return False

    def estimate(self, trial_s: float) -> str:
        """After the first trial: how long the search may take, from its cost and the budget."""
        n = len(candidates(self.ctx.profile, self.ctx.families))
        worst = trial_s * (self.budget.trials or n)
        if self.budget.seconds is not None:
            worst = min(worst, self.budget.seconds)
        return (
            f"INT8 search: {trial_s:.1f} s per trial; at most {self.budget.describe()}, "
            f"so at most about {worst:.0f} s (less when the first settings pass)"
        )

    def run(self, cand: Candidate, phase: Literal["settings", "exclusion"]) -> Trial:
        t0 = time.monotonic()
        index = len(self.result.trials) + 1
        path = self.ctx.work_dir / f"trial-{index:02d}.onnx"
        self.ctx.quantizer.quantize(cand, path)
        ev: Evaluation = self.ctx.evaluator.evaluate(path)
        ref_lat = self.ctx.evaluator.reference_latency_ms
        trial = Trial(
            index=index,
            label=cand.label,
            phase=phase,
            family=cand.family,
            settings=cand.describe(),
            excluded=tuple(cand.settings.exclude_nodes),
            passed=ev.gate.passed,
            metric=ev.gate.metric,
            reference=float(ev.gate.reference),
            value=float(ev.gate.value),
            loss_pct=ev.loss_pct,
            rel_l2=float(ev.metrics.rel_l2),
            cosine=float(ev.metrics.cosine),
            latency_ms=ev.latency_ms,
            speedup=(
                ev.speedup
                if ev.speedup is not None
                else (ref_lat / ev.latency_ms if ref_lat and ev.latency_ms else None)
            ),
            size=ev.size,
            seconds=time.monotonic() - t0,
            reason=ev.gate.reason,
            path=path,
        )
        self.result.trials.append(trial)
        if index == 1:
            self.reporter.note(self.estimate(trial.seconds))
        self.reporter.note(
            f"trial {index}: {cand.label}: {trial.metric} {trial.value:.4f} "
            f"(loss {trial.loss_pct:.2f} %) {'PASS' if trial.passed else 'fail'}, "
            f"{_ms(trial.latency_ms)} ms"
        )
        return trial


def _choose(trials: list[Trial]) -> Trial | None:
    """The fastest passing trial: by speedup over FP32 where every passing trial has one (those
    come from rounds interleaved with FP32, robust to load), else by latency."""
    passing = [t for t in trials if t.passed]
    if not passing:
        return None
    if all(t.speedup is not None for t in passing):
        best = max(t.speedup or 0.0 for t in passing)
        ties = [t for t in passing if (t.speedup or 0.0) >= best / (1 + TIE_FRACTION)]
        return min(ties, key=lambda t: (len(t.excluded), t.index))
    timed = [t for t in passing if t.latency_ms is not None]
    if not timed:
        return min(passing, key=lambda t: (len(t.excluded), t.index))
    fastest = min(t.latency_ms for t in timed if t.latency_ms is not None)
    ties = [
        t
        for t in timed
        if t.latency_ms is not None and t.latency_ms <= fastest * (1 + TIE_FRACTION)
    ]
    return min(ties, key=lambda t: (len(t.excluded), t.index))


def autotune(
    model_path: Path,
    calib: Path | Dataset,
    val: Path | Dataset,
    *,
    tolerance: float = 1.0,
    budget: Budget | str | int = 20,
    int8: Int8Mode = "auto",
    task: str | None = None,
    output: Path | None = None,
    report: Path | None = None,
    work_dir: Path | None = None,
    exhaustive: bool = False,
    preprocessed: bool = False,
    score_output: str | None = None,
    threads: int = 1,
    latency_batch: int = 32,
    max_isolated: int = 64,
    check: bool = True,
    emit_best: bool = False,
    reporter: Reporter | None = None,
    gated: tuple[str, ...] = (),
    roles: dict[str, str] | None = None,
    calib_batch_size: int = 16,
) -> SearchResult:
    """Find the fastest INT8 variant of ``model_path`` whose loss is within ``tolerance`` %.

    ``calib``/``val``: paths (``.npz``/``.npy``/folder, as ``edgecloud convert`` takes) or
    loaded ``Dataset``s. ``int8``: ``auto`` (family by model profile) or restrict the search to
    ``static``/``dynamic`` (what ``convert`` passes when its first attempt failed the gate).
    ``preprocessed``: ``model_path`` is already the converter's pre-processed FP32 graph.
    The chosen variant is copied to ``output``; the JSON report is written to ``report`` (also
    when nothing passed). ``check``: raise ValidationError when nothing passed.
    ``latency_batch``: the batch size latency is measured at (32; 1 for large models).
    ``emit_best``: when nothing passed, still copy the lowest-loss trial to ``output`` (for a
    converter that reports it as refused, or keeps it marked rejected).
    """
    reporter = reporter or NullReporter()
    if isinstance(budget, int):
        budget = Budget(trials=budget)
    elif isinstance(budget, str):
        budget = parse_budget(budget)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgecloud-autotune-") as tmp:
        wd = Path(work_dir) if work_dir is not None else Path(tmp)
        ctx = prepare(
            model_path,
            calib,
            val,
            work_dir=wd,
            task=task,
            tolerance_pct=tolerance,
            int8=int8,
            preprocessed=preprocessed,
            score_output=score_output,
            threads=threads,
            latency_batch=latency_batch,
            gated=gated,
            roles=roles,
            calib_batch_size=calib_batch_size,
        )
        result = SearchResult(
            model=str(model_path),
            task=ctx.task,
            tolerance_pct=float(tolerance),
            budget=budget.describe(),
            profile=ctx.profile,
            families=ctx.families,
            reference_latency_ms=ctx.evaluator.reference_latency_ms,
            reference_size=ctx.evaluator.reference_size,
        )
        search = _Search(ctx, budget, result, reporter)
        search.started = started
        try:
            _search(search, exhaustive=exhaustive, max_isolated=max_isolated)
        except EdgeCloudError:
            raise
        except Exception as exc:  # a foreign error mid-search: say which trial it hit
            raise ConversionError(
                f"INT8 search failed at trial {len(result.trials) + 1}: "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc
        result.chosen = _choose(result.trials)
        result.warnings += _warnings(result)
        result.calibrations = ctx.quantizer.calibrations
        result.seconds = time.monotonic() - started
        emit = result.chosen if result.chosen is not None else (result.best if emit_best else None)
        if emit is not None and output is not None and emit.path is not None:
            output = Path(output)
            output.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(emit.path, output)
            result.output = output
        if work_dir is None:  # trial files vanish with the temp dir
            result.trials = [_without_path(t) for t in result.trials]
            if result.chosen is not None:
                result.chosen = result.trials[result.chosen.index - 1]
    if report is not None:
        result.write_json(Path(report))
    if check:
        result.raise_for_status()
    return result


#: a chosen variant slower than this fraction of FP32's speed brings no gain worth INT8's risk
NO_GAIN_SPEEDUP = 1.05


def _warnings(result: SearchResult) -> list[str]:
    ch = result.chosen
    if ch is None or ch.speedup is None or ch.speedup >= NO_GAIN_SPEEDUP:
        return []
    why = f" with {len(ch.excluded)} node(s) kept in float" if ch.excluded else ""
    return [
        f"the chosen INT8 variant '{ch.label}'{why} is no faster than FP32 "
        f"(x{ch.speedup:.2f} at the measured batch); ship FP32/FP16 or loosen --tolerance "
        "unless the smaller file matters"
    ]


def _without_path(t: Trial) -> Trial:
    return replace(t, path=None)


def _search(s: _Search, *, exhaustive: bool, max_isolated: int) -> None:
    ctx = s.ctx
    full = candidates(ctx.profile, ctx.families)
    # The objective is the fastest passing variant, not the first: once one passes, each other
    # family's default is still tried (dynamic and static INT8 differ most in speed), the
    # remaining variations of a family that passed are not (they trade speed for accuracy).
    passed_families: set[str] = set()
    # total unknown: a pass ends the settings phase early, so "n/N" would claim trials not run
    with s.reporter.stage(f"INT8 settings (up to {len(full)})", total=None) as advance:
        for cand in full:
            if s.exhausted():
                return
            if not exhaustive and passed_families:
                tried = {t.family for t in s.result.trials}
                if cand.family in passed_families or cand.family in tried:
                    continue
            trial = s.run(cand, "settings")
            advance(1)
            if trial.passed:
                passed_families.add(trial.family)
    if passed_families and not exhaustive:
        return
    if any(t.passed for t in s.result.trials) or s.exhausted():
        return
    # No full-INT8 setting passes: keep the most sensitive nodes of the best one in float.
    best = min(s.result.trials, key=lambda t: t.loss_pct)
    base = full[best.index - 1]
    deadline = None if s.budget.seconds is None else s.started + s.budget.seconds
    sens = measure_sensitivity(
        ctx.quantizer,
        ctx.evaluator,
        base,
        ctx.work_dir / "sensitivity",
        full_variant=best.path,
        full_loss_pct=best.loss_pct,
        max_isolated=max_isolated,
        deadline=deadline,
        reporter=s.reporter,
    )
    sens.model = str(ctx.source)
    s.result.sensitivity = sens
    ranked = sens.ranked_names()
    if ctx.profile == "matmul":
        # transformers: the attention and FFN-output MatMuls go first, then the ranking's order
        fragile = [n for n in fragile_nodes(ctx.fp32) if n in set(ranked)]
        ranked = fragile + [n for n in ranked if n not in set(fragile)]
    lo, hi, k = 0, None, 1  # lo: largest k known to fail; hi: smallest k known to pass
    with s.reporter.stage("keeping sensitive nodes in float", total=None) as advance:
        while ranked and not s.exhausted():
            trial = s.run(base.with_exclusions(tuple(ranked[:k])), "exclusion")
            advance(1)
            if trial.passed:
                hi = k
            else:
                lo = k
            if hi is None:
                if k >= len(ranked):
                    return  # even with every quantizable node in float it fails
                k = min(2 * k, len(ranked))
            elif hi - lo <= 1:
                return
            else:
                k = (lo + hi) // 2


# ----------------------------------------------------------------------------- CLI helpers


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``edgecloud convert`` needs for ``--int8 auto`` (and search-on-failure)."""
    parser.add_argument(
        "--search-budget",
        default="20",
        metavar="N|SECONDS",
        help="stop the INT8 search after N trials (20), a time (120s, 2m) or both (20,120s)",
    )
    parser.add_argument(
        "--search-exhaustive",
        action="store_true",
        help="keep trying settings after the first passing one and keep the fastest",
    )
    parser.add_argument(
        "--search-report",
        type=Path,
        default=None,
        metavar="JSON",
        help="write every trial of the INT8 search to this JSON file",
    )


def register_inspect_quant(
    subparsers: Any, *, name: str = "inspect-quant", prog: str | None = None
) -> argparse.ArgumentParser:
    """Add ``inspect-quant`` to ``subparsers``.

    ``edgecloud convert inspect-quant`` registers it as the hidden command ``name`` =
    ``convert-inspect-quant`` (``convert``'s positional MODEL rules out nested subcommands) with
    ``prog`` set so usage and errors still read ``edgecloud convert inspect-quant``.
    """
    extra: dict[str, Any] = {} if prog is None else {"prog": prog}
    p = subparsers.add_parser(
        name,
        **extra,
        help="rank a model's nodes by INT8 quantization sensitivity",
        description="Quantize each node alone and measure SQNR per node against FP32, sorted "
        "most sensitive first, to see which layers an INT8 variant should keep in float.",
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx")
    p.add_argument("--calib", type=Path, required=True, help="calibration data (.npz/.npy/dir)")
    p.add_argument("--val", type=Path, required=True, help="validation data (.npz/.npy/dir)")
    p.add_argument("--int8", choices=["auto", "static", "dynamic"], default="auto")
    p.add_argument("--task", default=None, help="classification|embedding|regression")
    p.add_argument("--tolerance", type=float, default=1.0, help="percent, for the loss column")
    p.add_argument("--max-nodes", type=int, default=64, help="cap on single-node quantizations")
    p.add_argument("--no-isolated", action="store_true", help="SQNR only (static QDQ)")
    p.add_argument("--limit", type=int, default=30, help="rows in the table")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=run_inspect_quant)
    return p  # type: ignore[no-any-return]


def run_inspect_quant(args: argparse.Namespace) -> int:
    import json
    import sys

    from rich.console import Console

    from converters.progress import RichReporter
    from converters.sensitivity import inspect_quant

    err = Console(stderr=True)
    reporter: Reporter = NullReporter() if args.json else RichReporter(err)
    report = inspect_quant(
        args.model,
        args.calib,
        args.val,
        family=args.int8,
        task=args.task,
        tolerance_pct=args.tolerance,
        isolated=not args.no_isolated,
        max_isolated=args.max_nodes,
        reporter=reporter,
    )
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    else:
        Console().print(report.table(limit=args.limit))
    return 0


def run_search_for_convert(
    args: argparse.Namespace,
    model_path: Path,
    calib: Path | Dataset,
    val: Path | Dataset,
    output: Path,
    *,
    int8: Int8Mode,
    tolerance: float,
    task: str | None = None,
    preprocessed: bool = False,
    reporter: Reporter | None = None,
) -> SearchResult:
    """What ``edgecloud convert`` calls for ``--int8 auto`` or after static/dynamic failed.

    Uses ``--search-budget``/``--search-exhaustive``/``--search-report`` from ``args``; prints
    the trial table on stderr unless the reporter is silent; raises ValidationError (after the
    report is written) when nothing passes.
    """
    result = autotune(
        model_path,
        calib,
        val,
        tolerance=tolerance,
        budget=getattr(args, "search_budget", "20"),
        int8=int8,
        task=task,
        output=output,
        report=getattr(args, "search_report", None),
        exhaustive=bool(getattr(args, "search_exhaustive", False)),
        preprocessed=preprocessed,
        check=False,
        reporter=reporter,
    )
    if reporter is not None and not isinstance(reporter, NullReporter):
        from rich.console import Console

        Console(stderr=True).print(result.table())
    for w in result.warnings:
        (reporter or NullReporter()).note(f"[yellow]warning[/yellow]: {w}")
    return result.raise_for_status()


def _run_search_cli(args: argparse.Namespace) -> int:
    import json
    import sys

    from rich.console import Console

    from converters.progress import RichReporter

    reporter: Reporter = NullReporter() if args.json else RichReporter(Console(stderr=True))
    result = autotune(
        args.model,
        args.calib,
        args.val,
        tolerance=args.tolerance,
        budget=args.search_budget,
        int8=args.int8,
        task=args.task,
        output=args.out,
        report=args.search_report,
        exhaustive=args.search_exhaustive,
        threads=args.threads,
        check=False,
        reporter=reporter,
    )
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    else:
        out = Console() if Console().is_terminal else Console(width=180)
        out.print(result.table())
        if result.sensitivity is not None:
            out.print(result.sensitivity.table(limit=10))
        for w in result.warnings:
            out.print(f"[yellow]warning[/yellow]: {w}")
        if result.passed:
            index = result.chosen.index if result.chosen else "-"
            out.print(f"chosen: trial {index} -> {args.out}")
        else:
            out.print(f"[red]refused[/red]: {result.failure_message()}")
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m converters.autotune search|inspect-quant ...`` until ``edgecloud convert``
    carries ``--int8 auto`` and ``inspect-quant`` itself (docs/autotune.md, "Wiring")."""
    import sys

    from edgecloud.errors import MissingDependencyError

    parser = argparse.ArgumentParser(prog="python -m converters.autotune")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="find the fastest INT8 variant within the tolerance")
    s.add_argument("model", type=Path, metavar="MODEL.onnx")
    s.add_argument("--calib", type=Path, required=True)
    s.add_argument("--val", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True, help="where the chosen variant goes")
    s.add_argument("--int8", choices=["auto", "static", "dynamic"], default="auto")
    s.add_argument("--task", default=None, help="classification|embedding|regression")
    s.add_argument("--tolerance", type=float, default=1.0, help="percent, relative")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--json", action="store_true")
    add_search_arguments(s)
    s.set_defaults(func=_run_search_cli)
    register_inspect_quant(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeCloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, MissingDependencyError):
            return 3
        return 1 if isinstance(exc, ConversionError) else 2  # 2: bad input or usage


if __name__ == "__main__":
    raise SystemExit(main())
