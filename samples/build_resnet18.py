"""Build a ResNet-18-shaped ONNX model with random weights, using only onnx and numpy.

Why: converter and latency work needs a realistically *sized and shaped* vision
model (11.7 M parameters, 1.8 GFLOPs at 224x224, Conv+BN+ReLU+residual Add
patterns, a 7x7/2 stem, MaxPool, global average pool, Gemm), but no model hub
is reachable and the file (~45 MB) is too large to commit.  This script
regenerates it deterministically in a few seconds.

The weights are random (He-normal convs, seeded), so the outputs are not
meaningful predictions.  To keep activations in a realistic range rather than
exploding or vanishing through 8 residual blocks, the BatchNormalization running
statistics are set data-dependently: each BN's running mean/variance is the
per-channel mean/variance of its input when the (already-initialised) prefix of
the network is run with onnxruntime on a few random-normal images, exactly as a
trained network's running stats describe its training activations.  The BN nodes
are left unfused so converters have Conv+BN folding to do.

Run ``python samples/build_resnet18.py [--out build/resnet18_random.onnx] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the IR version that introduced opset 17; maximises runtime compatibility
BN_EPS = 1e-5
NUM_CLASSES = 1000
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of first block)
BLOCKS_PER_STAGE = 2
N_STATS_IMAGES = 4  # random images used to derive BN running statistics
DEFAULT_OUT = Path("build/resnet18_random.onnx")


def make_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Random standard-normal images, float32 [n, 3, 224, 224].

    Standard normal matches what an ImageNet-normalised image looks like to the
    first conv, so it is a reasonable stand-in for calibration data here.
    """
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 224, 224), dtype=np.float32)


