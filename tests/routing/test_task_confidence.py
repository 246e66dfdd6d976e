"""Task-aware confidence (edgecloud/routing/task_confidence.py) on real onnxruntime outputs.

Small ONNX graphs built here stand for a detector's score head, a multi-label head and a
regressor with an uncertainty output; the embedding case uses the sample digits encoder with
class prototypes shipped in a signed manifest, end to end through HybridClient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.errors import PackageError
from edgecloud.package import (
    Manifest,
    TensorSpec,
    Variant,
    generate_keypair,
    load_private_key,
    write_package,
)
from edgecloud.routing.calibrated import confidence_from_manifest
from edgecloud.routing.task_confidence import (
    DetectorConfidence,
    MultiLabelMargin,
    RegressionUncertainty,
)

ROOT = Path(__file__).resolve().parents[2]
S = ROOT / "samples"


def _session(tmp: Path, op: str, shape: list[Any], outs: dict[str, str]) -> Any:
    """input x -> one node per output (Identity, Sigmoid, Abs), as a real ORT session."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [helper.make_node(kind, ["x"], [name]) for name, kind in outs.items()]
    g = helper.make_graph(
        nodes,
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in outs],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp / f"{op}.onnx"
    onnx.save(m, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_detector_scores(tmp_path: Path) -> None:
    s = _session(tmp_path, "det", ["batch", 5], {"scores": "Identity"})
    x = np.array(
        [
            [0.95, 0.9, 0.1, 0.0, 0.0],  # two sure boxes
            [0.95, 0.45, 0.4, 0.35, 0.0],  # one sure, three undecided
            [0.1, 0.05, 0.0, 0.0, 0.0],  # an empty scene
        ],
        np.float32,
    )
    out = {"scores": s.run(None, {"x": x})[0]}
    assert np.allclose(DetectorConfidence("scores")(out), [0.925, 0.95, 0.9])
    assert np.allclose(DetectorConfidence("scores", mode="min")(out), [0.9, 0.95, 0.9])
    assert np.allclose(DetectorConfidence("scores", mode="ibt")(out), [1.0, 0.25, 1.0])
    with pytest.raises(PackageError, match="low <= floor"):
        DetectorConfidence("scores", floor=0.2, low=0.5)


def test_multilabel_and_regression(tmp_path: Path) -> None:
    s = _session(tmp_path, "ml", ["batch", 3], {"logits": "Identity", "std": "Abs"})
    x = np.array([[4.0, -4.0, 3.0], [4.0, 0.1, -3.0]], np.float32)
    logits, std = s.run(None, {"x": x})
    m = MultiLabelMargin("logits")({"logits": logits})
    assert m[0] > 0.9 > m[1]  # one label near 0.5 makes the second row unsure
    assert m[1] == pytest.approx(abs(2 / (1 + np.exp(-0.1)) - 1), rel=1e-5)
    r = RegressionUncertainty(std_output="std", scale=2.0)({"std": std})
    assert np.allclose(r, [1 / (1 + 4 / 2), 1 / (1 + 4 / 2)])
    e = _session(tmp_path, "ens", ["batch", 4, 2], {"members": "Identity"})
    pred = np.array(
        [[[1, 1], [1, 1], [1, 1], [1, 1]], [[0, 1], [2, 1], [0, 1], [2, 1]]], np.float32
    )
    members = e.run(None, {"x": pred})[0]
    c = RegressionUncertainty(ensemble_output="members")({"members": members})
    assert c[0] == 1.0
    assert c[1] == pytest.approx(0.5)  # std 1 across members


def _encoder_package(tmp: Path, routing: dict[str, Any]) -> tuple[Path, Path]:
    priv, pub = generate_keypair(tmp / "k")
    m = Manifest(
        name="digits_embed",
        version="1",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),),
        task="embedding",
        routing=routing,
    )
    write_package(tmp / "pkg", m, {"model.onnx": S / "models" / "digits_encoder.onnx"},
                  signing_key=load_private_key(priv))  # fmt: skip
    return tmp / "pkg", pub


def test_prototypes_in_the_manifest_route_out_of_distribution_inputs(tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgecloud.client import HybridClient

    enc = ort.InferenceSession(str(S / "models" / "digits_encoder.onnx"))
    cal = np.load(S / "data" / "edge_calib.npz")
    emb = enc.run(None, {"input": cal["input"]})[0]
    protos = [emb[cal["labels"] == k].mean(0).tolist() for k in range(10)]
    pkg, pub = _encoder_package(
        tmp_path, {"confidence": {"kind": "prototype", "prototypes": protos}}
    )
    val = np.load(S / "data" / "edge_val.npz")["input"][:50]
    noise = np.random.default_rng(0).random((50, 64)).astype(np.float32)
    with HybridClient(pkg, public_key=pub, threshold=0.0, probe_interval=None) as c:
        policy = c._slot.confidence  # type: ignore[union-attr]
        assert type(policy).__name__ == "PrototypeSimilarity"
        cin = np.array([c.infer({"input": val[i : i + 1]}).confidence for i in range(50)])
        cout = np.array([c.infer({"input": noise[i : i + 1]}).confidence for i in range(50)])
    assert cin.mean() > cout.mean() + 0.1
    assert ((cin >= 0) & (cin <= 1)).all()


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ({"kind": "radar"}, "unknown kind"),
        ({"nokind": 1}, "with a 'kind'"),
        ({"kind": "prototype", "prototypes": [[0, 0]]}, "all zeros"),
        ({"kind": "detector", "mode": "max"}, "mean, min or ibt"),
        ({"kind": "detector", "colour": 1}, "unexpected keyword"),
        ({"kind": "regression"}, "exactly one of"),
    ],
)
def test_bad_specs_are_package_errors(tmp_path: Path, spec: dict[str, Any], msg: str) -> None:
    pkg, _ = _encoder_package(tmp_path, {"confidence": spec})
    from edgecloud.package import read_manifest

    with pytest.raises(PackageError, match=msg):
        confidence_from_manifest(read_manifest(pkg))
