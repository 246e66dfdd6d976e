"""Making the reduced-precision variants: FP16, static INT8 (QDQ) and dynamic INT8.

Each function takes a pre-processed FP32 ONNX file and settings and writes one variant file, so an
accuracy search can call them repeatedly with different settings. Defaults follow onnxruntime's
guidance for x86 CPUs with VNNI, checked against measurements on this project's CPU
(docs/benchmarks.md, "Converter"): QDQ format, per-channel int8 weights, uint8 activations
(the U8S8 kernels), no ``reduce_range`` (that is for CPUs without VNNI, where U8S8 can saturate).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.data import ArrayCalibrationReader
from edgecloud.errors import ConfigError, ConversionError

__all__ = [
    "CalibMethod",
    "DynamicInt8Settings",
    "QuantizeResult",
    "StaticInt8Settings",
    "calibration_cache_name",
    "convert_fp16",
    "dynamic_exclusions",
    "nodes_touching",
    "nonfinite_tensors",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "quiet_quantizer_logs",
    "resolve_exclusions",
]

log = logging.getLogger(__name__)

CalibMethod = Literal["minmax", "entropy", "percentile"]
QType = Literal["int8", "uint8"]


@dataclass(frozen=True)
class StaticInt8Settings:
    """Settings of one static INT8 quantization (everything a search may vary)."""

    calib_method: CalibMethod = "minmax"
    per_channel: bool = True
    activation_type: QType = "uint8"
    weight_type: QType = "int8"
    reduce_range: bool = False
    percentile: float = 99.999
    #: biases stay float by default: TensorRT wants them unquantized, onnxruntime still fuses
    #: QLinearConv/QGemm with a float bias, and it saves a scale tensor per biased layer
    quantize_bias: bool = False
    #: zero point 0 for activations (int8 only): the S8S8 kernels, robust to ranges centred
    #: on 0; the search tries it, TensorRT needs it
    activation_symmetric: bool = False
    #: zero point 0 for weights; ``None``: onnxruntime's default (symmetric for int8 weights)
    weight_symmetric: bool | None = None
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    extra_options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "calib_method": self.calib_method,
            "per_channel": self.per_channel,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "reduce_range": self.reduce_range,
            "quantize_bias": self.quantize_bias,
            "activation_symmetric": self.activation_symmetric,
            "exclude_nodes": list(self.exclude_nodes),
            "exclude_ops": list(self.exclude_ops),
        }
        if self.weight_symmetric is not None:
            out["weight_symmetric"] = self.weight_symmetric
        if self.calib_method == "percentile":
            out["percentile"] = self.percentile
        if self.extra_options:
            out["extra_options"] = dict(self.extra_options)
        return out


@dataclass(frozen=True)
class QuantizeResult:
    """What one static quantization did besides writing ``path``."""

    path: Path
    #: whether calibration ran (False: the ranges came from the cache)
    calibrated: bool
    #: nodes kept in float because a tensor they touch had a non-finite calibrated range
    nonfinite_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DynamicInt8Settings:
    per_channel: bool = False
    weight_type: QType = "int8"
    reduce_range: bool = False
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "per_channel": self.per_channel,
            "weight_type": self.weight_type,
            "reduce_range": self.reduce_range,
            "exclude_nodes": list(self.exclude_nodes),
            "exclude_ops": list(self.exclude_ops),
        }


class _DropAxisWarnings(logging.Filter):
    """Drop onnxruntime's "Axis 1 is out-of-range for weight ... with rank 1" root-logger lines.

    Per-channel QDQ asks for axis 1 of every weight, including 1-D LayerNorm scales, which
    onnxruntime then quantizes per tensor, as it should; it still logs one warning per such
    weight (20 lines on the sample encoder) that says nothing a user can act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and "is out-of-range for weight" in record.getMessage())


