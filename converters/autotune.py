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
   bisects down to the smallest k that passes: about 2 log2(N) trials for N nodes. On
   transformers the known-fragile nodes (attention score/context MatMuls, FFN output
   projections) go first. When the smallest passing k keeps most nodes in float, whole blocks
   (an attention or FFN block, from the node names) are re-quantized one at a time, least
   sensitive first, keeping each that still passes (greedy revert, as NNCF's accuracy control
   and INC's block-wise fallback do): a node the ranking placed wrongly costs one block.
3. **Choice**: the fastest passing trial; trials within 5 % of the fastest count as ties (the
   timing noise of a shared CPU), broken by fewer float nodes, then by trial order.

Every trial (settings, metric, loss, latency, size) goes into ``SearchResult``, its JSON
report and its rich table. The search stops at ``Budget`` (trials or seconds); if nothing
passed, ``SearchResult.raise_for_status()`` raises ValidationError with the best trial's numbers
and the nodes that hurt most.

The tolerance is the gate's: relative, in percent of the original's metric (docs/autotune.md).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from converters.data import Dataset
from converters.progress import NullReporter, Reporter
from converters.search_result import SearchResult, Trial
from converters.search_runner import Evaluation, Int8Mode, SearchContext, prepare
from converters.search_space import (
    Budget,
    Candidate,
    candidates,
    fragile_nodes,
)
from converters.search_space import parse_budget as parse_budget
from converters.sensitivity import measure_sensitivity
from edgecloud.errors import ConversionError, EdgeCloudError

__all__ = [
    "SearchContext",
    "SearchResult",
    "Trial",
    "autotune",
    "parse_budget",
    "prepare",
]

#: latencies within this fraction of the fastest are ties (noise on a shared CPU)
TIE_FRACTION = 0.05


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


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

    def run(self, cand: Candidate, phase: Literal["settings", "exclusion", "revert"]) -> Trial:
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
    prior: Sequence[tuple[dict[str, Any], bool, str]] = (),
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
    ``prior``: ``(settings, passed, variant)`` of settings a variant already quantized and
    judged (``Candidate.describe()`` form): the search does not try them again, and a passing
    one counts as a pass of its family (``SearchResult.skipped`` lists them).
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
            _search(search, exhaustive=exhaustive, max_isolated=max_isolated, prior=prior)
        except EdgeCloudError:
            raise
        except Exception as exc:  # a foreign error mid-search: say which trial it hit
            raise ConversionError(
                f"INT8 search failed at trial {len(result.trials) + 1}: "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc
        result.chosen = _choose(result.trials)
        if result.chosen is None:
            result.reused = next((v for _, v, passed in result.skipped if passed), None)
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


def _search(
    s: _Search,
    *,
    exhaustive: bool,
    max_isolated: int,
    prior: Sequence[tuple[dict[str, Any], bool, str]] = (),
) -> None:
    ctx = s.ctx
    full = candidates(ctx.profile, ctx.families)
    by_trial: dict[int, Candidate] = {}
    # The objective is the fastest passing variant, not the first: once one passes, each other
    # family's default is still tried (dynamic and static INT8 differ most in speed), the
    # remaining variations of a family that passed are not (they trade speed for accuracy).
    passed_families: set[str] = set()
    skipped_families: set[str] = set()
    # total unknown: a pass ends the settings phase early, so "n/N" would claim trials not run
    with s.reporter.stage(f"INT8 settings (up to {len(full)})", total=None) as advance:
        for cand in full:
            if s.exhausted():
                return
            if not exhaustive and passed_families:
                tried = {t.family for t in s.result.trials} | skipped_families
                if cand.family in passed_families or cand.family in tried:
                    continue
            known = next((p for p in prior if p[0] == cand.describe()), None)
            if known is not None:  # a variant already judged these settings: not again
                s.result.skipped.append((cand.label, known[2], known[1]))
                skipped_families.add(cand.family)
                s.reporter.note(f"skipping '{cand.label}': {known[2]} already ran it")
                if known[1]:
                    passed_families.add(cand.family)
                continue
            trial = s.run(cand, "settings")
            by_trial[trial.index] = cand
            advance(1)
            if trial.passed:
                passed_families.add(trial.family)
    if passed_families and not exhaustive:
        return
    if any(t.passed for t in s.result.trials) or not s.result.trials or s.exhausted():
        return
    # No full-INT8 setting passes: keep the most sensitive nodes of the best one in float.
    best = min(s.result.trials, key=lambda t: t.loss_pct)
    base = by_trial[best.index]
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
    hi = _bisect(s, base, ranked)
    if hi is not None and hi > REFINE_SHARE * len(ranked) and not s.exhausted():
        fragile_set = set(fragile_nodes(ctx.fp32)) if ctx.profile == "matmul" else set()
        _revert_blocks(s, base, ranked[:hi], fragile_set)


def _bisect(s: _Search, base: Candidate, ranked: list[str]) -> int | None:
    """The smallest k whose top-k ranked nodes in float pass (doubling, then bisection)."""
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
                    return None  # even with every quantizable node in float it fails
                k = min(2 * k, len(ranked))
            elif hi - lo <= 1:
                return hi
            else:
                k = (lo + hi) // 2
    return hi


#: a passing exclusion keeping more than this share of the ranked nodes in float brings little
#: INT8: it is refined block by block (``_revert_blocks``)
REFINE_SHARE = 0.5
_BLOCK = re.compile(r"^(.*?(?:layers?|blocks?|h)[._]?\d+[./][A-Za-z_]+)")


def block_of(node: str) -> str:
    """The attention or FFN block a node belongs to, from its name.

    ``/encoder/layer.0/attention/self/query/MatMul`` -> ``/encoder/layer.0/attention``,
    ``layer0.attn/QK`` -> ``layer0.attn``; other names: everything before the last ``/``.
    """
    m = _BLOCK.match(node)
    if m:
        return m.group(1)
    return node.rsplit("/", 1)[0] if "/" in node else node


def blocks(excluded: Sequence[str], fragile: set[str]) -> list[list[str]]:
    """``excluded`` (most sensitive first) grouped by block, least sensitive block first; the
    known-fragile nodes are left out (they stay in float)."""
    groups: dict[str, list[str]] = {}
    rank = {n: i for i, n in enumerate(excluded)}
    for n in excluded:
        if n not in fragile:
            groups.setdefault(block_of(n), []).append(n)
    return sorted(groups.values(), key=lambda g: -min(rank[n] for n in g))


def _revert_blocks(s: _Search, base: Candidate, excluded: list[str], fragile: set[str]) -> None:
    """Greedy revert by block (NNCF's accuracy control, INC's block-wise fallback): from a
    passing set of float nodes, re-quantize one whole attention/FFN block at a time, least
    sensitive first, and keep each revert that still passes. A single node ranked wrongly
    (114 of 115 MiniLM nodes in float still failing, issue 14) then costs one block, not the
    whole model. Known-fragile nodes (attention score/context MatMuls, FFN output projections)
    stay in float throughout."""
    keep = list(excluded)
    with s.reporter.stage("re-quantizing blocks (greedy revert)", total=None) as advance:
        for group in blocks(excluded, fragile):
            if s.exhausted():
                return
            trial = s.run(base.with_exclusions(tuple(n for n in keep if n not in group)), "revert")
            advance(1)
            if trial.passed:
                keep = [n for n in keep if n not in group]
