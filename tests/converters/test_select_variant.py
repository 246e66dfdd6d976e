"""Automatic variant choice follows what the converter measured, not only the precision."""

from __future__ import annotations

from edgecloud.package import Manifest, TensorSpec, Variant
from edgecloud.runtime.loader import select_variant


def _manifest(int8_speedups: dict[str, float]) -> Manifest:
    def v(name: str, precision: str, metrics: dict[str, float]) -> Variant:
        return Variant(name, f"{name}.onnx", "onnx", precision, "cpu", 1, "0" * 64, metrics)

    return Manifest(
        name="m",
        version="1",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(
            v("fp32", "fp32", {}),
            v("fp16", "fp16", {"speedup_b1": 1.0, "speedup_b32": 1.0}),
            v("int8_static", "int8", int8_speedups),
        ),
    )


CPU = ["CPUExecutionProvider"]
GPU = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_int8_is_chosen_when_the_converter_measured_it_faster() -> None:
    m = _manifest({"speedup_b1": 3.4, "speedup_b32": 3.4})
    assert select_variant(m, providers=CPU).name == "int8_static"


def test_int8_measured_slower_on_cpu_falls_back_to_fp32() -> None:
    m = _manifest({"speedup_b1": 0.8, "speedup_b32": 0.75})
    assert select_variant(m, providers=CPU).name == "fp32"
    # Faster at either batch size is enough to keep it; unmeasured keeps the default rule.
    assert select_variant(
        _manifest({"speedup_b1": 0.9, "speedup_b32": 1.3}), providers=CPU
    ).name == ("int8_static")
    assert select_variant(_manifest({}), providers=CPU).name == "int8_static"
    # Asking by name still gets it; a GPU device keeps the GPU order (CPU timings say nothing).
    assert select_variant(m, "int8_static", providers=CPU).name == "int8_static"
    assert select_variant(m, providers=GPU).name == "int8_static"
