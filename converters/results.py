"""What a conversion reports: a ``VariantReport`` per variant, a ``ConversionReport`` per run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from converters.validate import ComparisonMetrics, GateResult
from edgecloud.package import Manifest

if TYPE_CHECKING:
    from converters.search_result import SearchResult

__all__ = ["ConversionReport", "VariantReport", "Verdict"]

Verdict = Literal["reference", "accepted", "rejected", "kept-rejected", "failed", "dropped"]


@dataclass
class VariantReport:
    """One row of the summary: what was built, how it compared, and what happened to it."""

    name: str
    precision: str
    format: str
    file: str
    size: int = 0
    size_ratio: float = 1.0
    metrics: ComparisonMetrics | None = None
    gate: GateResult | None = None
    latency_ms_b1: float | None = None
    latency_ms_b32: float | None = None
    speedup_b1: float | None = None
    speedup_b32: float | None = None
    warnings: list[str] = field(default_factory=list)
    verdict: Verdict = "accepted"
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: share of the weights of compute ops (Conv, MatMul, Gemm, LSTM, ...) stored as int8
    quantized_fraction: float | None = None
    #: min..max of the per-round batch-1 speedups (interleaved timing)
    speedup_b1_range: tuple[float, float] | None = None
    #: why a variant was not written ("failed": an error, "dropped": no gain)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized_fraction": self.quantized_fraction,
            "speedup_b1_range": self.speedup_b1_range,
            "error": self.error,
            "name": self.name,
            "precision": self.precision,
            "format": self.format,
            "file": self.file,
            "size": self.size,
            "size_ratio": self.size_ratio,
            "metrics": self.metrics.to_dict() if self.metrics else None,
            "gate": self.gate.to_dict() if self.gate else None,
            "latency_ms_b1": self.latency_ms_b1,
            "latency_ms_b32": self.latency_ms_b32,
            "speedup_b1": self.speedup_b1,
            "speedup_b32": self.speedup_b32,
            "warnings": list(self.warnings),
            "verdict": self.verdict,
            "settings": self.settings,
            "extra": self.extra,
        }

    def manifest_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.metrics.to_dict() if self.metrics else {})
        out.update(
            {
                k: v
                for k, v in {
                    "latency_ms_b1": self.latency_ms_b1,
                    "latency_ms_b32": self.latency_ms_b32,
                    "speedup_b1": self.speedup_b1,
                    "speedup_b32": self.speedup_b32,
                    "speedup_b1_range": (
                        list(self.speedup_b1_range) if self.speedup_b1_range else None
                    ),
                    "size_ratio": self.size_ratio,
                    "quantized_fraction": self.quantized_fraction,
                }.items()
                if v is not None
            }
        )
        if self.gate is not None:
            out["gate"] = self.gate.to_dict()
        return out

    @property
    def written(self) -> bool:
        return self.verdict in ("reference", "accepted", "kept-rejected")


@dataclass
class ConversionReport:
    """What ``convert`` did; ``ok`` is False when a variant was refused by the gate."""

    source: str
    package: str | None
    task: str
    tolerance: float
    variants: list[VariantReport]
    manifest: Manifest | None = None
    warnings: list[str] = field(default_factory=list)
    #: variant name -> the accuracy search run for it (``--int8 auto`` or after a gate failure)
    searches: dict[str, SearchResult] = field(default_factory=dict)
    #: the task and output roles inferred, with the reasons
    roles: dict[str, Any] = field(default_factory=dict)
    #: device kind -> {"variant": name, "why": reason}: what a device would load automatically
    device_choice: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(v.verdict not in ("rejected", "failed") for v in self.variants)

    @property
    def rejected(self) -> list[VariantReport]:
        return [v for v in self.variants if v.verdict in ("rejected", "kept-rejected")]

    def variant(self, name: str) -> VariantReport:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        from converters.drift_reference import reference_summary

        return {
            "ok": self.ok,
            "source": self.source,
            "package": self.package,
            "task": self.task,
            "tolerance_pct": self.tolerance,
            "variants": [v.to_dict() for v in self.variants],
            "warnings": list(self.warnings),
            "manifest": self.manifest.to_dict() if self.manifest else None,
            "searches": {name: r.to_dict() for name, r in self.searches.items()},
            "roles": self.roles,
            "device_choice": self.device_choice,
            "drift_reference": reference_summary(self.manifest.routing if self.manifest else {}),
            "seconds": self.seconds,
        }
