"""What the accuracy search tries, in which order, and when it stops.

The order is the point: a search that stops at the first passing variant must meet the likely
winners first. The converter's default for the model's family comes first (most models pass
with it, and then the search costs one conversion), then the other full-INT8 settings in order
of expected speed on an x86 CPU with VNNI (asymmetric uint8 activations use the U8S8 kernels,
symmetric int8 activations the slower S8S8 path; per-channel weights cost a little more than
per-tensor ones), and only then variants that keep nodes in float, which are slower by
construction.

The family follows the model: Conv-heavy graphs get static QDQ (onnxruntime's dynamic
ConvInteger kernels are slower than FP32 convolutions), MatMul/Gemm-heavy graphs (MLPs,
transformers) get dynamic INT8 first, then static QDQ.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from converters.quantize import DynamicInt8Settings, StaticInt8Settings
from edgecloud.errors import ConfigError

__all__ = [
    "Budget",
    "Candidate",
    "Family",
    "candidates",
    "model_profile",
    "parse_budget",
]

Family = Literal["static", "dynamic"]
Settings = StaticInt8Settings | DynamicInt8Settings

_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})


@dataclass(frozen=True)
class Candidate:
    """One setting to try: the family, the quantizer settings, and a short label for tables."""

    family: Family
    settings: Settings
    label: str

    def with_exclusions(self, nodes: tuple[str, ...]) -> Candidate:
        excluded = tuple(dict.fromkeys(self.settings.exclude_nodes + nodes))
        suffix = f" + {len(nodes)} float" if nodes else ""
        return Candidate(
            self.family, replace(self.settings, exclude_nodes=excluded), self.label + suffix
        )

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, **self.settings.describe()}


def model_profile(model_path: Path) -> Literal["conv", "matmul"]:
    """``conv`` when convolutions do more multiply-adds than MatMul/Gemm, else ``matmul``.

    Multiply-adds per sample are estimated from the weight shapes and the output shapes that
    shape inference recorded (the pre-processed model has them); a convolution reuses its small
    kernel at every output position, so counting weights alone would call a CNN with a large
    final Gemm "MatMul-heavy". Unknown dimensions count as 1.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    if not model.graph.value_info:
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:
            pass
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for v in [*graph.value_info, *graph.input, *graph.output]:
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)

    def prod(xs: list[int]) -> int:
        out = 1
        for x in xs:
            out *= max(int(x), 1)
        return out

    conv = matmul = 0
    for n in graph.node:
        if n.op_type not in _CONV_OPS | _MATMUL_OPS or len(n.input) < 2:
            continue
        out = shapes.get(n.output[0], [])
        w = shapes.get(n.input[1], [])
        if n.op_type in _CONV_OPS:
            k = prod(w[1:]) if w else 1  # in_channels/group x kernel
            conv += prod(out[1:]) * k
        else:
            a = shapes.get(n.input[0], [])
            k = a[-1] if a else (w[0] if w else 1)
            matmul += prod(out[1:]) * max(k, 1)
    return "conv" if conv > matmul else "matmul"


def fragile_nodes(model_path: Path) -> list[str]:
    """Transformer nodes known to lose most under INT8, to keep in float first.

    What the anchors do before any ranking (INC's and NNCF's transformer recipes): the
    attention score and context MatMuls (into and out of a Softmax), and the FFN output
    projections (the MatMul/Gemm after a Gelu/Erf/Relu activation). LayerNorm and pooling are
    not quantized by onnxruntime's QDQ/dynamic quantizers anyway.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    act = {"Gelu", "Erf", "Relu", "FastGelu", "BiasGelu"}
    out: list[str] = []

    def upstream_op(name: str, ops: set[str], depth: int = 4) -> bool:
        node = producer.get(name)
        for _ in range(depth):
            if node is None:
                return False
            if node.op_type in ops:
                return True
            node = producer.get(node.input[0]) if node.input else None
        return False

    for n in graph.node:
        if n.op_type not in _MATMUL_OPS:
            continue
        feeds_softmax = any(
            c.op_type == "Softmax"
            or any(d.op_type == "Softmax" for o in c.output for d in consumers.get(o, []))
            for o in n.output
            for c in consumers.get(o, [])
        )
        after_softmax = any(upstream_op(i, {"Softmax"}, 2) for i in n.input)
        ffn_out = any(upstream_op(i, act, 3) for i in n.input[:1])
        if feeds_softmax or after_softmax or ffn_out:
            out.append(n.name)
    return out


def _static(label: str, **kw: Any) -> Candidate:
    return Candidate("static", StaticInt8Settings(**kw), label)


def _symmetric(label: str, **kw: Any) -> Candidate:
    # signed activations with a zero point of 0: the S8S8 kernels; robust to ranges centred on 0
    return _static(label, activation_type="int8", activation_symmetric=True, **kw)


def candidates(
    profile: Literal["conv", "matmul"], families: tuple[Family, ...] = ("static", "dynamic")
) -> list[Candidate]:
    """Full-INT8 candidates for ``profile``, restricted to ``families``, in trial order."""
    static = [
        _static("static minmax per-channel", calib_method="minmax", per_channel=True),
        _static("static minmax per-tensor", calib_method="minmax", per_channel=False),
        _static("static percentile per-channel", calib_method="percentile", per_channel=True),
        _static("static entropy per-channel", calib_method="entropy", per_channel=True),
        _symmetric("static minmax per-channel sym-act", calib_method="minmax", per_channel=True),
        _symmetric(
            "static percentile per-channel sym-act", calib_method="percentile", per_channel=True
        ),
    ]
    dynamic = [
        Candidate("dynamic", DynamicInt8Settings(per_channel=False), "dynamic per-tensor"),
        Candidate("dynamic", DynamicInt8Settings(per_channel=True), "dynamic per-channel"),
    ]
    order = static + dynamic if profile == "conv" else dynamic + static
    return [c for c in order if c.family in families]


@dataclass(frozen=True)
class Budget:
    """Stop after ``trials`` quantizations or ``seconds`` of wall time, whichever comes first."""

    trials: int | None = 20
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"search budget: trials must be >= 1, got {self.trials}")
        if self.seconds is not None and self.seconds <= 0:
            raise ConfigError(f"search budget: seconds must be > 0, got {self.seconds}")

    def exhausted(self, trials_done: int, started: float) -> bool:
        if self.trials is not None and trials_done >= self.trials:
            return True
        return self.seconds is not None and time.monotonic() - started >= self.seconds

    def describe(self) -> str:
        parts = []
        if self.trials is not None:
            parts.append(f"{self.trials} trials")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        return " or ".join(parts) or "unbounded"


_PART = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")


def parse_budget(text: str) -> Budget:
    """``"20"`` (trials), ``"120s"``/``"2m"`` (time) or both, comma-separated (``"20,120s"``)."""
    trials: int | None = None
    seconds: float | None = None
    for part in str(text).split(","):
        m = _PART.match(part)
        if not m:
            raise ConfigError(
                f"--search-budget {text!r}: expected a trial count (20), a time (120s, 2m) or "
                "both separated by a comma (20,120s)"
            )
        value, unit = float(m.group(1)), m.group(2)
        if unit is None:
            if value != int(value):
                raise ConfigError(f"--search-budget {text!r}: a trial count must be whole")
            trials = int(value)
        else:
            seconds = value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]
    if trials is None and seconds is None:
        raise ConfigError(f"--search-budget {text!r} is empty")
    return Budget(trials=trials, seconds=seconds)
