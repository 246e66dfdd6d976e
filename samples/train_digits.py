"""Train and export the two real sample models used by edgecloud's examples and tests.

Both models classify scikit-learn's bundled *digits* data (1,797 real 8x8 grey
images, no download needed):

* ``digits_edge.onnx`` -- a deliberately tiny MLP (64 -> 10 -> 10).  It is the
  "edge" model: cheap, and a few points less accurate, so that a hybrid router
  has a real accuracy gap to close by escalating low-confidence inputs.
* ``digits_cloud.onnx`` -- a small CNN (Conv-BN-ReLU x2, MaxPool, Gemm) on
  1x8x8 input.  It is the "cloud" model.  The BatchNormalization nodes are kept
  in the exported graph on purpose, so that a converter's Conv+BN fusion pass
  has real work to do.

Why the ONNX graphs are built with ``onnx.helper`` instead of
``torch.onnx.export``: with torch 2.13 the default (dynamo) exporter folds
BatchNorm into Conv when its optimizer is on; with ``optimize=False`` it keeps
BN but adds Shape/Squeeze/Concat shape plumbing, exports opset 18 and
down-converts to 17, and emits FutureWarnings; the legacy TorchScript exporter
emits DeprecationWarnings.  Writing the ten-node graphs by hand from the
trained weights gives a plain graph, BN kept, no warnings, and byte-identical
output across runs.  Every export is checked against torch with onnxruntime.

Run ``python samples/train_digits.py [--out-dir samples] [--quiet]``.
It takes a few seconds on one CPU thread and is deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
TORCH_SEED = 0
N_VAL = 360
N_CALIB = 200
OPSET = 17
# IR version 8 is the one that introduced opset 17; using it (rather than the
# newest IR the installed onnx knows) keeps the files loadable by older runtimes.
IR_VERSION = 8
LABELS = [str(i) for i in range(10)]

EDGE_HIDDEN = 16  # small on purpose: ~94.7 % held-out accuracy vs ~98.3 % for the CNN
EDGE_EPOCHS = 40
EDGE_LR = 3e-3
CLOUD_CHANNELS = (16, 32)
CLOUD_EPOCHS = 60
CLOUD_LR = 3e-3
CLOUD_WEIGHT_DECAY = 1e-4
BATCH_SIZE = 64
BN_EPS = 1e-5
MAX_ABS_DIFF = 1e-4

# Fixed timestamp for npz members so that the archives are byte-identical across runs.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class EdgeMLP(torch.nn.Module):
    """Tiny MLP on flattened 64-pixel input; small so the cloud model has a real edge over it."""

    def __init__(self, hidden: int = EDGE_HIDDEN) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class CloudCNN(torch.nn.Module):
    """Small CNN on 1x8x8 input; convs have no bias because BN follows them (as in ResNets)."""

    def __init__(self, channels: tuple[int, int] = CLOUD_CHANNELS) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = torch.nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c1, eps=BN_EPS)
        self.conv2 = torch.nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c2, eps=BN_EPS)
        self.fc = torch.nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


@contextmanager
def _deterministic_torch() -> Iterator[None]:
    """Force single-threaded deterministic torch, restoring the caller's settings afterwards.

    Restoring matters because tests call ``train_and_export`` in-process.
    """
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn_only)
        torch.set_num_threads(prev_threads)


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return stratified, seeded ``train``/``calib``/``val`` splits.

    Each split is ``(x, y)``: x float32 [N, 64] in [0, 1], y int64 [N].

    Calibration samples are held out from training as well as from validation, so
    calibration statistics are computed on data neither model has fitted.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, val = train_test_split(idx, test_size=N_VAL, stratify=y, random_state=SPLIT_SEED)
    train, calib = train_test_split(
        rest, test_size=N_CALIB, stratify=y[rest], random_state=SPLIT_SEED
    )
    return {
        name: (x[ids], y[ids]) for name, ids in (("train", train), ("calib", calib), ("val", val))
    }


def _fit(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
) -> torch.nn.Module:
    """Adam + cosine schedule, seeded minibatch order; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(TORCH_SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(y) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(yt), BATCH_SIZE):
            batch = perm[i : i + BATCH_SIZE]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _init(name: str, t: torch.Tensor) -> TensorProto:
    return numpy_helper.from_array(t.detach().cpu().numpy().astype(np.float32), name)


