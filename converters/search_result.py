"""The record of one accuracy search: every ``Trial`` and the ``SearchResult`` that holds them.

Kept apart from the search itself so that the conversion report (``converters.results``) can
carry search results without importing the search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from converters.search_runner import dump_json
from converters.search_space import Family
from converters.sensitivity import SensitivityReport
from edgecloud.errors import ValidationError

__all__ = ["SearchResult", "Trial"]


@dataclass(frozen=True)
class Trial:
    """One quantized variant and the gate's figures for it."""

    index: int
    label: str
    #: settings: full INT8; exclusion: top-k sensitive nodes in float; revert: a block re-quantized
    phase: Literal["settings", "exclusion", "revert"]
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
    #: settings not tried because a variant already judged them: (label, variant, passed)
    skipped: list[tuple[str, str, bool]] = field(default_factory=list)
    #: the variant whose (skipped) settings are the answer when no trial beat them
    reused: str | None = None

    @property
    def passed(self) -> bool:
        return self.chosen is not None or self.reused is not None

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
            "reused": self.reused,
            "output": None if self.output is None else str(self.output),
            "calibrations": self.calibrations,
            "seconds": self.seconds,
            "trials": [t.to_dict() for t in self.trials],
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
            "message": "" if self.passed else self.failure_message(),
            "warnings": list(self.warnings),
            "skipped": [
                {"label": label, "variant": variant, "passed": passed}
                for label, variant, passed in self.skipped
            ],
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
                + "".join(
                    f"; not tried again: {label} ({variant} ran it, "
                    f"{'passed' if passed else 'failed'})"
                    for label, variant, passed in self.skipped
                )
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
