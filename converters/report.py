"""The summary table printed at the end of ``edgecloud convert``."""

from __future__ import annotations

from typing import Any

from converters.results import ConversionReport

__all__ = ["render_table"]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render_table(report: ConversionReport) -> Any:
    """A rich Table: variant, precision, size, ratio, metric, agreement, latency, verdict."""
    from rich.table import Table

    t = Table(title=f"edgecloud convert: {report.source} (tolerance {report.tolerance:g} %)")
    for col in (
        "variant",
        "precision",
        "size",
        "vs fp32",
        "metric",
        "top-1 agree",
        "b1 ms",
        "b1 speedup",
        "int8 share",
        "b32 ms",
        "b32 speedup",
        "verdict",
    ):
        t.add_column(col, justify="left" if col in ("variant", "verdict", "metric") else "right")
    for v in report.variants:
        m = v.metrics
        if v.gate is not None:
            metric = f"{v.gate.metric} {v.gate.value:.4f} (-{max(v.gate.drop_pct, 0):.2f} %)"
        elif m is not None and m.accuracy is not None:
            metric = f"accuracy {m.accuracy:.4f}"
        else:
            metric = "-"
        agree = "-" if m is None or m.top1_agreement is None else f"{100 * m.top1_agreement:.2f} %"
        verdict = {
            "reference": "reference",
            "accepted": "[green]accepted[/green]",
            "rejected": "[red]REFUSED[/red]",
            "kept-rejected": "[red]refused (kept)[/red]",
            "failed": "[red]FAILED[/red]",
            "dropped": "[yellow]dropped (no gain)[/yellow]",
        }[v.verdict]
        if v.warnings:
            verdict += f" [yellow]({len(v.warnings)} warning{'s' * (len(v.warnings) > 1)})[/yellow]"
        t.add_row(
            v.name,
            v.precision,
            f"{v.size:,}",
            f"{100 * v.size_ratio:.1f} %",
            metric,
            agree,
            _ms(v.latency_ms_b1),
            _x(v.speedup_b1)
            + (
                f" ({v.speedup_b1_range[0]:.2f}-{v.speedup_b1_range[1]:.2f})"
                if v.speedup_b1_range
                else ""
            ),
            "-" if v.quantized_fraction is None else f"{100 * v.quantized_fraction:.0f} %",
            _ms(v.latency_ms_b32),
            _x(v.speedup_b32),
            verdict,
        )
    return t
