"""TensorRT engines from the FP16 or QDQ INT8 ONNX variants, with the facts a device must check.

TensorRT is imported lazily (``edgecloud[trt]``), and ``check_tensorrt`` runs before any other
conversion work, so a machine without TensorRT or without an NVIDIA GPU fails in a second with a
message naming what is missing.

Features are detected, not inferred from version strings (``detect_features``): TensorRT 10 has
strongly typed networks (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: precisions come from the
ONNX graph itself, FP16 casts and Q/DQ nodes), ``build_serialized_network``, timing caches and
``HardwareCompatibilityLevel``; TensorRT 11 removed the FP16/INT8 builder flags and the INT8
calibrators, so explicit quantization (the QDQ ONNX the converter already makes) is the only INT8
path and a strongly typed network is the FP16 path. Older TensorRT without strong typing falls back
to the FP16/INT8 builder flags on the same QDQ/FP16 graphs.

An engine only runs on the TensorRT version and GPU generation it was built for; the build records
them (``engine_facts``) in the variant's ``extra`` and ``engine_compatible`` is the check a device
runs before trying to deserialise an engine.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecloud.errors import ConfigError, ConversionError, MissingDependencyError
from edgecloud.package import TensorSpec

if TYPE_CHECKING:
    from converters.data import Dataset
    from converters.options import ConvertOptions

__all__ = [
    "HW_COMPAT_LEVELS",
    "EngineSettings",
    "TrtFeatures",
    "build_engine",
    "check_tensorrt",
    "derive_profiles",
    "detect_features",
    "device_facts",
    "engine_compatible",
    "gpu_facts",
    "quantize_for_tensorrt",
]

log = logging.getLogger(__name__)


def require(module: str, extra: str, why: str = "") -> Any:
    """Import ``module`` or raise ``MissingDependencyError`` naming ``edgecloud[extra]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module, extra, why) from exc


#: CLI spelling -> TensorRT HardwareCompatibilityLevel member name
HW_COMPAT_LEVELS = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_cc": "SAME_COMPUTE_CAPABILITY",
}
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class TrtFeatures:
    """What the installed TensorRT can do (found by attribute, never by version number)."""

    version: str
    strongly_typed: bool
    fp16_flag: bool
    int8_flag: bool
    explicit_batch_flag: bool
    build_serialized: bool
    timing_cache: bool
    hardware_compat: bool
    version_compatible: bool
    calibrators: bool


def detect_features(trt: Any) -> TrtFeatures:
    """Probe the ``trt`` module (or any object shaped like it, for tests)."""
    flag = getattr(trt, "BuilderFlag", None)
    ncf = getattr(trt, "NetworkDefinitionCreationFlag", None)
    cfg = getattr(trt, "IBuilderConfig", None)
    builder = getattr(trt, "Builder", None)
    return TrtFeatures(
        version=str(getattr(trt, "__version__", "unknown")),
        strongly_typed=hasattr(ncf, "STRONGLY_TYPED"),
        fp16_flag=hasattr(flag, "FP16"),
        int8_flag=hasattr(flag, "INT8"),
        explicit_batch_flag=hasattr(ncf, "EXPLICIT_BATCH"),
        build_serialized=hasattr(builder, "build_serialized_network"),
        timing_cache=hasattr(cfg, "create_timing_cache") and hasattr(cfg, "set_timing_cache"),
        hardware_compat=hasattr(trt, "HardwareCompatibilityLevel"),
        version_compatible=hasattr(flag, "VERSION_COMPATIBLE"),
        calibrators=hasattr(trt, "IInt8EntropyCalibrator2"),
    )


