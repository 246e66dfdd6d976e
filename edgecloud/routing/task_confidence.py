"""Task-aware confidence for models that are not single-label classifiers.

The manifest names the policy in its optional ``routing.confidence`` object (``kind`` plus the
parameters below); ``routing.calibrated.confidence_from_manifest`` then uses it instead of the
softmax measures.
Each is a ``ConfidencePolicy`` (one float per row, higher = surer), so routing, thresholds and
the drift monitor treat it like any other (``edgecloud tune`` itself calibrates and sweeps only
classifiers' softmax confidence).

- ``detector`` (``output`` = per-box scores, ``[batch, boxes]``): ``mode = "mean"`` or ``"min"``
  score of the boxes at or above ``floor`` (default 0.5); with no such box the scene is judged
  empty and the confidence is ``1 - max score``. ``mode = "ibt"`` is Sedna's image-box
  threshold rule: ``1 -`` the fraction of candidate boxes (score >= ``low``, default 0.3) that
  fall between ``low`` and ``floor``, i.e. how many boxes the model could not decide on.
- ``multilabel`` (``output`` = per-label logits or probabilities, ``kind``): the smallest
  per-label margin ``|2 sigmoid(z) - 1|``; a row is as sure as its least sure label.
- ``regression``: a declared uncertainty output (``std_output``, a standard deviation per value)
  or an ensemble (``ensemble_output``, ``[batch, members, ...]``, whose spread across members is
  the standard deviation); confidence ``1 / (1 + max std / scale)`` (``scale`` default 1).
- ``prototype`` (``output`` = an embedding, ``prototypes`` = one row per class, shipped inline
  in the signed manifest): the cosine similarity to the nearest prototype, clipped to [0, 1].

A malformed spec is a ``PackageError`` naming the field, raised when the model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgecloud.errors import InputError, PackageError
from edgecloud.package.manifest import Manifest
from edgecloud.routing.confidence import ConfidencePolicy

__all__ = [
    "DetectorConfidence",
    "MultiLabelMargin",
    "PrototypeSimilarity",
    "RegressionUncertainty",
    "from_routing",
]


def _get(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return np.asarray(outputs[name], dtype=np.float64)
    except KeyError:
        raise InputError(
            f"confidence output '{name}' is not among the outputs {sorted(outputs)}"
        ) from None


def _rows(x: np.ndarray) -> np.ndarray:
    if x.ndim == 0:
        return x.reshape(1, 1)
    if x.ndim == 1:
        return x[None, :]
    return x.reshape(x.shape[0], -1)


class DetectorConfidence(ConfidencePolicy):
    """Box scores -> one confidence per image (see the module docstring)."""

    def __init__(
        self, output: str, *, mode: str = "mean", floor: float = 0.5, low: float = 0.3
    ) -> None:
        if mode not in ("mean", "min", "ibt"):
            raise PackageError(f"detector confidence mode must be mean, min or ibt, got {mode!r}")
        if not 0.0 <= low <= floor <= 1.0:
            raise PackageError(
                f"detector confidence needs 0 <= low <= floor <= 1, got {low}, {floor}"
            )
        self.output, self.mode, self.floor, self.low = output, mode, float(floor), float(low)

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        s = _rows(_get(outputs, self.output))  # type: ignore[arg-type]
        kept = s >= self.floor
        if self.mode == "ibt":
            cand = s >= self.low
            unsure = cand & ~kept
            return np.asarray(1.0 - unsure.sum(1) / np.maximum(1, cand.sum(1)))
        empty = 1.0 - (s.max(1) if s.shape[1] else np.zeros(len(s)))
        n = kept.sum(1)
        if self.mode == "mean":
            agg = np.where(kept, s, 0.0).sum(1) / np.maximum(1, n)
        else:
            agg = np.where(kept, s, np.inf).min(1, initial=np.inf)
        return np.asarray(np.where(n > 0, agg, empty))


class MultiLabelMargin(ConfidencePolicy):
    """The least sure label's margin ``|2p - 1|``."""

    def __init__(self, output: str, kind: str = "logits") -> None:
        if kind not in ("logits", "probabilities"):
            raise PackageError(
                f"multilabel confidence kind must be logits or probabilities, got {kind!r}"
            )
        self.output, self.kind = output, kind

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        z = _rows(_get(outputs, self.output))  # type: ignore[arg-type]
        p = 1.0 / (1.0 + np.exp(-z)) if self.kind == "logits" else z
        return np.asarray(np.abs(2.0 * p - 1.0).min(1))