def _finish_model(graph: onnx.GraphProto, doc: str, metadata: Mapping[str, str]) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgecloud-samples",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model, full_check=True)
    return model


def _io(input_shape: list[int | str]) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (
        helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
    )


def _metadata(role: str, input_layout: str, architecture: str) -> dict[str, str]:
    """Metadata a consumer (router, converter, report) can read without knowing this script."""
    return {
        "task": "classification",
        "labels": json.dumps(LABELS),
        "confidence": "logits",
        "role": role,
        "dataset": "sklearn.datasets.load_digits (8x8, 10 classes)",
        "preprocessing": "pixel / 16.0 -> float32 in [0, 1]",
        "input_layout": input_layout,
        "architecture": architecture,
    }


def edge_to_onnx(model: EdgeMLP) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm, batch dimension named ``batch``; raw logits out."""
    inp, out = _io(["batch", 64])
    nodes = [
        helper.make_node(
            "Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1
        ),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node(
            "Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1
        ),
    ]
    inits = [_init(k, v) for k, v in model.state_dict().items()]
    graph = helper.make_graph(nodes, "digits_edge", [inp], [out], inits)
    hidden = model.fc1.out_features
    arch = f"MLP 64 -> {hidden} (ReLU) -> 10"
    doc = (
        f"edgecloud sample EDGE model: {arch}, trained on sklearn digits. "
        "Input 'input' float32 [batch, 64] (flattened 8x8 image, pixel/16). "
        "Output 'logits' float32 [batch, 10], raw logits for labels '0'..'9' (no softmax)."
    )
    return _finish_model(graph, doc, _metadata("edge", "NC (flattened 8x8)", arch))


def cloud_to_onnx(model: CloudCNN) -> onnx.ModelProto:
    """Conv-BN-Relu x2 -> MaxPool -> Flatten -> Gemm, BN kept unfused for the converter to fold."""
    inp, out = _io(["batch", 1, 8, 8])
    sd = model.state_dict()
    inits: list[TensorProto] = []
    for key, val in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        inits.append(_init(key, val))
    nodes: list[onnx.NodeProto] = []
    prev = "input"
    for i in (1, 2):
        conv, bn = f"conv{i}", f"bn{i}"
        nodes.append(
            helper.make_node(
                "Conv",
                [prev, f"{conv}.weight"],
                [conv],
                name=conv,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
            )
        )
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [conv, f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"],
                [bn],
                name=bn,
                epsilon=BN_EPS,
            )
        )
        nodes.append(helper.make_node("Relu", [bn], [f"relu{i}"], name=f"relu{i}"))
        prev = f"relu{i}"
    nodes += [
        helper.make_node(
            "MaxPool", [prev], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "digits_cloud", [inp], [out], inits)
    c1, c2 = model.conv1.out_channels, model.conv2.out_channels
    arch = f"CNN Conv3x3({c1})-BN-ReLU, Conv3x3({c2})-BN-ReLU, MaxPool2, Gemm({c2 * 16}->10)"
    doc = (
        f"edgecloud sample CLOUD model: {arch}, trained on sklearn digits. "
        "BatchNormalization is deliberately left unfused. "
        "Input 'input' float32 [batch, 1, 8, 8] (8x8 image, pixel/16). "
        "Output 'logits' float32 [batch, 10], raw logits for labels '0'..'9' (no softmax)."
    )
    return _finish_model(graph, doc, _metadata("cloud", "NCHW 1x8x8", arch))


def run_onnx(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """Run a model on CPU with onnxruntime, single-threaded so results are reproducible."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def _check_export(model: torch.nn.Module, proto: onnx.ModelProto, x: np.ndarray) -> float:
    """Max |onnx - torch| on ``x``; raises if above tolerance so a bad export is never written."""
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.max(np.abs(run_onnx(proto, x) - ref)))
    if diff >= MAX_ABS_DIFF:
        raise RuntimeError(f"ONNX/torch mismatch for {proto.graph.name}: max abs diff {diff:g}")
    return diff


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an ``np.load``-compatible .npz with fixed member timestamps.

    ``np.savez`` stamps each member with the current time, which would make the
    committed data files change on every run; this writer keeps them byte-identical.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_and_export(out_dir: Path) -> dict[str, float]:
    """Train both models, export and verify them, and write everything under ``out_dir``.

    Writes ``models/digits_{edge,cloud}.onnx``, ``data/{edge,cloud}_{calib,val}.npz``
    and ``data/digits_meta.json``.  Returns ``{"edge_accuracy", "cloud_accuracy",
    "edge_max_abs_diff", "cloud_max_abs_diff"}`` (accuracies measured with
    onnxruntime on the held-out validation split).
    """
    out_dir = Path(out_dir)
    models_dir, data_dir = out_dir / "models", out_dir / "data"
    models_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits()
    x_tr, y_tr = splits["train"]
    x_val, y_val = splits["val"]

    def image(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(-1, 1, 8, 8))

    with _deterministic_torch():
        torch.manual_seed(TORCH_SEED)
        edge = _fit(EdgeMLP(), x_tr, y_tr, epochs=EDGE_EPOCHS, lr=EDGE_LR)
        torch.manual_seed(TORCH_SEED)
        cloud = _fit(
            CloudCNN(),
            image(x_tr),
            y_tr,
            epochs=CLOUD_EPOCHS,
            lr=CLOUD_LR,
            weight_decay=CLOUD_WEIGHT_DECAY,
        )
        edge_proto, cloud_proto = edge_to_onnx(edge), cloud_to_onnx(cloud)
        check_x = np.concatenate([x_val, splits["calib"][0]])
        edge_diff = _check_export(edge, edge_proto, check_x)
        cloud_diff = _check_export(cloud, cloud_proto, image(check_x))

    edge_path, cloud_path = models_dir / "digits_edge.onnx", models_dir / "digits_cloud.onnx"
    onnx.save_model(edge_proto, edge_path)
    onnx.save_model(cloud_proto, cloud_path)

    files: dict[str, Path] = {
        "models/digits_edge.onnx": edge_path,
        "models/digits_cloud.onnx": cloud_path,
    }
    for split in ("calib", "val"):
        x, y = splits[split]
        for role, arr in (("edge", x), ("cloud", image(x))):
            p = data_dir / f"{role}_{split}.npz"
            save_npz(p, {"input": arr, "labels": y})
            files[f"data/{p.name}"] = p

    edge_acc = float(np.mean(run_onnx(edge_path, x_val).argmax(1) == y_val))
    cloud_acc = float(np.mean(run_onnx(cloud_path, image(x_val)).argmax(1) == y_val))
    meta = {
        "dataset": "sklearn.datasets.load_digits",
        "preprocessing": "pixel / 16.0 -> float32 in [0, 1]",
        "split_sizes": {k: len(v[1]) for k, v in splits.items()},
        "split_seed": SPLIT_SEED,
        "torch_seed": TORCH_SEED,
        "split_method": "sklearn train_test_split, stratified: val first, then calib from the rest",
        "edge": {
            "architecture": f"MLP 64 -> {EDGE_HIDDEN} -> 10",
            "epochs": EDGE_EPOCHS,
            "val_accuracy": edge_acc,
            "onnx_vs_torch_max_abs_diff": edge_diff,
        },
        "cloud": {
            "architecture": f"CNN channels {list(CLOUD_CHANNELS)} with BatchNorm",
            "epochs": CLOUD_EPOCHS,
            "val_accuracy": cloud_acc,
            "onnx_vs_torch_max_abs_diff": cloud_diff,
        },
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "numpy": np.__version__},
        "sha256": {name: _sha256(p) for name, p in files.items()},
    }
    (data_dir / "digits_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {
        "edge_accuracy": edge_acc,
        "cloud_accuracy": cloud_acc,
        "edge_max_abs_diff": edge_diff,
        "cloud_max_abs_diff": cloud_diff,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: train, export, and report accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory that receives models/ and data/ (default: samples/)",
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    res = train_and_export(args.out_dir)
    if not args.quiet:
        elapsed = time.perf_counter() - start
        for role, arch in (("edge", "MLP"), ("cloud", "CNN")):
            acc, diff = res[f"{role}_accuracy"], res[f"{role}_max_abs_diff"]
            print(f"{role:<5} ({arch}) val accuracy: {acc:.4f}  max|onnx-torch|={diff:.2e}")
        print(f"wrote {args.out_dir}/models and {args.out_dir}/data in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