def gpu_facts(timeout: float = 10.0) -> dict[str, str] | None:
    """Name and compute capability of GPU 0 via nvidia-smi (None when there is none)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    parts = [p.strip() for p in out.splitlines()[0].split(",")]
    if len(parts) < 2:
        return None
    return {
        "gpu_name": parts[0],
        "compute_capability": parts[1],
        "driver_version": parts[2] if len(parts) > 2 else "",
    }


def check_tensorrt() -> tuple[Any, dict[str, str]]:
    """Import TensorRT and find a GPU, or fail now with what is missing and how to get it."""
    trt = require("tensorrt", "trt", "--tensorrt builds engines with TensorRT")
    gpu = gpu_facts()
    if gpu is None:
        raise ConversionError(
            "--tensorrt needs an NVIDIA GPU with its driver (nvidia-smi found none); build the "
            "engine on the target device or one of the same GPU generation (pip install "
            "'edgecloud[trt]' there)"
        )
    feats = detect_features(trt)
    if not feats.build_serialized:
        raise ConversionError(
            f"TensorRT {feats.version} lacks Builder.build_serialized_network; edgecloud needs "
            "TensorRT >= 8.0 (pip install 'edgecloud[trt]')"
        )
    return trt, gpu


def derive_profiles(
    inputs: Sequence[TensorSpec],
    batch: tuple[int, int, int] = (1, 8, 32),
    dims: Mapping[str, tuple[int, int, int]] | None = None,
) -> Profile:
    """min/opt/max shapes per input: fixed dims as they are, symbolic ones from ``batch``/``dims``.

    The first axis, when symbolic, is the batch; any other symbolic dim must be given by name in
    ``dims`` (``--trt-dim NAME=MIN,OPT,MAX``), since guessing an image size or a sequence length
    would bake a wrong range into the engine.
    """
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"--trt-batch needs 1 <= MIN <= OPT <= MAX, got {batch}")
    dims = dict(dims or {})
    for name, (a, b, c) in dims.items():
        if not 1 <= a <= b <= c:
            raise ConfigError(f"--trt-dim {name} needs 1 <= MIN <= OPT <= MAX, got {(a, b, c)}")
    out: Profile = {}
    for spec in inputs:
        mins: list[int] = []
        opts: list[int] = []
        maxs: list[int] = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                mins.append(d)
                opts.append(d)
                maxs.append(d)
            elif d in dims:
                a, b, c = dims[d]
                mins.append(a)
                opts.append(b)
                maxs.append(c)
            elif axis == 0:
                mins.append(lo)
                opts.append(opt)
                maxs.append(hi)
            else:
                raise ConfigError(
                    f"input '{spec.name}' has symbolic dim '{d}' at axis {axis}; give its range "
                    f"with --trt-dim {d}=MIN,OPT,MAX"
                )
        out[spec.name] = (tuple(mins), tuple(opts), tuple(maxs))
    return out


@dataclass(frozen=True)
class EngineSettings:
    precision: str  # "fp16" or "int8": which ONNX variant the engine is built from
    profiles: Profile = field(default_factory=dict)
    timing_cache: Path | None = None
    hardware_compat: str = "none"
    workspace_mb: int = 2048


def engine_facts(
    feats: TrtFeatures, gpu: Mapping[str, str], settings: EngineSettings, mode: str
) -> dict[str, Any]:
    """What goes into ``Variant.extra`` for an engine (see docs/package.md)."""
    return {
        "tensorrt_version": feats.version,
        "gpu_name": gpu.get("gpu_name", ""),
        "compute_capability": gpu.get("compute_capability", ""),
        "hardware_compatibility_level": settings.hardware_compat,
        "version_compatible": False,
        "platform": f"{platform.system().lower()}-{platform.machine().lower()}",
        "network": mode,
        "profiles": [
            {name: {"min": list(a), "opt": list(b), "max": list(c)}}
            for name, (a, b, c) in settings.profiles.items()
        ],
    }


def _parse_cc(text: str) -> tuple[int, int] | None:
    try:
        major, _, minor = str(text).partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        return None


def engine_compatible(
    variant_extra: Mapping[str, Any], device: Mapping[str, Any]
) -> tuple[bool, str]:
    """Can a device with ``device`` facts run the engine described by ``variant_extra``?

    ``device`` has ``tensorrt_version``, ``compute_capability`` and optionally ``platform`` (as
    ``device_facts()`` returns). Rules: same platform; the same TensorRT version (engines are not
    portable across versions unless built version-compatible, then any version of the same major
    that is not older); and the same compute capability, or any Ampere or newer GPU (>= 8.0) for
    an AMPERE_PLUS engine.
    """
    want_v = str(variant_extra.get("tensorrt_version", ""))
    have_v = str(device.get("tensorrt_version", ""))
    if not have_v:
        return False, "the device has no TensorRT"
    if not want_v:
        return False, "the variant does not record the TensorRT version it was built with"
    want_p, have_p = variant_extra.get("platform"), device.get("platform")
    if want_p and have_p and want_p != have_p:
        return False, f"engine built for {want_p}, the device is {have_p}"
    if variant_extra.get("version_compatible"):
        wv = [int(x) for x in want_v.split(".")[:3] if x.isdigit()]
        hv = [int(x) for x in have_v.split(".")[:3] if x.isdigit()]
        if not wv or not hv or wv[0] != hv[0] or hv < wv:
            return False, (
                f"version-compatible engine built with TensorRT {want_v} needs TensorRT "
                f"{wv[0] if wv else '?'}.x >= {want_v}, the device has {have_v}"
            )
    elif want_v != have_v:
        return False, f"engine built with TensorRT {want_v}, the device has {have_v}"
    want_cc = _parse_cc(str(variant_extra.get("compute_capability", "")))
    have_cc = _parse_cc(str(device.get("compute_capability", "")))
    if have_cc is None:
        return False, "the device reports no GPU compute capability (no NVIDIA GPU?)"
    level = str(variant_extra.get("hardware_compatibility_level", "none"))
    if level == "ampere_plus":
        if have_cc < (8, 0):
            return False, (
                f"AMPERE_PLUS engine needs compute capability >= 8.0, the device has "
                f"{have_cc[0]}.{have_cc[1]}"
            )
        return True, "ampere_plus engine on an Ampere or newer GPU"
    if want_cc is None:
        return False, "the variant does not record the compute capability it was built for"
    if want_cc != have_cc:
        return False, (
            f"engine built for compute capability {want_cc[0]}.{want_cc[1]}, the device has "
            f"{have_cc[0]}.{have_cc[1]}"
        )
    return True, "same TensorRT version and compute capability"


def device_facts() -> dict[str, str]:
    """This machine's facts for ``engine_compatible`` (empty TensorRT version if it has none)."""
    facts = {"platform": f"{platform.system().lower()}-{platform.machine().lower()}"}
    try:
        trt = require("tensorrt", "trt")
        facts["tensorrt_version"] = str(trt.__version__)
    except ImportError:
        facts["tensorrt_version"] = ""
    gpu = gpu_facts() or {}
    facts.update(gpu)
    return facts