@contextlib.contextmanager
def quiet_quantizer_logs() -> Iterator[None]:
    """Silence ``_DropAxisWarnings``' lines while onnxruntime quantizes (nothing else)."""
    root = logging.getLogger()
    flt = _DropAxisWarnings()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def resolve_exclusions(model_path: Path, nodes: Sequence[str], ops: Sequence[str]) -> list[str]:
    """Node names to keep in float: the named nodes plus every node of the named op types.

    Unknown names are refused rather than ignored: a typo would otherwise silently quantize the
    node the user meant to protect.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    by_name = {n.name: n.op_type for n in graph.node}
    present_ops = {n.op_type for n in graph.node}
    bad_nodes = [n for n in nodes if n not in by_name]
    if bad_nodes:
        sample = ", ".join(sorted(by_name)[:12])
        raise ConfigError(
            f"--exclude-nodes: no node named {bad_nodes} in the (pre-processed) graph; "
            f"nodes are: {sample}{', ...' if len(by_name) > 12 else ''}"
        )
    bad_ops = [o for o in ops if o not in present_ops]
    if bad_ops:
        raise ConfigError(
            f"--exclude-ops: the graph has no {bad_ops} nodes; op types present: "
            f"{sorted(present_ops)}"
        )
    out = list(dict.fromkeys(nodes))
    out += [name for name, op in by_name.items() if op in ops and name not in out]
    return out


def dynamic_exclusions(model_path: Path, nodes: Sequence[str], ops: Sequence[str]) -> list[str]:
    """``resolve_exclusions`` plus the names onnxruntime's dynamic quantizer really matches.

    ``quantize_dynamic`` first rewrites each Gemm ``g`` into a MatMul named ``g_MatMul`` (plus an
    Add) and only then matches ``nodes_to_exclude``, so excluding ``g`` alone would silently
    quantize it; both names are passed.
    """
    import onnx

    excluded = resolve_exclusions(model_path, nodes, ops)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    gemms = {n.name for n in graph.node if n.op_type == "Gemm"}
    return excluded + [f"{n}_MatMul" for n in excluded if n in gemms]


def calibration_cache_name(settings: StaticInt8Settings) -> str:
    """The file name of ``settings``' calibration ranges: one per method (and percentile).

    Ranges depend only on the calibration method, its percentile and symmetric-range option,
    not on per-channel weights, activation types or exclusions (the calibrator records every
    tensor of the quantizable op types), so every setting that shares this name can reuse them.
    """
    extra = {"CalibTensorRangeSymmetric": False, **settings.extra_options}
    key = f"{settings.calib_method}"
    if settings.calib_method == "percentile":
        key += f"-p{settings.percentile:g}"
    if extra.get("CalibTensorRangeSymmetric"):
        key += "-sym"
    return f"calibration-{key}.json"


def convert_fp16(src: Path, dst: Path, *, keep_io_types: bool = True) -> Path:
    """FP16 weights and activations; inputs/outputs stay FP32 unless ``keep_io_types=False``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from converters.model import has_external_data, save_model, topological_sort

    try:
        large = has_external_data(src)
        model = onnx.load(str(src))
        half = convert_float_to_float16(model, keep_io_types=keep_io_types)
        # the converter appends its Cast nodes at the end: put them back in topological order
        save_model(topological_sort(half), dst, large=large)
    except Exception as exc:
        raise ConversionError(f"FP16 conversion of {src.name} failed: {exc}") from exc
    return dst