class RegressionUncertainty(ConfidencePolicy):
    """``1 / (1 + max std / scale)`` from a declared std output or an ensemble's spread."""

    def __init__(
        self,
        *,
        std_output: str | None = None,
        ensemble_output: str | None = None,
        scale: float = 1.0,
    ) -> None:
        if (std_output is None) == (ensemble_output is None):
            raise PackageError(
                "regression confidence needs exactly one of std_output or ensemble_output"
            )
        if not scale > 0:
            raise PackageError(f"regression confidence scale must be > 0, got {scale!r}")
        self.output = std_output or ensemble_output
        self.ensemble = ensemble_output is not None
        self.scale = float(scale)

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        x = _get(outputs, self.output)  # type: ignore[arg-type]
        if self.ensemble:
            if x.ndim < 2:
                raise InputError(f"ensemble output '{self.output}' needs [batch, members, ...]")
            std = _rows(x.std(axis=1))
        else:
            std = _rows(np.abs(x))
        return np.asarray(1.0 / (1.0 + std.max(1) / self.scale))


class PrototypeSimilarity(ConfidencePolicy):
    """Cosine similarity of the embedding to the nearest class prototype, clipped to [0, 1]."""

    def __init__(self, output: str, prototypes: Any) -> None:
        try:
            p = np.asarray(prototypes, dtype=np.float64)
        except (TypeError, ValueError):
            raise PackageError(
                "prototype confidence: 'prototypes' must be a list of rows"
            ) from None
        if p.ndim != 2 or len(p) == 0 or not np.isfinite(p).all():
            raise PackageError(
                f"prototype confidence: 'prototypes' must be a non-empty finite [classes, dim] "
                f"array, got shape {p.shape}"
            )
        norms = np.linalg.norm(p, axis=1, keepdims=True)
        if (norms == 0).any():
            raise PackageError("prototype confidence: a prototype is all zeros")
        self.output = output
        self.prototypes = p / norms

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        e = _rows(_get(outputs, self.output))  # type: ignore[arg-type]
        if e.shape[1] != self.prototypes.shape[1]:
            raise InputError(
                f"embedding '{self.output}' has {e.shape[1]} values per row, the prototypes "
                f"{self.prototypes.shape[1]}"
            )
        n = np.linalg.norm(e, axis=1, keepdims=True)
        sim = (e / np.where(n == 0, 1.0, n)) @ self.prototypes.T
        return np.asarray(np.clip(sim.max(1), 0.0, 1.0))


def from_routing(manifest: Manifest) -> ConfidencePolicy | None:
    """The task policy ``routing.confidence`` names, or None when it names none."""
    spec = (getattr(manifest, "routing", None) or {}).get("confidence")
    if spec is None:
        return None
    where = f"manifest '{manifest.name}': routing.confidence"
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise PackageError(f"{where} must be an object with a 'kind'")
    kind = spec["kind"]
    params = {k: v for k, v in spec.items() if k != "kind"}
    out = str(params.pop("output", manifest.score_output))
    try:
        if kind == "detector":
            return DetectorConfidence(out, **params)
        if kind == "multilabel":  # logits or probabilities: the manifest's confidence kind
            return MultiLabelMargin(out, manifest.confidence, **params)
        if kind == "regression":
            return RegressionUncertainty(**params)
        if kind == "prototype":
            return PrototypeSimilarity(out, params.pop("prototypes", None), **params)
    except TypeError as exc:
        raise PackageError(f"{where} ({kind}): {exc}") from None
    except PackageError as exc:
        raise PackageError(f"{where}: {exc}") from None
    raise PackageError(
        f"{where}: unknown kind {kind!r} (detector, multilabel, regression, prototype)"
    )