def _network_flags(trt: Any, feats: TrtFeatures) -> tuple[int, str]:
    flags = 0
    ncf = trt.NetworkDefinitionCreationFlag
    if feats.strongly_typed:
        flags |= 1 << int(ncf.STRONGLY_TYPED)
        return flags, "strongly_typed"
    if feats.explicit_batch_flag:
        flags |= 1 << int(ncf.EXPLICIT_BATCH)
    return flags, "weakly_typed"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    settings: EngineSettings,
    *,
    trt: Any | None = None,
    gpu: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build a serialised engine from a FP16 or QDQ INT8 ONNX file; return its facts."""
    if trt is None or gpu is None:
        trt, gpu = check_tensorrt()
    feats = detect_features(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, mode = _network_flags(trt, feats)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ConversionError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if mode == "weakly_typed":
        # Pre-strong-typing TensorRT: precisions are builder flags; the graph's Q/DQ still decide
        # where INT8 runs (explicit quantization, no calibrator).
        if settings.precision in ("fp16", "int8") and feats.fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)
        if settings.precision == "int8" and feats.int8_flag:
            config.set_flag(trt.BuilderFlag.INT8)
    if settings.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in settings.profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if settings.hardware_compat != "none":
        if not feats.hardware_compat:
            raise ConversionError(
                f"TensorRT {feats.version} has no hardware compatibility levels; drop "
                "--trt-hardware-compat or upgrade TensorRT"
            )
        level = HW_COMPAT_LEVELS.get(settings.hardware_compat)
        if level is None or not hasattr(trt.HardwareCompatibilityLevel, level):
            raise ConfigError(
                f"--trt-hardware-compat {settings.hardware_compat!r} is not supported by "
                f"TensorRT {feats.version}"
            )
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    cache = None
    if settings.timing_cache is not None and feats.timing_cache:
        blob = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConversionError(
            f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)"
        )
    engine_path.write_bytes(bytes(serialized))
    if cache is not None and settings.timing_cache is not None:
        data = bytes(config.get_timing_cache().serialize())
        tmp = settings.timing_cache.with_name(settings.timing_cache.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, settings.timing_cache)
    return engine_facts(feats, gpu, settings, mode)


def quantize_for_tensorrt(fp32: Path, dst: Path, calib: Dataset, opts: ConvertOptions) -> Path:
    """QDQ INT8 as TensorRT takes it: int8 activations and weights, symmetric (zero point 0).

    Same calibration data, method, per-channel setting and exclusions as the CPU variant.
    """
    from converters.data import ArrayCalibrationReader
    from converters.quantize import StaticInt8Settings, quantize_static_int8

    settings = StaticInt8Settings(
        calib_method=opts.calib_method,
        per_channel=opts.per_channel is not False,  # None: the static default (yes)
        activation_type="int8",
        weight_type="int8",
        exclude_nodes=opts.exclude_nodes,
        exclude_ops=opts.exclude_ops,
        activation_symmetric=True,
        weight_symmetric=True,
    )
    reader = ArrayCalibrationReader(calib, batch_size=opts.calib_batch, limit=opts.calib_samples)
    return quantize_static_int8(fp32, dst, reader, settings).path
