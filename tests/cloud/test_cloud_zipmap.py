"""``cloud serve`` does not refuse a whole repository over one model it cannot serve (a
scikit-learn model with skl2onnx's default ZipMap output), and edgecloud convert turns such a
model into one it can (issue 14)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import ConvertOptions, convert
from edgecloud.cloud.core import ServingCore
from edgecloud.errors import ConfigError, EdgeCloudError
from edgecloud.transport.v2 import InferRequest


def _zipmap_model(path: Path) -> Path:
    """label (int64) first, then a ZipMap of softmax probabilities, as skl2onnx writes them."""
    w = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["z"], name="mm"),
        helper.make_node("Softmax", ["z"], ["probabilities"], name="sm", axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["output_label"], axis=1, keepdims=0),
        helper.make_node(
            "ZipMap",
            ["probabilities"],
            ["output_probability"],
            name="zipmap",
            domain="ai.onnx.ml",
            classlabels_int64s=[0, 1, 2],
        ),
    ]
    seq_map = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, []))
    )
    g = helper.make_graph(
        nodes,
        "zipmap",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("output_label", TensorProto.INT64, ["N"]),
            helper.make_value_info("output_probability", seq_map),
        ],
        [w],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _plain(repo: Path, name: str, src: Path) -> None:
    d = repo / name / "1"
    d.mkdir(parents=True)
    shutil.copyfile(src, d / "model.onnx")


def test_one_unservable_model_does_not_take_the_repository_down(
    tmp_path: Path, samples_dir: Path
) -> None:
    repo = tmp_path / "repo"
    _plain(repo, "digits", samples_dir / "models/digits_edge.onnx")
    _plain(repo, "forest", _zipmap_model(tmp_path / "zm.onnx"))
    with ServingCore(repo, preload=True) as core:
        assert "forest" in core.unavailable
        assert "seq" in core.unavailable["forest"] or "map" in core.unavailable["forest"]
        x = np.zeros((2, 64), np.float32)
        resp = core.infer(InferRequest(model="digits", inputs={"input": x}))
        assert np.asarray(resp.outputs["logits"]).shape == (2, 10)
        with pytest.raises(EdgeCloudError):
            core.infer(InferRequest(model="forest", inputs={"input": np.zeros((1, 4), np.float32)}))


def test_a_repository_of_only_unservable_models_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _plain(repo, "forest", _zipmap_model(tmp_path / "zm.onnx"))
    with pytest.raises(ConfigError, match=r"no model can be served.*forest"):
        ServingCore(repo, preload=True)


def test_converted_zipmap_model_is_served_with_probabilities(tmp_path: Path) -> None:
    src = _zipmap_model(tmp_path / "zm.onnx")
    np.savez(tmp_path / "v.npz", input=np.random.default_rng(0).random((16, 4), np.float32))
    report = convert(src, tmp_path / "repo/forest/1", ConvertOptions(val=tmp_path / "v.npz"))
    assert report.task == "classification"
    assert report.roles["score_output"] == "output_probability"
    assert report.manifest is not None
    assert report.manifest.confidence == "probabilities"
    with ServingCore(tmp_path / "repo") as core:
        assert not core.unavailable
        x = np.eye(4, dtype=np.float32)[:3]
        resp = core.infer(InferRequest(model="forest", inputs={"input": x}))
        p = np.asarray(resp.outputs["output_probability"])
        assert p.shape == (3, 3)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        assert list(np.asarray(resp.outputs["output_label"])) == [0, 1, 2]
