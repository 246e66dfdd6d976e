"""One builder per variant kind, the shape of Olive's passes: FP32 in, one judged variant out.

A builder reads the ``ConversionContext``, writes its file into the work folder and returns the
``VariantReport`` the gate made of it. ``build_all`` runs the builders the options ask for, in
a fixed order (fp16, int8_static, int8_dynamic, int8_auto), so that a search knows which
settings a variant already judged and does not try them again. One builder failing never loses
the others: its row says why, the rest are written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from converters.context import ConversionContext, PriorTrial
from converters.options import ConvertOptions
from converters.quantize import convert_fp16, quantize_dynamic_int8
from converters.results import VariantReport
from edgecloud.errors import ConfigError, EdgeCloudError

__all__ = [
    "AutoInt8Builder",
    "DynamicInt8Builder",
    "Fp16Builder",
    "StaticInt8Builder",
    "VariantBuilder",
    "build_all",
    "builders_for",
]

log = logging.getLogger(__name__)
Built = list[tuple[VariantReport, Path]]


class VariantBuilder:
    """Makes one variant of the FP32 graph; ``settings`` is what the report records."""

    name: ClassVar[str]
    precision: ClassVar[str]

    def settings(self, opts: ConvertOptions) -> dict[str, Any]:
        return {}

    def build(self, ctx: ConversionContext) -> tuple[VariantReport, Path]:
        raise NotImplementedError


class Fp16Builder(VariantBuilder):
    name = "fp16"
    precision = "fp16"

    def settings(self, opts: ConvertOptions) -> dict[str, Any]:
        return {"keep_io_types": True}

    def build(self, ctx: ConversionContext) -> tuple[VariantReport, Path]:
        path = ctx.work / f"{self.name}.onnx"
        with ctx.reporter.stage("converting to fp16", 1) as adv:
            convert_fp16(ctx.fp32, path)
            adv(1)
        return ctx.evaluate(self.name, path, self.settings(ctx.opts), precision="fp16"), path


class _FixedInt8Builder(VariantBuilder):
    """``--int8 static|dynamic``: one quantization with the options' settings; a variant that
    fails the gate starts a search of its family (unless ``--no-search``)."""

    precision = "int8"
    family: ClassVar[Literal["static", "dynamic"]]

    def quantize(self, ctx: ConversionContext, path: Path) -> tuple[dict[str, Any], list[str]]:
        raise NotImplementedError

    def build(self, ctx: ConversionContext) -> tuple[VariantReport, Path]:
        path = ctx.work / f"{self.name}.onnx"
        settings, warnings = self.quantize(ctx, path)
        report = ctx.evaluate(self.name, path, settings, precision="int8")
        report.warnings += warnings
        passed = report.gate is None or report.gate.passed
        # what later searches (``--int8 auto``) need not try again; its own search still starts
        # from these settings, so its exclusions build on the settings that were asked for
        own = PriorTrial(self.name, {"family": self.family, **self.settings(ctx.opts)}, passed)
        if passed or not ctx.opts.search_on_failure:
            ctx.prior.append(own)
            return report, path
        why = report.gate.reason if report.gate else ""
        ctx.reporter.note(
            f"[yellow]{self.name}[/yellow] failed the gate ({why}); searching {self.family} INT8"
        )
        found_path = ctx.work / f"{self.name}.searched.onnx"
        found = ctx.search(self.family, self.name, found_path)
        if found is not None:
            again = ctx.evaluate(
                self.name, found_path, {"requested": settings, **found}, precision="int8"
            )
            if again.gate is not None and (
                again.gate.passed
                or report.gate is None
                or again.gate.drop_pct < report.gate.drop_pct
            ):
                report, path = again, found_path
        result = ctx.searches[self.name]
        if not result.passed:
            report.warnings.append(result.failure_message())
        ctx.prior.append(own)
        ctx.prior += [
            PriorTrial(self.name, t.settings, t.passed)
            for t in result.trials
            if t.phase == "settings" and t.settings != own.settings
        ]
        return report, path


class StaticInt8Builder(_FixedInt8Builder):
    name = "int8_static"
    family = "static"

    def settings(self, opts: ConvertOptions) -> dict[str, Any]:
        return opts.static_settings().describe()

    def quantize(self, ctx: ConversionContext, path: Path) -> tuple[dict[str, Any], list[str]]:
        settings = self.settings(ctx.opts)
        done = ctx.quantize_static(ctx.opts.static_settings(), path)
        if not done.nonfinite_nodes:
            return settings, []
        return {**settings, "nonfinite_nodes_in_float": list(done.nonfinite_nodes)}, [
            f"{len(done.nonfinite_nodes)} node(s) around tensors with a non-finite calibrated "
            "range (an attention mask's -inf) kept in float"
        ]


class DynamicInt8Builder(_FixedInt8Builder):
    name = "int8_dynamic"
    family = "dynamic"

    def settings(self, opts: ConvertOptions) -> dict[str, Any]:
        return opts.dynamic_settings().describe()

    def quantize(self, ctx: ConversionContext, path: Path) -> tuple[dict[str, Any], list[str]]:
        with ctx.reporter.stage("quantizing int8 (dynamic)", 1) as adv:
            quantize_dynamic_int8(ctx.fp32, path, ctx.opts.dynamic_settings())
            adv(1)
        return self.settings(ctx.opts), []


class AutoInt8Builder(VariantBuilder):
    """``--int8 auto``: the fastest variant the search finds within the tolerance."""

    name = "int8_auto"
    precision = "int8"

    def build(self, ctx: ConversionContext) -> tuple[VariantReport, Path]:
        path = ctx.work / f"{self.name}.onnx"
        found = ctx.search("auto", self.name, path)
        if found is None:  # an earlier variant already is what the search would choose
            prior = ctx.searches[self.name].reused
            report = VariantReport(
                name=self.name,
                precision=self.precision,
                format="onnx",
                file=f"{self.name}.onnx",
                verdict="dropped",
                error=f"{prior} passes with the search's first settings: see {prior}",
                settings={
                    "search": {"trials": len(ctx.searches[self.name].trials), "reused": prior}
                },
            )
            return report, path
        report = ctx.evaluate(self.name, path, found, precision="int8")
        if not ctx.searches[self.name].passed:
            report.warnings.append(ctx.searches[self.name].failure_message())
        return report, path


_ORDER: tuple[tuple[str, type[VariantBuilder]], ...] = (
    ("static", StaticInt8Builder),
    ("dynamic", DynamicInt8Builder),
    ("auto", AutoInt8Builder),
)


def builders_for(opts: ConvertOptions) -> list[VariantBuilder]:
    """The builders ``opts`` asks for, in build order (a search runs after the fixed INT8s)."""
    out: list[VariantBuilder] = [Fp16Builder()] if opts.fp16 else []
    out += [cls() for mode, cls in _ORDER if mode in opts.int8]
    return out


def _failed(builder: VariantBuilder, ctx: ConversionContext, why: str) -> VariantReport:
    return VariantReport(
        name=builder.name,
        precision=builder.precision,
        format="onnx",
        file=f"{builder.name}.onnx",
        verdict="failed",
        settings=builder.settings(ctx.opts),
        error=why,
    )


def build_all(ctx: ConversionContext) -> Built:
    """The FP32 reference and every requested ONNX variant, each judged by the gate."""
    fp32_report = VariantReport(
        name="fp32",
        precision="fp32",
        format="onnx",
        file="fp32.onnx",
        metrics=ctx.compare(ctx.reference),
        verdict="reference",
        settings={"preprocess": "quant_pre_process", "optimize": ctx.opts.optimize},
    )
    built: Built = [(fp32_report, ctx.fp32)]
    for builder in builders_for(ctx.opts):
        try:
            built.append(builder.build(ctx))
        except (KeyboardInterrupt, ConfigError):
            raise  # a wrong option is the user's to fix, not one variant's failure
        except Exception as exc:  # one variant failing never loses the others
            why = str(exc) if isinstance(exc, EdgeCloudError) else f"{type(exc).__name__}: {exc}"
            log.debug("variant %s failed", builder.name, exc_info=True)
            ctx.reporter.note(f"[red]{builder.name} failed[/red]: {why}")
            built.append((_failed(builder, ctx, why), ctx.work / f"{builder.name}.onnx"))
    _write_search_report(ctx)
    _dedupe_auto(built)
    return built


def _write_search_report(ctx: ConversionContext) -> None:
    """``--search-report``: one search's JSON (plus ``variant``), or ``{"searches": [...]}``
    when several variants were searched."""
    path, searches = ctx.opts.search_report, ctx.searches
    if path is None or not searches:
        return
    from converters.search_runner import dump_json

    docs = [{"variant": name, **r.to_dict()} for name, r in searches.items()]
    dump_json(docs[0] if len(docs) == 1 else {"searches": docs}, Path(path))


def _dedupe_auto(built: Built) -> None:
    """``int8_auto`` that chose exactly ``int8_static``'s (or dynamic's) settings is that file.

    Two variants with the same settings would be two files with different bytes (quantizer
    runs differ in names only) and two timings of the same thing; the auto variant is dropped
    and the report says which variant it is.
    """
    by_name = {r.name: (r, p) for r, p in built}
    auto = by_name.get("int8_auto")
    if auto is None or auto[0].verdict in ("failed", "dropped"):
        return
    chosen = auto[0].settings.get("search", {}).get("chosen", {})
    for other in ("int8_static", "int8_dynamic"):
        o = by_name.get(other)
        if o is None or o[0].verdict == "failed" or "search" in o[0].settings:
            continue
        family = "static" if other == "int8_static" else "dynamic"
        same = chosen.get("family") == family and all(
            chosen.get("settings", {}).get(k) == v
            for k, v in o[0].settings.items()
            if k not in ("nonfinite_nodes_in_float",)
        )
        if same and not chosen.get("excluded_nodes"):
            auto[0].verdict = "dropped"
            auto[0].error = f"the search chose {other}'s settings: see {other}"
            return