def nonfinite_tensors(calibration_cache: Path) -> list[str]:
    """Tensors whose calibrated range is not finite (an attention mask's ``-inf``, say)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import load_tensors_data

    bad = []
    for name, td in load_tensors_data(calibration_cache).data.items():
        rng = td.range_value if hasattr(td, "range_value") else (td.lowest, td.highest)
        if not np.isfinite(np.asarray(rng, dtype=np.float64)).all():
            bad.append(str(name))
    return bad


def nodes_touching(model_path: Path, tensors: Sequence[str]) -> list[str]:
    """Names of the nodes that produce or consume any of ``tensors``."""
    import onnx

    want = set(tensors)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [n.name for n in graph.node if want & (set(n.input) | set(n.output))]


def quantize_static_int8(
    src: Path,
    dst: Path,
    reader: ArrayCalibrationReader,
    settings: StaticInt8Settings,
    *,
    calibration_cache: Path | None = None,
    quiet: bool = False,
) -> QuantizeResult:
    """QDQ INT8 with calibration; ``reader`` is rewound first, so it can be reused.

    The one static quantizer: ``edgecloud convert --int8 static`` and every static trial of the
    accuracy search call it, so they make the same file for the same settings.

    ``calibration_cache``: a JSON file of calibration ranges (onnxruntime's
    ``calibration_cache_path``). When it exists, calibration is skipped and its ranges are used;
    otherwise calibration runs and saves them there, so a later quantization of the same model
    with the same method (an accuracy search, say) costs a quantizer pass only. Name it with
    ``calibration_cache_name(settings)``.

    A tensor whose calibrated range is not finite (``masked_fill(-inf)`` attention masks) cannot
    be quantized; the nodes around it are kept in float and the quantization retried once,
    instead of failing the whole run. ``QuantizeResult.nonfinite_nodes`` names them.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from converters.model import has_external_data

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }.get(settings.calib_method)
    if method is None:
        raise ConfigError(
            f"calibration method {settings.calib_method!r} is not one of minmax, entropy, "
            "percentile"
        )
    extra: dict[str, Any] = {
        "QuantizeBias": settings.quantize_bias,
        "CalibTensorRangeSymmetric": False,
        "ActivationSymmetric": settings.activation_symmetric,
    }
    if settings.weight_symmetric is not None:
        extra["WeightSymmetric"] = settings.weight_symmetric
    extra.update(settings.extra_options)
    if settings.calib_method == "percentile":
        extra.setdefault("CalibPercentile", settings.percentile)
    excluded = resolve_exclusions(src, settings.exclude_nodes, settings.exclude_ops)
    large = has_external_data(src)
    own_cache = None
    if calibration_cache is None:  # the retry below needs the ranges on disk
        own_cache = Path(tempfile.mkdtemp(prefix="calib-", dir=Path(dst).parent))
        calibration_cache = own_cache / calibration_cache_name(settings)
    calibration_cache = Path(calibration_cache)
    hit = calibration_cache.is_file()
    batch_size = reader.batch_size
    if settings.calib_method != "minmax" and len(reader) % batch_size:
        # the histogram collectors stack batches, so every batch must have the same size
        reader.batch_size = 1
    nonfinite: list[str] = []
    out = contextlib.redirect_stdout(io.StringIO() if quiet else sys.stderr)

    def run(exclude: list[str]) -> None:
        reader.rewind()
        # onnxruntime's histogram calibrators print() progress; keep stdout clean for --json
        with out, quiet_quantizer_logs(), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            quantize_static(
                str(src),
                str(dst),
                None if calibration_cache.is_file() else reader.as_ort_reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=_qtype(settings.activation_type),
                weight_type=_qtype(settings.weight_type),
                nodes_to_exclude=exclude or None,
                calibrate_method=method,
                extra_options=extra,
                calibration_cache_path=str(calibration_cache),
                use_external_data_format=large,
            )

    try:
        failure: Exception | None = None
        try:
            run(excluded)
        except Exception as exc:
            if "not finite" not in str(exc) or not calibration_cache.is_file():
                raise
            failure = exc
        # onnxruntime either refuses an infinite range or (other versions) quantizes it into a
        # NaN zero point: either way the nodes around such tensors stay float
        bad = nonfinite_tensors(calibration_cache) if calibration_cache.is_file() else []
        nonfinite = [n for n in nodes_touching(src, bad) if n not in excluded]
        if nonfinite:
            log.info("keeping %d node(s) around non-finite ranges in float", len(nonfinite))
            run(excluded + nonfinite)
        elif failure is not None:
            raise failure
    except (ConfigError, ConversionError):
        raise
    except Exception as exc:
        raise ConversionError(f"static INT8 quantization of {src.name} failed: {exc}") from exc
    finally:
        reader.batch_size = batch_size
        reader.rewind()
        if own_cache is not None:
            shutil.rmtree(own_cache, ignore_errors=True)
    return QuantizeResult(path=Path(dst), calibrated=not hit, nonfinite_nodes=tuple(nonfinite))


def quantize_dynamic_int8(src: Path, dst: Path, settings: DynamicInt8Settings) -> Path:
    """Dynamic INT8 (weights int8 offline, activations quantized per batch at run time).

    Worth it for MatMul/Gemm-heavy models (MLPs, transformers); for convolutions onnxruntime's
    ConvInteger kernels are much slower than FP32, which the gate's latency check reports.
    """
    from onnxruntime.quantization import quantize_dynamic

    from converters.model import has_external_data

    excluded = dynamic_exclusions(src, settings.exclude_nodes, settings.exclude_ops)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                weight_type=_qtype(settings.weight_type),
                nodes_to_exclude=excluded or None,
                use_external_data_format=has_external_data(src),
            )
    except (ConfigError, ConversionError):
        raise
    except Exception as exc:
        raise ConversionError(f"dynamic INT8 quantization of {src} failed: {exc}") from exc
    return dst
