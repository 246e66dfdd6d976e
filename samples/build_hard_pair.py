"""A harder edge/cloud pair on real data: a weak, over-confident edge vs a strong cloud.

No package on this machine ships a larger labelled image set offline than scikit-learn's
``load_digits`` (1797 8x8 scans of handwritten digits; the other bundled sets, iris, wine and
breast_cancer, are a few hundred tabular rows, and every ``fetch_*`` loader downloads). Digits is
easy for a model that sees all 64 pixels, so the difficulty comes from the edge side, as on a
real device with a cheap sensor: the edge model sees the image **downsampled to 4x4** (2x2
average pooling, 16 features) and is a small MLP trained without regularisation, hence
over-confident; the cloud MLP sees the full 8x8. Both are exported to ONNX by hand (Gemm/Relu
nodes), the pooling folded into the edge's first Gemm so both take the same ``[N, 64]`` input.

Splits (stratified, seeded): train 50 %, ``tune`` 25 % (what ``edgecloud tune`` sees), ``test``
25 % (held out: what the benchmark reports the picked thresholds on).

    python samples/build_hard_pair.py OUT_DIR     # a few seconds; writes ~40 KB

Needs scikit-learn and onnx (the ``samples`` and ``convert`` extras).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _pool_matrix() -> np.ndarray:
    """[64, 16]: x @ P averages each 2x2 block of the 8x8 image."""
    p = np.zeros((64, 16), dtype=np.float64)
    for r in range(8):
        for c in range(8):
            p[r * 8 + c, (r // 2) * 4 + c // 2] = 0.25
    return p


def _mlp_onnx(layers: list[tuple[np.ndarray, np.ndarray]], name: str, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    x = "input"
    for i, (w, b) in enumerate(layers):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
        ]
        y = "logits" if i == len(layers) - 1 else f"h{i}"
        nodes.append(
            helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y + ("" if y == "logits" else "_lin")])
        )
        if y != "logits":
            nodes.append(helper.make_node("Relu", [y + "_lin"], [y]))
        x = y
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build(out: Path, seed: int = 0) -> dict[str, Any]:
    """Train both models and write ``edge.onnx``, ``cloud.onnx``, ``tune.npz``, ``test.npz``."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    out.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, test_size=0.5, stratify=y, random_state=seed
    )
    x_tu, x_te, y_tu, y_te = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    pool = _pool_matrix()
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1):  # tiny BLAS calls: threads only contend
        warnings.simplefilter("ignore", ConvergenceWarning)
        edge = MLPClassifier((32,), alpha=0.0, solver="lbfgs", max_iter=300, random_state=seed)
        edge.fit(x_tr @ pool, y_tr)
        cloud = MLPClassifier((64,), alpha=1.0, solver="lbfgs", max_iter=200, random_state=seed)
        cloud.fit(x_tr, y_tr)
    (w0, w1), (b0, b1) = edge.coefs_, edge.intercepts_
    _mlp_onnx([(pool @ w0, b0), (w1, b1)], "hard_edge", out / "edge.onnx")
    (c0, c1), (d0, d1) = cloud.coefs_, cloud.intercepts_
    _mlp_onnx([(c0, d0), (c1, d1)], "hard_cloud", out / "cloud.onnx")
    np.savez(out / "tune.npz", input=x_tu, labels=y_tu)
    np.savez(out / "test.npz", input=x_te, labels=y_te)
    meta = {
        "dataset": "sklearn.datasets.load_digits",
        "edge": "MLP 16 (2x2-pooled 8x8) -> 32 -> 10, alpha=0, L-BFGS to fit the training rows",
        "cloud": "MLP 64 -> 64 -> 10, alpha=1, L-BFGS",
        "rows": {"train": len(y_tr), "tune": len(y_tu), "test": len(y_te)},
        "edge_test_accuracy": float(edge.score(x_te @ pool, y_te)),
        "cloud_test_accuracy": float(cloud.score(x_te, y_te)),
        "seed": seed,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1] if len(sys.argv) > 1 else "hard_pair")), indent=2))
