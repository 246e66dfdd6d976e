"""Calibration and validation data: loading, checking against the model, and feeding onnxruntime.

DATA is an ``.npz`` whose arrays are named after the model's inputs (plus an optional ``labels``),
an ``.npy`` for a single-input model, or a folder of such files (concatenated in name order). It is
checked against the model's input specs before any work starts, so a wrong name, rank, fixed
dimension or dtype is reported as the input it concerns with what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.errors import DataError
from edgecloud.package import TensorSpec

__all__ = ["LABELS_KEY", "ArrayCalibrationReader", "Dataset", "load_dataset"]

LABELS_KEY = "labels"


@dataclass(frozen=True)
class Dataset:
    """Model inputs (same first-axis length) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, n: int) -> Dataset:
        n = min(n, len(self))
        return Dataset(
            {k: v[:n] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[:n],
            self.source,
        )

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self), size):
            yield {k: v[i : i + size] for k, v in self.inputs.items()}


def _read_file(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise DataError(
                    f"{path}: an .npy file holds one array, but the model has {len(specs)} "
                    f"inputs ({names}); use an .npz with one array per input"
                )
            return {specs[0].name: np.load(path, allow_pickle=False)}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as numpy data: {exc}") from exc
    raise DataError(f"{path}: expected an .npz or .npy file (or a folder of them)")


def load_dataset(path: Path, specs: Sequence[TensorSpec], *, what: str = "data") -> Dataset:
    """Load DATA and check it against the model inputs ``specs``; raise DataError otherwise."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        if not files:
            raise DataError(f"{what} folder {path} has no .npz or .npy files")
        parts = [_read_file(p, specs) for p in files]
        keys = set(parts[0])
        for p, part in zip(files[1:], parts[1:], strict=True):
            if set(part) != keys:
                raise DataError(
                    f"{what} file {p} has arrays {sorted(part)}, but {files[0].name} has "
                    f"{sorted(keys)}"
                )
        try:
            arrays = {k: np.concatenate([part[k] for part in parts]) for k in keys}
        except ValueError as exc:
            raise DataError(f"{what} folder {path}: arrays do not concatenate: {exc}") from exc
    elif path.is_file():
        arrays = _read_file(path, specs)
    else:
        raise DataError(f"{what} {path}: no such file or folder")
    return check_arrays(arrays, specs, source=str(path), what=what)


def check_arrays(
    arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec], *, source: str, what: str = "data"
) -> Dataset:
    names = [s.name for s in specs]
    unknown = sorted(set(arrays) - set(names) - {LABELS_KEY})
    missing = [n for n in names if n not in arrays]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"no array for model input(s) {missing}")
        if unknown:
            parts.append(f"unexpected array(s) {unknown}")
        raise DataError(
            f"{what} {source}: {'; '.join(parts)} (the model's inputs are {names}, "
            f"plus optional '{LABELS_KEY}')"
        )
    n: int | None = None
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        arr = arrays[spec.name]
        if arr.dtype != np.dtype(spec.dtype):
            raise DataError(
                f"{what} {source}: input '{spec.name}' has dtype {arr.dtype}, the model expects "
                f"{spec.dtype} (convert with .astype(np.{spec.dtype}))"
            )
        if arr.ndim != len(spec.shape):
            raise DataError(
                f"{what} {source}: input '{spec.name}' has shape {list(arr.shape)}, the model "
                f"expects rank {len(spec.shape)} {list(spec.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(want, int) and axis > 0 and want != got:
                raise DataError(
                    f"{what} {source}: input '{spec.name}' has shape {list(arr.shape)}, the "
                    f"model expects {list(spec.shape)} (dim {axis}: expected {want}, got {got})"
                )
        if n is None:
            n = int(arr.shape[0]) if arr.ndim else 1
        elif arr.shape[0] != n:
            raise DataError(
                f"{what} {source}: input '{spec.name}' has {arr.shape[0]} samples, others {n}"
            )
        inputs[spec.name] = np.ascontiguousarray(arr)
    if not n:
        raise DataError(f"{what} {source} is empty: it holds 0 samples")
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n:
            raise DataError(
                f"{what} {source}: '{LABELS_KEY}' has {labels.shape[0]} entries for {n} samples"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{what} {source}: '{LABELS_KEY}' must be integer class indices, got {labels.dtype}"
            )
    return Dataset(inputs, labels, source)


def _reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader  # type: ignore[no-any-return]


class ArrayCalibrationReader:
    """Feeds a Dataset to onnxruntime's calibrators in batches; ``rewind()`` makes it reusable.

    An accuracy search quantizes many times with different settings; reading and checking the
    data once and rewinding the reader per trial saves that work. Duck-typed to onnxruntime's
    ``CalibrationDataReader`` (``get_next``) so this module imports without onnxruntime.
    """

    def __init__(
        self,
        data: Dataset,
        *,
        batch_size: int = 16,
        limit: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"calibration batch size must be >= 1, got {batch_size}")
        self.data = data if limit is None else data.take(limit)
        if len(self.data) == 0:
            raise DataError(f"calibration data {data.source} is empty")
        self.batch_size = batch_size
        self.on_batch = on_batch
        self._it: Iterator[dict[str, np.ndarray]] = iter(())
        self.rewind()

    def __len__(self) -> int:
        return len(self.data)

    def rewind(self) -> None:
        self._it = self.data.batches(self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        if batch is not None and self.on_batch is not None:
            self.on_batch(int(next(iter(batch.values())).shape[0]))
        return batch

    def as_ort_reader(self) -> Any:
        """An instance of onnxruntime's CalibrationDataReader class that delegates to this one."""
        outer = self

        class _Reader(_reader_base()):  # type: ignore[misc]
            def get_next(self) -> dict[str, np.ndarray] | None:
                return outer.get_next()

            def rewind(self) -> None:
                outer.rewind()

        return _Reader()
