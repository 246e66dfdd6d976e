"""Hard-example capture (as KubeEdge Sedna's incremental learning): low-confidence inputs kept
for retraining.

A device sees data the cloud never sees; the inputs the edge model was unsure about are the
ones worth labelling. Keeping all of them would fill the disk, so capture is sampled
(``sample_rate``) and bounded in count and bytes, oldest dropped first, in one SQLite file next
to the model store. ``export`` writes them as ``.npz`` files plus an ``index.json`` for upload.
"""

from __future__ import annotations

import io
import json
import random
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.errors import StoreError

__all__ = ["HardExampleStore"]


def _npz(arrays: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


class HardExampleStore:
    def __init__(
        self,
        path: Path,
        *,
        threshold: float = 0.6,
        sample_rate: float = 1.0,
        max_count: int = 1000,
        max_bytes: int = 64 * 1024 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.threshold = threshold
        self.sample_rate = sample_rate
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS examples (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "ts REAL, model TEXT, version TEXT, confidence REAL, route TEXT, "
                "inputs BLOB, edge BLOB, cloud BLOB)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open hard-example store {path}: {exc}") from exc

    def offer(
        self,
        inputs: Mapping[str, Any],
        edge: Mapping[str, Any],
        *,
        confidence: float | None,
        model: str,
        version: str,
        route: str = "edge",
        cloud: Mapping[str, Any] | None = None,
    ) -> bool:
        """Keep this example if it is hard (confidence below threshold) and sampled in."""
        if confidence is None or confidence >= self.threshold:
            return False
        if self._rng.random() >= self.sample_rate:
            return False
        row = (
            time.time(),
            model,
            version,
            float(confidence),
            route,
            _npz(inputs),
            _npz(edge),
            _npz(cloud) if cloud else b"",
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO examples(ts, model, version, confidence, route, inputs, edge, cloud)"
                " VALUES (?,?,?,?,?,?,?,?)",
                row,
            )
            self._trim()
        return True

    def _trim(self) -> None:
        while True:
            n, b = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(inputs)+LENGTH(edge)+LENGTH(cloud)),0) "
                "FROM examples"
            ).fetchone()
            if (n <= self.max_count and b <= self.max_bytes) or n == 0:
                return
            self._db.execute("DELETE FROM examples WHERE id = (SELECT MIN(id) FROM examples)")

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, ts, model, version, confidence, route FROM examples ORDER BY id"
            ).fetchall()
        keys = ("id", "ts", "model", "version", "confidence", "route")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def export(self, out_dir: Path) -> Path:
        """Write every example as ``<id>.npz`` (inputs, ``edge/``, ``cloud/`` arrays) and an
        ``index.json``; returns the index path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            rows = self._db.execute(
                "SELECT id, ts, model, version, confidence, route, inputs, edge, cloud "
                "FROM examples ORDER BY id"
            ).fetchall()
        index = []
        for r in rows:
            arrays: dict[str, np.ndarray] = {}
            for prefix, blob in (("input/", r[6]), ("edge/", r[7]), ("cloud/", r[8])):
                if blob:
                    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                        arrays.update({prefix + k: z[k] for k in z.files})
            name = f"{r[0]:08d}.npz"
            np.savez(out_dir / name, **arrays)  # type: ignore[arg-type]
            index.append(
                {
                    "file": name,
                    "ts": r[1],
                    "model": r[2],
                    "version": r[3],
                    "confidence": r[4],
                    "route": r[5],
                }
            )
        p = out_dir / "index.json"
        p.write_text(json.dumps(index, indent=1))
        return p

    def close(self) -> None:
        with self._lock:
            self._db.close()
