"""Calibration/validation DATA: .npz, .npy, folders, and every mismatch named precisely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.data import ArrayCalibrationReader, load_dataset
from edgecloud.errors import DataError
from edgecloud.package import TensorSpec

IMG = (TensorSpec("input", "float32", ("batch", 1, 8, 8)),)
TWO = (TensorSpec("a", "float32", ("n", 3)), TensorSpec("b", "int64", ("n",)))


def _x(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def test_npz_with_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=_x(5), labels=np.arange(5))
    d = load_dataset(tmp_path / "d.npz", IMG)
    assert len(d) == 5
    assert d.labels is not None
    assert list(d.labels) == [0, 1, 2, 3, 4]


def test_real_sample_data(samples_dir: Path) -> None:
    d = load_dataset(samples_dir / "data/cloud_val.npz", IMG)
    assert len(d) == 360
    assert d.labels is not None


def test_npy_single_input(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", _x(3))
    d = load_dataset(tmp_path / "d.npy", IMG)
    assert len(d) == 3
    assert d.labels is None


def test_npy_for_multi_input_model_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(DataError, match=r"2 inputs \(a, b\)"):
        load_dataset(tmp_path / "d.npy", TWO)


def test_folder_is_concatenated_in_name_order(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", input=_x(2) + 1, labels=np.array([7, 8]))
    np.savez(tmp_path / "a.npz", input=_x(3), labels=np.array([1, 2, 3]))
    d = load_dataset(tmp_path, IMG)
    assert len(d) == 5
    assert list(d.labels) == [1, 2, 3, 7, 8]


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \.npz or \.npy files"):
        load_dataset(tmp_path, IMG)


def test_wrong_input_name(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", image=_x(2))
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "d.npz", IMG, what="calibration data")
    msg = str(e.value)
    assert "no array for model input(s) ['input']" in msg
    assert "unexpected array(s) ['image']" in msg


def test_wrong_dtype(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=_x(2).astype(np.float64))
    with pytest.raises(DataError, match="dtype float64, the model expects float32"):
        load_dataset(tmp_path / "d.npz", IMG)


def test_wrong_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.zeros((2, 1, 8, 9), np.float32))
    with pytest.raises(DataError, match=r"dim 3: expected 8, got 9"):
        load_dataset(tmp_path / "d.npz", IMG)


def test_wrong_rank(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.zeros((2, 64), np.float32))
    with pytest.raises(DataError, match=r"expects rank 4"):
        load_dataset(tmp_path / "d.npz", IMG)


def test_empty_set(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="empty: it holds 0 samples"):
        load_dataset(tmp_path / "d.npz", IMG)


def test_sample_count_mismatch_between_inputs(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros((3, 3), np.float32), b=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="input 'b' has 2 samples, others 3"):
        load_dataset(tmp_path / "d.npz", TWO)


def test_bad_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=_x(3), labels=np.arange(2))
    with pytest.raises(DataError, match="'labels' has 2 entries for 3 samples"):
        load_dataset(tmp_path / "d.npz", IMG)
    np.savez(tmp_path / "e.npz", input=_x(2), labels=np.array([0.5, 1.5]))
    with pytest.raises(DataError, match="integer class indices"):
        load_dataset(tmp_path / "e.npz", IMG)


def test_not_numpy_data(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_text("hello")
    with pytest.raises(DataError, match="cannot read as numpy data"):
        load_dataset(tmp_path / "d.npz", IMG)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"expected an \.npz or \.npy"):
        load_dataset(tmp_path / "d.csv", IMG)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.npz", IMG)


def test_reader_batches_and_rewinds(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", input=_x(10))
    seen: list[int] = []
    r = ArrayCalibrationReader(
        load_dataset(tmp_path / "d.npz", IMG), batch_size=4, limit=9, on_batch=seen.append
    )
    sizes = []
    while (b := r.get_next()) is not None:
        sizes.append(b["input"].shape[0])
    assert sizes == [4, 4, 1]
    assert seen == sizes
    assert len(r) == 9
    r.rewind()
    assert r.get_next() is not None
    ort_reader = r.as_ort_reader()
    from onnxruntime.quantization import CalibrationDataReader

    assert isinstance(ort_reader, CalibrationDataReader)
