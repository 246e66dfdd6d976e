"""The cloud region runs models through the runtime's seam (issue 10): one validator, one variant
choice, one session class; what differs between a device and a region is configuration only
(the words of errors, the NaN policy, the variant order), each tested here on real models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from edgecloud.cloud.core import ServingCore
from edgecloud.errors import (
    ConfigError,
    DTypeError,
    InputError,
    NonFiniteError,
    PackageError,
    ShapeError,
)
from edgecloud.package import Manifest, TensorSpec, Variant, write_package
from edgecloud.runtime import InputMessages, OnnxRuntimeBackend, read_specs, select_variant
from edgecloud.transport.v2 import InferRequest
from tests.fixtures.servers import make_repository

MODEL = "digits_cloud"


@pytest.fixture(scope="module")
def cloud_onnx(samples_dir: Path) -> Path:
    return samples_dir / "models" / "digits_cloud.onnx"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, cloud_onnx: Path) -> Iterator[ServingCore]:
    repo = make_repository(tmp_path_factory.mktemp("region"), {MODEL: cloud_onnx})
    c = ServingCore(repo, max_batch_size=8, max_queue_delay_ms=1.0)
    yield c
    c.close()


class _Tagged(InputMessages):
    """Other words, same checks: every message starts with a tag."""

    def names(self, missing: list[str], unknown: list[str], expected: list[str]) -> InputError:
        return InputError(f"TAG names {missing} {unknown}", input_name=(missing or unknown)[0])

    def dtype(self, spec: TensorSpec, got: np.dtype[Any], *, cast_hint: bool) -> DTypeError:
        return DTypeError(f"TAG dtype {spec.name} {got}", input_name=spec.name)

    def rank(self, spec: TensorSpec, shape: tuple[int, ...]) -> ShapeError:
        return ShapeError(f"TAG rank {spec.name} {shape}", input_name=spec.name)

    def dim(self, spec: TensorSpec, shape: tuple[int, ...], index: int) -> ShapeError:
        return ShapeError(f"TAG dim {spec.name} {index}", input_name=spec.name)


@pytest.mark.parametrize(
    ("inputs", "error", "default", "tagged"),
    [
        ({"pixels": np.zeros((1, 1, 8, 8), np.float32)}, InputError, "missing input", "TAG names"),
        ({"input": np.zeros((1, 1, 8, 8), np.float64)}, DTypeError, "expected dtype", "TAG dtype"),
        ({"input": np.zeros((1, 8, 8), np.float32)}, ShapeError, "expected rank", "TAG rank"),
        (
            {"input": np.zeros((1, 1, 8, 9), np.float32)},
            ShapeError,
            "dim 3 must be",
            "TAG dim input 3",
        ),
    ],
)
def test_messages_change_the_words_not_the_checks(
    cloud_onnx: Path,
    inputs: dict[str, np.ndarray],
    error: type[Exception],
    default: str,
    tagged: str,
) -> None:
    inp, out = read_specs(cloud_onnx)
    plain = OnnxRuntimeBackend(cloud_onnx, inp, out, providers=["CPUExecutionProvider"])
    tag = OnnxRuntimeBackend(
        cloud_onnx, inp, out, providers=["CPUExecutionProvider"], messages=_Tagged()
    )
    with plain, tag:
        with pytest.raises(error, match=default) as a:
            plain.infer(inputs)
        with pytest.raises(error, match=tagged) as b:
            tag.infer(inputs)
        assert type(a.value) is type(b.value)
        assert a.value.input_name == b.value.input_name  # type: ignore[attr-defined]


def test_region_words_errors_in_v2_terms_with_the_same_checks(core: ServingCore) -> None:
    # The device says "dtype float64", the region "datatype FP64", for the same check.
    with pytest.raises(DTypeError, match="model 'digits_cloud' input 'input': expected datatype"):
        core.submit(InferRequest(MODEL, {"input": np.zeros((1, 1, 8, 8), np.float64)}))
    with pytest.raises(ShapeError, match=r"expected shape \[-1, 1, 8, 8\], got \[1, 8, 8\]"):
        core.submit(InferRequest(MODEL, {"input": np.zeros((1, 8, 8), np.float32)}))
    # Python lists are read as arrays by the shared validator (the V2 codec gives arrays; an
    # embedding application may not).
    x = np.zeros((1, 1, 8, 8), np.float32)
    out = core.infer(InferRequest(MODEL, {"input": x}), timeout=30)
    assert out.outputs["logits"].shape == (1, 10)


def test_region_passes_nan_to_the_model_where_a_device_refuses_it(
    core: ServingCore, cloud_onnx: Path
) -> None:
    x = np.full((2, 1, 8, 8), np.nan, np.float32)
    # The region's policy: a remote client's data is served as sent (as before the seam).
    out = core.infer(InferRequest(MODEL, {"input": x}), timeout=30)
    assert out.outputs["logits"].shape == (2, 10)
    inp, outs = read_specs(cloud_onnx)
    with (
        OnnxRuntimeBackend(cloud_onnx, inp, outs, providers=["CPUExecutionProvider"]) as device,
        pytest.raises(NonFiniteError, match="NaN"),
    ):
        device.infer({"input": x})


def _v(
    name: str,
    precision: str,
    *,
    target: str = "cpu",
    fmt: Literal["onnx", "tensorrt"] = "onnx",
    **extra: object,
) -> Variant:
    return Variant(name, f"{name}.onnx", fmt, precision, target, 1, "0" * 64, {}, dict(extra))


def _manifest(*variants: Variant) -> Manifest:
    return Manifest(
        name="m",
        version="1",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=variants,
    )


def test_accuracy_order_is_fp32_then_int8_then_fp16() -> None:
    all3 = _manifest(_v("q", "int8"), _v("h", "fp16"), _v("f", "fp32"))
    assert select_variant(all3, prefer="accuracy").name == "f"
    assert select_variant(all3, providers=["CPUExecutionProvider"]).name == "q"  # a device
    assert (
        select_variant(_manifest(_v("h", "fp16"), _v("q", "int8")), prefer="accuracy").name == "q"
    )
    assert (
        select_variant(_manifest(_v("h", "float16"), _v("f", "float32")), prefer="accuracy").name
        == "f"
    )


def test_accuracy_order_skips_rejected_engines_and_prefers_cpu_targets() -> None:
    m = _manifest(
        _v("f", "fp32", rejected=True),
        _v("e", "fp32", fmt="tensorrt", target="gpu"),
        _v("g", "fp32", target="gpu"),
        _v("q", "int8"),
    )
    assert select_variant(m, prefer="accuracy").name == "q"
    # Only GPU-targeted ONNX left: onnxruntime still runs it on a CPU region.
    assert select_variant(_manifest(_v("g", "fp16", target="gpu")), prefer="accuracy").name == "g"
    with pytest.raises(PackageError, match="no ONNX variant a CPU region can run"):
        select_variant(_manifest(_v("e", "fp32", fmt="tensorrt", target="gpu")), prefer="accuracy")
    with pytest.raises(ConfigError, match="prefer must be"):
        select_variant(m, prefer="fastest")  # type: ignore[arg-type]


def test_region_serves_the_fp32_variant_of_a_package(tmp_path: Path, cloud_onnx: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = tmp_path / "q.onnx"
    quantize_dynamic(str(cloud_onnx), str(q), weight_type=QuantType.QInt8)
    onnx.checker.check_model(str(q))
    inp, out = read_specs(cloud_onnx)
    manifest = Manifest(
        name=MODEL,
        version="1",
        inputs=inp,
        outputs=out,
        variants=(
            Variant("int8_dynamic", "model_int8.onnx", "onnx", "int8", "cpu", 0, ""),
            Variant("fp32", "model_fp32.onnx", "onnx", "fp32", "cpu", 0, ""),
        ),
    )
    pkg = tmp_path / "pkg"
    write_package(pkg, manifest, {"model_int8.onnx": q, "model_fp32.onnx": cloud_onnx})
    repo = make_repository(tmp_path, {MODEL: pkg})
    with ServingCore(repo, preload=True) as c:
        assert c.repository.entry(MODEL).variant == "fp32"
        x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
        got = c.infer(InferRequest(MODEL, {"input": x}), timeout=30).outputs["logits"]
        inp2, out2 = read_specs(cloud_onnx)
        with OnnxRuntimeBackend(cloud_onnx, inp2, out2, providers=["CPUExecutionProvider"]) as b:
            np.testing.assert_allclose(got, b.infer({"input": x})["logits"], rtol=1e-5, atol=1e-5)
