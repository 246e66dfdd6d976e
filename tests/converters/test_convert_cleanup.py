"""``edgecloud convert`` leaves nothing behind: not in the caller's working directory, not in the
temporary folder, also on failure and on Ctrl-C (issue 9, "Nothing left behind")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters import ConvertOptions, convert
from converters import model as model_mod
from edgecloud.errors import EdgeCloudError
from edgecloud.package import verify_package
from edgecloud.runtime import load_backend

ROOT = Path(__file__).resolve().parents[2]


def _external_model(path: Path) -> Path:
    """A two-layer MLP saved the way torch's exporter saves: weights in ``model.onnx.data``."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "W2")
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["logits"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [w1, w2],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(
        m, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0
    )
    return path


def _listing(d: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
    }


@pytest.fixture
def read_only_cwd(tmp_path: Path) -> Iterator[Path]:
    """A read-only working directory (root may still write there: the listing is the check)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("the user's file\n")
    old = os.getcwd()
    os.chdir(cwd)
    cwd.chmod(0o555)
    try:
        yield cwd
    finally:
        cwd.chmod(0o755)
        os.chdir(old)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own temporary folder, so other conversions on the machine do not count."""
    import tempfile

    t = tmp_path / "tmp"
    t.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


def test_external_data_model_converts_from_a_read_only_cwd(
    tmp_path: Path, read_only_cwd: Path, private_tmp: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model = _external_model(src / "model.onnx")
    rng = np.random.default_rng(1)
    np.savez(src / "calib.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    np.savez(src / "val.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    before, before_src = _listing(read_only_cwd), _listing(src)
    report = convert(
        model,
        tmp_path / "pkg",
        ConvertOptions(
            fp16=True,
            int8=("static", "dynamic"),
            calib=src / "calib.npz",
            val=src / "val.npz",
            latency_runs=3,
        ),
    )
    assert _listing(read_only_cwd) == before
    assert _listing(src) == before_src
    assert not list(private_tmp.iterdir())
    assert report.manifest is not None
    assert report.manifest.metadata["source_external_data"] is True
    assert report.task == "classification"  # named "logits"
    pkg = verify_package(tmp_path / "pkg", None, require_signature=False)
    assert not list((tmp_path / "pkg").glob("*.data"))  # inlined below 2 GiB
    backend = load_backend(pkg, public_key=None, variant="fp32")
    out = backend.infer({"x": np.ones((2, 16), np.float32)})
    assert np.asarray(out["logits"]).shape == (2, 4)


def test_large_model_keeps_external_data_through_conversion(
    tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the inline limit (lowered here: a real 2 GiB model is too slow for a test) the
    weights stay external data in every variant and in the package."""
    monkeypatch.setattr(model_mod, "INLINE_LIMIT", 1024)
    model = _external_model(tmp_path / "model.onnx")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 16)).astype(np.float32))
    report = convert(
        model,
        tmp_path / "pkg",
        ConvertOptions(int8=("dynamic",), val=tmp_path / "d.npz", latency_runs=3),
    )
    written = {v.name for v in report.variants if v.written}
    assert "fp32" in written
    m = verify_package(tmp_path / "pkg", None, require_signature=False).manifest
    assert m.variant("fp32").extra["external_data"] == "fp32.onnx.data"
    for v in m.variants:  # (int8 weights may be small enough to be inlined again)
        if "external_data" in v.extra:
            assert (tmp_path / "pkg" / (v.file + ".data")).is_file()
            assert f"{v.file}.data" in {f.path for f in m.files}
    backend = load_backend(tmp_path / "pkg", public_key=None, require_signature=False)
    out = backend.infer({"x": np.ones((2, 16), np.float32)})
    assert np.asarray(out["logits"]).shape == (2, 4)
    assert not list(private_tmp.iterdir())


def test_failed_conversion_leaves_nothing(
    tmp_path: Path, read_only_cwd: Path, private_tmp: Path
) -> None:
    model = _external_model(tmp_path / "model.onnx")
    np.savez(tmp_path / "bad.npz", x=np.ones((4, 16), np.float32))
    before = _listing(read_only_cwd)
    with pytest.raises(EdgeCloudError, match="no node named"):
        convert(
            model,
            tmp_path / "pkg",
            ConvertOptions(int8=("dynamic",), val=tmp_path / "bad.npz", exclude_nodes=("nope",)),
        )
    assert _listing(read_only_cwd) == before
    assert not list(private_tmp.iterdir())
    assert not (tmp_path / "pkg").exists()


@pytest.mark.slow
def test_ctrl_c_mid_conversion_leaves_nothing(tmp_path: Path, samples_dir: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgecloud",
            "convert",
            str(samples_dir / "models/digits_encoder.onnx"),
            "--out",
            str(tmp_path / "pkg"),
            "--int8",
            "auto",
            "--search-exhaustive",
            "--search-budget",
            "200,300s",
            "--tolerance",
            "0.0",
            "--calib",
            str(samples_dir / "data/edge_calib.npz"),
            "--val",
            str(samples_dir / "data/edge_val.npz"),
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            work = list(tmp.glob("edgecloud-convert-*"))
            if work and list(work[0].glob("search-*")):
                break  # in the middle of the search
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        else:
            pytest.fail("the conversion never reached its search")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    assert rc == 130
    left = [p.name for p in tmp.iterdir() if p.name.startswith(("edgecloud-", "ort.", "pre.quant"))]
    assert not left
    assert not list(cwd.iterdir())
    assert not (tmp_path / "pkg").exists()
