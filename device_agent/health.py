"""The health check a freshly loaded model must pass before it may serve.

The converters record warm-up inputs and the outputs they produced (``manifest.warmup``); the
agent runs them on the device's own backend and compares, so a package that loads but computes
something else (a broken variant, a wrong execution provider) is refused before activation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecloud.errors import RuntimeBackendError, StoreError
from edgecloud.package import ModelPackage
from edgecloud.runtime.base import Backend

__all__ = ["HealthCheckError", "health_check"]


class HealthCheckError(StoreError):
    """A freshly loaded model's warm-up outputs differ from what its package recorded."""


def health_check(backend: Backend, pkg: ModelPackage) -> dict[str, Any]:
    """Run the package's recorded warm-up inputs and compare with its recorded outputs.

    ``manifest.warmup`` (written by the converters, docs/package.md) names a ``.npz`` in the
    package (``file``) whose arrays are listed in ``inputs`` (``input.<name>``) and ``outputs``
    (``output.<name>``), the output to compare (``compare_output``, default all) and the
    tolerances ``min_top1_agreement`` (default 0.99 for ``task == "classification"``, not checked
    for other tasks, whose output columns are not classes) and ``max_rel_l2`` (default 0.05). A
    package without a warm-up file passes if one inference on zeros runs. Returns the figures.
    """
    w = pkg.manifest.warmup
    file = w.get("file")
    m = pkg.manifest
    try:
        if not file:
            feed = {
                s.name: np.zeros(
                    [d if isinstance(d, int) else 1 for d in s.shape], dtype=np.dtype(s.dtype)
                )
                for s in m.inputs
            }
            backend.infer(feed)
            return {"checked": False}
        path = pkg.root / str(file)
        with np.load(path, allow_pickle=False) as npz:
            in_keys = [str(x) for x in w.get("inputs") or [f"input.{s.name}" for s in m.inputs]]
            out_keys = [str(x) for x in w.get("outputs") or [f"output.{s.name}" for s in m.outputs]]
            missing = [k for k in (*in_keys, *out_keys) if k not in npz.files]
            if missing:
                raise HealthCheckError(
                    f"warm-up file {file} lacks arrays {missing} (it has {sorted(npz.files)})"
                )
            feed = {_strip(k, "input."): npz[k] for k in in_keys}
            expected = {_strip(k, "output."): npz[k] for k in out_keys}
        compare = w.get("compare_output")
        if isinstance(compare, str) and compare in expected:
            expected = {compare: expected[compare]}
        got = backend.infer(feed)
    except (RuntimeBackendError, ValueError, OSError) as exc:
        raise HealthCheckError(f"warm-up inference failed: {exc}") from exc
    # Top-1 agreement means something only for class scores: a regression or embedding model's
    # columns are not classes, so without an explicit threshold only max_rel_l2 applies to it.
    raw_agree = w.get("min_top1_agreement")
    if raw_agree is None and m.task == "classification":
        raw_agree = 0.99
    min_agree = None if raw_agree is None else float(raw_agree)
    max_l2 = float(w.get("max_rel_l2", 0.05))
    figures: dict[str, Any] = {"checked": True}
    for name, exp in expected.items():
        out = np.asarray(got[name], dtype=np.float64)
        ref = np.asarray(exp, dtype=np.float64)
        if out.shape != ref.shape:
            raise HealthCheckError(
                f"warm-up output '{name}': shape {list(out.shape)}, expected {list(ref.shape)}"
            )
        rel = float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-12))
        figures[f"{name}.rel_l2"] = rel
        if rel > max_l2:
            raise HealthCheckError(
                f"warm-up output '{name}': relative L2 error {rel:.4g} exceeds {max_l2}"
            )
        if min_agree is not None and out.ndim >= 2 and out.shape[-1] > 1:
            agree = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
            figures[f"{name}.top1_agreement"] = agree
            if agree < min_agree:
                raise HealthCheckError(
                    f"warm-up output '{name}': top-1 agreement {agree:.3f} below {min_agree}"
                )
    return figures


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


# -- health check ------------------------------------------------------------------------------