@dataclass
class _GraphBuilder:
    """Accumulates nodes and initializers in topological order."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    bn_inputs: list[tuple[str, str]] = field(default_factory=list)  # (bn name, its input)

    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int) -> str:
        # He-normal with fan_out, as torchvision initialises ResNet convs.
        std = np.sqrt(2.0 / (cout * k * k))
        w = (self.rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)
        self.inits[f"{name}.weight"] = w
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight"],
                [name],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        return name

    def bn(self, x: str, name: str, c: int) -> str:
        # gamma/beta near their trained-ResNet magnitudes; running stats are placeholders
        # until _calibrate_bn replaces them with measured activation statistics.
        self.inits[f"{name}.weight"] = (1.0 + 0.1 * self.rng.standard_normal(c)).astype(np.float32)
        self.inits[f"{name}.bias"] = (0.05 * self.rng.standard_normal(c)).astype(np.float32)
        self.inits[f"{name}.running_mean"] = np.zeros(c, np.float32)
        self.inits[f"{name}.running_var"] = np.ones(c, np.float32)
        self.bn_inputs.append((name, x))
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x] + [f"{name}.{p}" for p in ("weight", "bias", "running_mean", "running_var")],
                [name],
                name=name,
                epsilon=BN_EPS,
            )
        )
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def basic_block(self, x: str, name: str, cin: int, cout: int, stride: int) -> str:
        out = self.conv(x, f"{name}.conv1", cin, cout, 3, stride)
        out = self.op("Relu", [self.bn(out, f"{name}.bn1", cout)], f"{name}.relu1")
        out = self.bn(self.conv(out, f"{name}.conv2", cout, cout, 3, 1), f"{name}.bn2", cout)
        identity = x
        if stride != 1 or cin != cout:
            ds = self.conv(x, f"{name}.downsample.0", cin, cout, 1, stride)
            identity = self.bn(ds, f"{name}.downsample.1", cout)
        return self.op("Relu", [self.op("Add", [out, identity], f"{name}.add")], f"{name}.relu2")

    def model(
        self, outputs: list[onnx.ValueInfoProto], n_nodes: int | None = None
    ) -> onnx.ModelProto:
        nodes = self.nodes if n_nodes is None else self.nodes[:n_nodes]
        used = {i for n in nodes for i in n.input}
        inits = [numpy_helper.from_array(v, k) for k, v in self.inits.items() if k in used]
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])
        graph = helper.make_graph(nodes, "resnet18_random", [inp], outputs, inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="edgecloud-samples",
            producer_version="1",
        )
        model.ir_version = IR_VERSION
        return model


def _build_graph(rng: np.random.Generator) -> _GraphBuilder:
    g = _GraphBuilder(rng)
    x = g.conv("input", "conv1", 3, 64, 7, 2)
    x = g.op("Relu", [g.bn(x, "bn1", 64)], "relu")
    x = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for si, (cout, stride) in enumerate(STAGES, start=1):
        for bi in range(BLOCKS_PER_STAGE):
            x = g.basic_block(x, f"layer{si}.{bi}", cin, cout, stride if bi == 0 else 1)
            cin = cout
    x = g.op("GlobalAveragePool", [x], "avgpool")
    x = g.op("Flatten", [x], "flatten", axis=1)
    # torchvision's nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(cin)
    g.inits["fc.weight"] = rng.uniform(-bound, bound, (NUM_CLASSES, cin)).astype(np.float32)
    g.inits["fc.bias"] = rng.uniform(-bound, bound, NUM_CLASSES).astype(np.float32)
    g.nodes.append(
        helper.make_node("Gemm", [x, "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)
    )
    return g


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _calibrate_bn(g: _GraphBuilder, images: np.ndarray) -> None:
    """Set each BN's running stats to the measured stats of its input, in topological order.

    Each BN's input depends only on earlier BNs, so one forward pass of the graph
    prefix ending at that BN's input suffices once the earlier ones are set.
    """
    node_index = {n.name: i for i, n in enumerate(g.nodes)}
    for bn_name, bn_input in g.bn_inputs:
        prefix = node_index[bn_name]  # nodes before the BN produce its input
        out = helper.make_tensor_value_info(bn_input, TensorProto.FLOAT, None)
        act = _session(g.model([out], n_nodes=prefix)).run([bn_input], {"input": images})[0]
        g.inits[f"{bn_name}.running_mean"] = act.mean(axis=(0, 2, 3)).astype(np.float32)
        g.inits[f"{bn_name}.running_var"] = act.var(axis=(0, 2, 3)).astype(np.float32)


def build_resnet18(path: Path, seed: int = 0) -> Path:
    """Write a deterministic random-weight ResNet-18 (opset 17, dynamic batch) to ``path``.

    Input ``input`` float32 [batch, 3, 224, 224]; output ``logits`` float32 [batch, 1000].
    Returns ``path``.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    g = _build_graph(rng)
    _calibrate_bn(g, make_inputs(N_STATS_IMAGES, seed=seed + 1_000_003))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])
    model = g.model([out])
    model.doc_string = (
        "edgecloud sample: ResNet-18 layout (torchvision naming) with RANDOM weights "
        f"(seed {seed}); for conversion/latency work only, predictions are meaningless. "
        "BatchNormalization left unfused; running stats measured on random-normal inputs."
    )
    helper.set_model_props(
        model,
        {
            "task": "classification",
            "labels": json.dumps([str(i) for i in range(NUM_CLASSES)]),
            "confidence": "logits",
            "architecture": "resnet18",
            "weights": f"random, seed={seed}",
            "input_layout": "NCHW 3x224x224, ImageNet-normalised",
        },
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return path


def _median_latency_ms(path: Path, runs: int = 20) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = make_inputs(1, seed=0)
    sess.run(["logits"], {"input": x})  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(["logits"], {"input": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> int:
    """CLI: build the model, sanity-check its output, and report size and batch-1 latency."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    path = build_resnet18(args.out, seed=args.seed)
    build_s = time.perf_counter() - t0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": make_inputs(2, seed=args.seed + 1)})[0]
    if not np.isfinite(logits).all() or np.ptp(logits) == 0.0:
        print(f"error: degenerate output from {path}", file=sys.stderr)
        return 1
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.1f} MB) in {build_s:.1f}s")
    print(f"logits shape {list(logits.shape)}, mean {logits.mean():.3f}, std {logits.std():.3f}")
    print(f"median CPU latency at batch 1: {_median_latency_ms(path):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
