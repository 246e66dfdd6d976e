"""Bad input to ``convert``: each gets a clear error, no traceback, and nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import ConvertOptions, convert
from converters import model as model_mod
from edgecloud.errors import ConfigError, ConversionError, DataError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[2]


def _tiny(path: Path, opset: int = 17, external: bool = False) -> Path:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    if external:
        onnx.save_model(
            m, str(path), save_as_external_data=True, location="w.bin", size_threshold=0
        )
    else:
        onnx.save(m, str(path))
    return path


def _no_leftovers(parent: Path, expected: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == expected


def test_not_an_onnx_file(tmp_path: Path, samples_dir: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model\n" * 10)
    with pytest.raises(ConversionError, match="is not an ONNX model"):
        convert(bad, tmp_path / "pkg", ConvertOptions(val=samples_dir / "data/edge_val.npz"))
    _no_leftovers(tmp_path, {"model.onnx"})


def test_missing_model_file(tmp_path: Path, samples_dir: Path) -> None:
    with pytest.raises(ConversionError, match="no such model file"):
        convert(
            tmp_path / "nope.onnx",
            tmp_path / "pkg",
            ConvertOptions(val=samples_dir / "data/edge_val.npz"),
        )


def test_opset_too_old_to_quantize(tmp_path: Path) -> None:
    model = _tiny(tmp_path / "old.onnx", opset=9)
    np.savez(tmp_path / "d.npz", x=np.ones((4, 4), np.float32))
    with pytest.raises(ConversionError) as e:
        convert(model, tmp_path / "pkg", ConvertOptions(int8=("dynamic",), val=tmp_path / "d.npz"))
    msg = str(e.value)
    assert "opset 9 is too old" in msg
    assert ">= 10" in msg
    assert "version_converter" in msg
    _no_leftovers(tmp_path, {"old.onnx", "d.npz"})


def test_external_data_model_is_converted(tmp_path: Path) -> None:
    model = _tiny(tmp_path / "ext.onnx", external=True)
    np.savez(tmp_path / "d.npz", x=np.ones((4, 4), np.float32))
    report = convert(model, tmp_path / "pkg", ConvertOptions(val=tmp_path / "d.npz"))
    assert report.manifest is not None
    assert report.manifest.metadata["source_external_data"] is True
    # below 2 GiB the weights are inlined: the package has one self-contained file
    assert not list((tmp_path / "pkg").glob("*.data"))


def test_external_data_file_missing_is_bad_input(tmp_path: Path) -> None:
    model = _tiny(tmp_path / "ext.onnx", external=True)
    for f in tmp_path.iterdir():
        if f.suffix not in (".onnx",):
            f.unlink()
    np.savez(tmp_path / "d.npz", x=np.ones((4, 4), np.float32))
    with pytest.raises(DataError, match=r"external data in .*not next to the model"):
        convert(model, tmp_path / "pkg", ConvertOptions(val=tmp_path / "d.npz"))


def test_model_over_2gb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real 2 GiB file is too slow to write in a test; lower the limit to the tiny model's size.
    model = _tiny(tmp_path / "big.onnx")
    monkeypatch.setattr(model_mod, "MAX_MODEL_BYTES", model.stat().st_size - 1)
    np.savez(tmp_path / "d.npz", x=np.ones((4, 4), np.float32))
    with pytest.raises(ConversionError, match="over protobuf's 2 GiB limit"):
        convert(model, tmp_path / "pkg", ConvertOptions(val=tmp_path / "d.npz"))


def test_calibration_data_name_mismatch(tmp_path: Path, samples_dir: Path) -> None:
    np.savez(tmp_path / "c.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(
        DataError,
        match=r"calibration data .*no array for model input\(s\) "
        r"\['input'\]; unexpected array\(s\) \['pixels'\]",
    ):
        convert(
            samples_dir / "models/digits_cloud.onnx",
            tmp_path / "pkg",
            ConvertOptions(
                int8=("static",), calib=tmp_path / "c.npz", val=samples_dir / "data/cloud_val.npz"
            ),
        )
    _no_leftovers(tmp_path, {"c.npz"})


def test_calibration_data_shape_and_dtype_mismatch(tmp_path: Path, samples_dir: Path) -> None:
    model = samples_dir / "models/digits_cloud.onnx"
    opts = {"int8": ("static",), "val": samples_dir / "data/cloud_val.npz"}
    np.savez(tmp_path / "s.npz", input=np.zeros((4, 64), np.float32))
    with pytest.raises(DataError, match=r"input 'input' has shape \[4, 64\].*rank 4"):
        convert(model, tmp_path / "pkg", ConvertOptions(calib=tmp_path / "s.npz", **opts))
    np.savez(tmp_path / "t.npz", input=np.zeros((4, 1, 8, 8), np.float16))
    with pytest.raises(DataError, match="dtype float16, the model expects float32"):
        convert(model, tmp_path / "pkg", ConvertOptions(calib=tmp_path / "t.npz", **opts))


def test_empty_calibration_set(tmp_path: Path, samples_dir: Path) -> None:
    np.savez(tmp_path / "e.npz", input=np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="is empty"):
        convert(
            samples_dir / "models/digits_cloud.onnx",
            tmp_path / "pkg",
            ConvertOptions(
                int8=("static",), calib=tmp_path / "e.npz", val=samples_dir / "data/cloud_val.npz"
            ),
        )


def test_static_needs_calib_and_data_is_required(tmp_path: Path, samples_dir: Path) -> None:
    model = samples_dir / "models/digits_edge.onnx"
    with pytest.raises(ConfigError, match="--calib DATA"):
        convert(
            model,
            tmp_path / "pkg",
            ConvertOptions(int8=("static",), val=samples_dir / "data/edge_val.npz"),
        )
    with pytest.raises(ConfigError, match="--val DATA"):
        convert(model, tmp_path / "pkg", ConvertOptions(fp16=True))


def test_unknown_exclusion_is_refused(tmp_path: Path, samples_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"no node named \['fc9'\].*conv1"):
        convert(
            samples_dir / "models/digits_cloud.onnx",
            tmp_path / "pkg",
            ConvertOptions(
                int8=("static",),
                calib=samples_dir / "data/cloud_calib.npz",
                val=samples_dir / "data/cloud_val.npz",
                exclude_nodes=("fc9",),
                latency_runs=2,
            ),
        )
    assert not (tmp_path / "pkg").exists()


def test_existing_output_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; use --force"):
        # the model does not even exist: the output check comes first and costs nothing
        convert(tmp_path / "nope.onnx", tmp_path / "pkg", ConvertOptions(val=tmp_path / "nope.npz"))
    assert (tmp_path / "pkg" / "keep.txt").read_text() == "mine"


def test_tensorrt_missing_fails_first(tmp_path: Path, samples_dir: Path) -> None:
    pytest.importorskip("onnx")
    from edgecloud.deps import available

    if available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgecloud\[trt\]'"):
        convert(
            tmp_path / "nope.onnx",
            tmp_path / "pkg",
            ConvertOptions(tensorrt=True, val=tmp_path / "nope.npz"),
        )


def test_cli_bad_inputs_exit_codes_without_traceback(tmp_path: Path, samples_dir: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgecloud", "convert", *map(str, args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run(bad, "--out", tmp_path / "p", "--val", samples_dir / "data/edge_val.npz")
    assert r.returncode == 2  # bad input
    assert "is not an ONNX model" in r.stderr
    assert "Traceback" not in r.stderr
    np.savez(tmp_path / "c.npz", input=np.zeros((2, 63), np.float32))
    r = run(
        samples_dir / "models/digits_edge.onnx",
        "--out",
        tmp_path / "p",
        "--val",
        tmp_path / "c.npz",
    )
    assert r.returncode == 2
    assert "dim 1: expected 64, got 63" in r.stderr
    assert "Traceback" not in r.stderr
    r = run(
        samples_dir / "models/digits_edge.onnx",
        "--out",
        tmp_path / "p",
        "--tensorrt",
        "--val",
        samples_dir / "data/edge_val.npz",
    )
    from edgecloud.deps import available

    if not available("tensorrt"):
        assert r.returncode == 3
        assert "edgecloud[trt]" in r.stderr
    assert not (tmp_path / "p").exists()
