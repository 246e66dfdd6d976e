"""Offline conversion: FP16, INT8 (static QDQ, dynamic), TensorRT, and the validation gate.

``convert(model, out_dir, ConvertOptions(...))`` is what ``edgecloud convert`` runs. The pieces
are public so an accuracy search can reuse them per trial: ``quantize_static_int8`` (settings in,
file out), ``ArrayCalibrationReader`` (loaded once, rewound per trial), ``run_model`` + ``compare``
+ ``gate`` (metrics and a verdict that says why), ``measure_latency``.
"""

from converters.data import ArrayCalibrationReader, Dataset, load_dataset
from converters.model import ModelInfo, inspect_model, preprocess, slim_variant
from converters.pipeline import ConversionReport, ConvertOptions, VariantReport, convert
from converters.quantize import (
    DynamicInt8Settings,
    StaticInt8Settings,
    convert_fp16,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from converters.validate import (
    ComparisonMetrics,
    GateResult,
    compare,
    gate,
    measure_latency,
    open_session,
    run_model,
)

__all__ = [
    "ArrayCalibrationReader",
    "ComparisonMetrics",
    "ConversionReport",
    "ConvertOptions",
    "Dataset",
    "DynamicInt8Settings",
    "GateResult",
    "ModelInfo",
    "StaticInt8Settings",
    "VariantReport",
    "compare",
    "convert",
    "convert_fp16",
    "gate",
    "inspect_model",
    "load_dataset",
    "measure_latency",
    "open_session",
    "preprocess",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "run_model",
    "slim_variant",
]
