"""Train and export a small transformer-style encoder on the digits data (MatMul-heavy sample).

The digits samples of ``train_digits.py`` are an MLP and a CNN. Quantization behaves differently
on transformers: almost all compute is MatMul, activations pass through Softmax and LayerNorm,
and dynamic INT8 (not static QDQ) is the usual CPU choice. This script gives the converter and
its accuracy search such a model, small enough to quantize in a second:

* each 8x8 digit is read as a sequence of 8 tokens (its rows) of 8 features;
* a dense input projection (8 -> 32) plus a learned position embedding;
* two post-LN encoder layers: 2-head self-attention (MatMul, Softmax, MatMul), residual +
  LayerNormalization, MLP 32 -> 64 -> 32 with GELU (Erf form), residual + LayerNormalization;
* mean over tokens and a linear classifier (32 -> 10).

The input is the edge model's ``input`` float32 ``[batch, 64]`` (reshaped inside the graph), so
``samples/data/edge_{calib,val}.npz`` are its calibration and validation data unchanged. The
output ``logits`` is ``[batch, 10]``. As in ``train_digits.py``, the graph is written with
``onnx.helper`` from the trained weights (no exporter warnings, opset 17, byte-identical across
runs) and checked against torch with onnxruntime.

Run ``python samples/build_encoder.py [--out samples/models/digits_encoder.onnx]``; a few seconds
on one CPU thread; deterministic. Needs ``torch==2.13.0`` and ``scikit-learn`` (``samples`` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "models" / "digits_encoder.onnx"
OPSET = 17
IR_VERSION = 8
TOKENS = 8
FEATURES = 8
D_MODEL = 32
HEADS = 2
D_FF = 64
LAYERS = 2
EPOCHS = 30
LR = 3e-3
BATCH = 64
SEED = 0


def _train_digits() -> ModuleType:
    """``train_digits.py`` (same folder) for its seeded splits, loaded without a package."""
    name = "_edgecloud_samples_train_digits"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "train_digits.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / 'train_digits.py'}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _torch_model():  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(D_MODEL, D_MODEL)
            self.k = nn.Linear(D_MODEL, D_MODEL)
            self.v = nn.Linear(D_MODEL, D_MODEL)
            self.o = nn.Linear(D_MODEL, D_MODEL)
            self.ln1 = nn.LayerNorm(D_MODEL)
            self.fc1 = nn.Linear(D_MODEL, D_FF)
            self.fc2 = nn.Linear(D_FF, D_MODEL)
            self.ln2 = nn.LayerNorm(D_MODEL)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            b, t, _ = h.shape
            hd = D_MODEL // HEADS

            def split(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(b, t, HEADS, hd).transpose(1, 2)

            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            p = torch.softmax((q * (1.0 / math.sqrt(hd))) @ k.transpose(-1, -2), dim=-1)
            ctx = (p @ v).transpose(1, 2).reshape(b, t, D_MODEL)
            h = self.ln1(h + self.o(ctx))
            return self.ln2(h + self.fc2(nn.functional.gelu(self.fc1(h))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(FEATURES, D_MODEL)
            self.pos = nn.Parameter(torch.randn(TOKENS, D_MODEL) * 0.1)
            self.layers = nn.ModuleList([Layer() for _ in range(LAYERS)])
            self.head = nn.Linear(D_MODEL, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x.reshape(-1, TOKENS, FEATURES)) + self.pos
            for layer in self.layers:
                h = layer(h)
            return self.head(h.mean(dim=1))

    return Encoder()


def to_onnx(model) -> object:  # type: ignore[no-untyped-def]
    """Write the trained encoder as an opset-17 graph with named nodes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def w(t) -> np.ndarray:  # type: ignore[no-untyped-def]
        return t.detach().cpu().numpy().astype(np.float32)

    def linear(x: str, lin, name: str) -> str:  # type: ignore[no-untyped-def]
        mm = node("MatMul", [x, init(f"{name}.weight", w(lin.weight).T)], f"{name}/MatMul")
        return node("Add", [mm, init(f"{name}.bias", w(lin.bias))], f"{name}/Add")

    hd = D_MODEL // HEADS
    init("shape_tokens", np.array([-1, TOKENS, FEATURES], np.int64))
    init("shape_heads", np.array([-1, TOKENS, HEADS, hd], np.int64))
    init("shape_model", np.array([-1, TOKENS, D_MODEL], np.int64))
    init("attn_scale", np.array(1.0 / math.sqrt(hd), np.float32))
    init("sqrt2", np.array(math.sqrt(2.0), np.float32))
    init("one", np.array(1.0, np.float32))
    init("half", np.array(0.5, np.float32))

    x = node("Reshape", ["input", "shape_tokens"], "tokens")
    h = node("Add", [linear(x, model.proj, "proj"), init("pos", w(model.pos))], "embed")
    for i, layer in enumerate(model.layers):
        p = f"layer{i}"

        def heads(t: str, name: str) -> str:
            return node("Reshape", [t, "shape_heads"], f"{name}/Reshape")

        q = heads(
            node("Mul", [linear(h, layer.q, f"{p}.q"), "attn_scale"], f"{p}.q/Scale"), f"{p}.q"
        )
        k = heads(linear(h, layer.k, f"{p}.k"), f"{p}.k")
        v = heads(linear(h, layer.v, f"{p}.v"), f"{p}.v")
        qt = node("Transpose", [q], f"{p}.q/Transpose", perm=[0, 2, 1, 3])
        kt = node("Transpose", [k], f"{p}.k/Transpose", perm=[0, 2, 3, 1])
        vt = node("Transpose", [v], f"{p}.v/Transpose", perm=[0, 2, 1, 3])
        scores = node("MatMul", [qt, kt], f"{p}.attn/QK")
        probs = node("Softmax", [scores], f"{p}.attn/Softmax", axis=-1)
        ctx = node("MatMul", [probs, vt], f"{p}.attn/PV")
        ctx = node("Transpose", [ctx], f"{p}.attn/Transpose", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "shape_model"], f"{p}.attn/Merge")
        res = node("Add", [h, linear(ctx, layer.o, f"{p}.o")], f"{p}.attn/Residual")
        h = node(
            "LayerNormalization",
            [
                res,
                init(f"{p}.ln1.weight", w(layer.ln1.weight)),
                init(f"{p}.ln1.bias", w(layer.ln1.bias)),
            ],
            f"{p}.ln1",
            axis=-1,
            epsilon=float(layer.ln1.eps),
        )
        f = linear(h, layer.fc1, f"{p}.fc1")
        g = node("Div", [f, "sqrt2"], f"{p}.gelu/Div")
        g = node("Erf", [g], f"{p}.gelu/Erf")
        g = node("Add", [g, "one"], f"{p}.gelu/Add")
        g = node("Mul", [f, g], f"{p}.gelu/Mul")
        g = node("Mul", [g, "half"], f"{p}.gelu/Half")
        res = node("Add", [h, linear(g, layer.fc2, f"{p}.fc2")], f"{p}.mlp/Residual")
        h = node(
            "LayerNormalization",
            [
                res,
                init(f"{p}.ln2.weight", w(layer.ln2.weight)),
                init(f"{p}.ln2.bias", w(layer.ln2.bias)),
            ],
            f"{p}.ln2",
            axis=-1,
            epsilon=float(layer.ln2.eps),
        )
    pooled = node("ReduceMean", [h], "pool", axes=[1], keepdims=0)
    logits = linear(pooled, model.head, "head")
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))

    graph = helper.make_graph(
        nodes,
        "digits_encoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgecloud-samples",
        producer_version="1",
        doc_string="Two-layer transformer-style encoder over digit rows (8 tokens x 8 features).",
    )
    proto.ir_version = IR_VERSION
    helper.set_model_props(
        proto,
        {
            "task": "classification",
            "labels": json.dumps([str(i) for i in range(10)]),
            "confidence": "logits",
            "role": "sample",
            "dataset": "sklearn.datasets.load_digits (8x8, 10 classes)",
            "preprocessing": "pixel / 16.0 -> float32 in [0, 1]",
            "input_layout": "[batch, 64] read as 8 tokens x 8 features",
            "architecture": "2-layer post-LN encoder, d=32, 2 heads, MLP 64 (GELU)",
        },
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def build_encoder(path: Path = DEFAULT_OUT, *, epochs: int = EPOCHS) -> dict[str, float]:
    """Train, export to ``path`` and return ``{"val_accuracy", "max_abs_diff"}``."""
    import onnx
    import onnxruntime as ort
    import torch

    td = _train_digits()
    splits = td.load_splits()
    with td._deterministic_torch():
        torch.manual_seed(SEED)
        model = _torch_model()
        x, y = splits["train"]
        td._fit(model, x, y, epochs=epochs, lr=LR)
        xv, yv = splits["val"]
        with torch.no_grad():
            ref = model(torch.from_numpy(xv)).numpy()
    proto = to_onnx(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))  # type: ignore[arg-type]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": xv})[0]
    diff = float(np.abs(got - ref).max())
    if diff > 1e-4:
        raise RuntimeError(f"ONNX export differs from torch by {diff:.3g} (limit 1e-4)")
    acc = float((got.argmax(1) == yv).mean())
    return {"val_accuracy": acc, "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)
    stats = build_encoder(args.out, epochs=args.epochs)
    size = args.out.stat().st_size
    print(
        f"{args.out}: {size / 1024:.1f} KB, held-out accuracy {stats['val_accuracy']:.2%}, "
        f"max |onnx - torch| {stats['max_abs_diff']:.2g}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
