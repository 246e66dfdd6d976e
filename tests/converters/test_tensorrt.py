"""The TensorRT path: what runs everywhere (profiles, features, compatibility, the missing-TRT
error) and, marked ``gpu``, a real engine build from the sample model's QDQ and FP16 variants."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from converters.tensorrt import (
    EngineSettings,
    derive_profiles,
    detect_features,
    device_facts,
    engine_compatible,
    engine_facts,
)
from edgecloud.errors import ConfigError, MissingDependencyError
from edgecloud.package import TensorSpec

IMG = (TensorSpec("input", "float32", ("batch", 3, "height", "width")),)


def test_profiles_from_symbolic_dims() -> None:
    p = derive_profiles(IMG, (1, 8, 32), {"height": (128, 224, 320), "width": (128, 224, 320)})
    assert p["input"] == ((1, 3, 128, 128), (8, 3, 224, 224), (32, 3, 320, 320))


def test_profiles_fixed_model_and_default_batch() -> None:
    specs = (TensorSpec("input", "float32", ("batch", 1, 8, 8)), TensorSpec("k", "int64", (2,)))
    p = derive_profiles(specs)
    assert p["input"] == ((1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8))
    assert p["k"] == ((2,), (2,), (2,))


def test_profiles_need_ranges_for_unknown_dims() -> None:
    with pytest.raises(ConfigError, match=r"symbolic dim 'height' at axis 2.*--trt-dim height="):
        derive_profiles(IMG, (1, 8, 32))
    with pytest.raises(ConfigError, match="MIN <= OPT <= MAX"):
        derive_profiles(IMG, (8, 1, 32))


def _fake_trt(version: str, **present: bool) -> SimpleNamespace:
    """A namespace shaped like the tensorrt module, with only the named features."""

    def ns(*names: str) -> SimpleNamespace:
        return SimpleNamespace(**{n: object() for n in names})

    flags = [n for n in ("FP16", "INT8", "VERSION_COMPATIBLE") if present.get(n, False)]
    ncf = [n for n in ("STRONGLY_TYPED", "EXPLICIT_BATCH") if present.get(n, False)]
    mod = SimpleNamespace(
        __version__=version,
        BuilderFlag=ns(*flags),
        NetworkDefinitionCreationFlag=ns(*ncf),
        Builder=ns("build_serialized_network"),
        IBuilderConfig=ns("create_timing_cache", "set_timing_cache"),
    )
    if present.get("hw"):
        mod.HardwareCompatibilityLevel = ns("NONE", "AMPERE_PLUS")
    if present.get("calib"):
        mod.IInt8EntropyCalibrator2 = object
    return mod


def test_feature_detection_trt10_vs_trt11() -> None:
    t10 = detect_features(
        _fake_trt(
            "10.3.0",
            FP16=True,
            INT8=True,
            STRONGLY_TYPED=True,
            EXPLICIT_BATCH=True,
            hw=True,
            calib=True,
            VERSION_COMPATIBLE=True,
        )
    )
    assert t10.strongly_typed
    assert t10.fp16_flag
    assert t10.int8_flag
    assert t10.calibrators
    assert t10.timing_cache
    assert t10.hardware_compat
    assert t10.build_serialized
    t11 = detect_features(_fake_trt("11.0.0", STRONGLY_TYPED=True, hw=True))
    assert t11.strongly_typed
    assert not t11.fp16_flag
    assert not t11.int8_flag
    assert not t11.calibrators
    assert not t11.explicit_batch_flag
    old = detect_features(_fake_trt("8.6.1", FP16=True, INT8=True, EXPLICIT_BATCH=True))
    assert not old.strongly_typed
    assert not old.hardware_compat
    assert old.fp16_flag


def test_network_mode_follows_features() -> None:
    from converters.tensorrt import _network_flags

    def with_values(mod: SimpleNamespace) -> SimpleNamespace:
        for i, name in enumerate(vars(mod.NetworkDefinitionCreationFlag)):
            setattr(mod.NetworkDefinitionCreationFlag, name, i)
        return mod

    t11 = with_values(_fake_trt("11.0.0", STRONGLY_TYPED=True))
    flags, mode = _network_flags(t11, detect_features(t11))
    assert mode == "strongly_typed"
    assert flags == 1
    t8 = with_values(_fake_trt("8.6.1", FP16=True, EXPLICIT_BATCH=True))
    flags, mode = _network_flags(t8, detect_features(t8))
    assert mode == "weakly_typed"
    assert flags == 1


def test_engine_facts_for_the_manifest() -> None:
    feats = detect_features(_fake_trt("10.3.0", STRONGLY_TYPED=True, hw=True))
    profiles = derive_profiles((TensorSpec("input", "float32", ("batch", 1, 8, 8)),))
    facts = engine_facts(
        feats,
        {"gpu_name": "Orin", "compute_capability": "8.7"},
        EngineSettings(precision="int8", profiles=profiles, hardware_compat="ampere_plus"),
        "strongly_typed",
    )
    assert facts["tensorrt_version"] == "10.3.0"
    assert facts["compute_capability"] == "8.7"
    assert facts["gpu_name"] == "Orin"
    assert facts["hardware_compatibility_level"] == "ampere_plus"
    assert facts["profiles"] == [
        {"input": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]}}
    ]
    # the runtime's own check reads the same keys
    ok, why = engine_compatible(
        facts,
        {"tensorrt_version": "10.3.0", "compute_capability": "8.6", "platform": facts["platform"]},
    )
    assert ok, why


BUILT = {
    "tensorrt_version": "10.3.0",
    "compute_capability": "8.7",
    "platform": "linux-aarch64",
    "hardware_compatibility_level": "none",
}


@pytest.mark.parametrize(
    ("extra", "device", "ok", "why"),
    [
        (
            BUILT,
            {
                "tensorrt_version": "10.3.0",
                "compute_capability": "8.7",
                "platform": "linux-aarch64",
            },
            True,
            "same",
        ),
        (
            BUILT,
            {"tensorrt_version": "10.4.0", "compute_capability": "8.7"},
            False,
            "built with TensorRT 10.3.0, the device has 10.4.0",
        ),
        (
            BUILT,
            {"tensorrt_version": "10.3.0", "compute_capability": "8.6"},
            False,
            "compute capability 8.7, the device has 8.6",
        ),
        (
            BUILT,
            {"tensorrt_version": "10.3.0", "compute_capability": "8.7", "platform": "linux-x86_64"},
            False,
            "linux-aarch64, the device is linux-x86_64",
        ),
        (BUILT, {"tensorrt_version": "", "compute_capability": "8.7"}, False, "no TensorRT"),
        (BUILT, {"tensorrt_version": "10.3.0"}, False, "no GPU compute capability"),
        (
            {**BUILT, "hardware_compatibility_level": "ampere_plus"},
            {"tensorrt_version": "10.3.0", "compute_capability": "9.0"},
            True,
            "ampere_plus",
        ),
        (
            {**BUILT, "hardware_compatibility_level": "ampere_plus"},
            {"tensorrt_version": "10.3.0", "compute_capability": "7.5"},
            False,
            ">= 8.0",
        ),
        (
            {**BUILT, "version_compatible": True},
            {"tensorrt_version": "10.5.0", "compute_capability": "8.7"},
            True,
            "same",
        ),
        (
            {**BUILT, "version_compatible": True},
            {"tensorrt_version": "10.1.0", "compute_capability": "8.7"},
            False,
            ">= 10.3.0",
        ),
        (
            {"compute_capability": "8.7"},
            {"tensorrt_version": "10.3.0", "compute_capability": "8.7"},
            False,
            "does not record",
        ),
    ],
)
def test_engine_compatible(extra: dict, device: dict, ok: bool, why: str) -> None:  # type: ignore[type-arg]
    got_ok, reason = engine_compatible(extra, device)
    assert got_ok is ok, reason
    assert why in reason, reason


def test_device_facts_without_tensorrt() -> None:
    from edgecloud.deps import available

    facts = device_facts()
    assert "platform" in facts
    if not available("tensorrt"):
        assert facts["tensorrt_version"] == ""
        ok, reason = engine_compatible(BUILT, facts)
        assert not ok
        assert "no TensorRT" in reason


def test_check_tensorrt_names_the_extra() -> None:
    from converters.tensorrt import check_tensorrt
    from edgecloud.deps import available

    if available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    with pytest.raises(MissingDependencyError) as e:
        check_tensorrt()
    assert "tensorrt is not installed" in str(e.value)
    assert "pip install 'edgecloud[trt]'" in str(e.value)


@pytest.mark.gpu
def test_real_engine_build_from_qdq_and_fp16(tmp_path: Path, samples_dir: Path) -> None:
    from converters import ConvertOptions, convert

    cache = tmp_path / "timing.cache"
    report = convert(
        samples_dir / "models/digits_cloud.onnx",
        tmp_path / "pkg",
        ConvertOptions(
            fp16=True,
            int8=("static",),
            calib=samples_dir / "data/cloud_calib.npz",
            val=samples_dir / "data/cloud_val.npz",
            tensorrt=True,
            trt_timing_cache=cache,
            latency_runs=3,
        ),
    )
    for name in ("trt_fp16", "trt_int8"):
        v = report.variant(name)
        assert v.format == "tensorrt"
        assert v.verdict == "accepted", (name, v.gate)
        assert v.extra["tensorrt_version"]
        assert v.extra["compute_capability"]
        assert v.extra["profiles"][0]["input"]["max"] == [32, 1, 8, 8]
        ok, why = engine_compatible(v.extra, device_facts())
        assert ok, why
    assert cache.stat().st_size > 0


def test_qdq_for_tensorrt_is_signed_and_symmetric(tmp_path: Path, samples_dir: Path) -> None:
    """TensorRT takes only int8 Q/DQ with zero point 0; the CPU default (uint8) would not parse."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from converters import ConvertOptions
    from converters.data import load_dataset
    from converters.model import inspect_model, preprocess
    from converters.tensorrt import quantize_for_tensorrt

    info = inspect_model(samples_dir / "models/digits_cloud.onnx")
    fp32 = preprocess(info.path, tmp_path / "fp32.onnx")
    calib = load_dataset(samples_dir / "data/cloud_calib.npz", info.inputs)
    out = quantize_for_tensorrt(
        fp32, tmp_path / "trt.onnx", calib, ConvertOptions(calib_samples=32)
    )
    g = onnx.load(str(out)).graph
    inits = {t.name: t for t in g.initializer}
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8, n.name
        assert not np.any(numpy_helper.to_array(zp)), n.name
