"""Confidence policies that read a package's calibration (``routing`` in the manifest).

Above both ``routing.confidence`` (the softmax measures) and ``routing.task_confidence`` (detectors,
multi-label, regression, prototypes), so that neither imports the other's users:
``confidence_from_manifest`` picks the policy a manifest implies and wraps it with the
temperature or per-class vector scaling that ``edgecloud convert`` or ``edgecloud tune`` stored.
The outputs returned to the caller stay raw; only the confidence is calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgecloud.calibration import routing_of, vector_confidence
from edgecloud.errors import ConfigError, InputError, PackageError
from edgecloud.package.manifest import Manifest
from edgecloud.routing.confidence import _KINDS, ConfidencePolicy, _ProbabilityPolicy
from edgecloud.routing.task_confidence import from_routing

__all__ = [
    "TemperedConfidence",
    "VectorScaledConfidence",
    "confidence_from_manifest",
    "tempered",
]


def confidence_from_manifest(
    manifest: Manifest, measure: str = "max_probability"
) -> ConfidencePolicy | None:
    """The policy the manifest implies, or None when it says confidence is not defined."""
    if manifest.confidence == "none":
        return None
    task = from_routing(manifest)
    if task is not None:
        return task
    try:
        cls = _KINDS[measure]
    except KeyError:
        raise ConfigError(
            f"confidence measure must be one of {sorted(_KINDS)}, got {measure!r}"
        ) from None
    return tempered(cls(manifest.score_output, manifest.confidence), manifest)


def _vector_of(manifest: Manifest, r: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    if r.get("method") != "vector":
        return None
    v = r.get("vector")
    try:
        scale = np.asarray(v["scale"], dtype=np.float64)  # type: ignore[index]
        bias = np.asarray(v["bias"], dtype=np.float64)  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise PackageError(
            f"manifest '{manifest.name}': routing.method is 'vector' but routing.vector is not "
            "{'scale': [numbers], 'bias': [numbers]}"
        ) from None
    if scale.ndim != 1 or scale.shape != bias.shape or not np.isfinite([scale, bias]).all():
        raise PackageError(
            f"manifest '{manifest.name}': routing.vector scale and bias must be finite lists of "
            f"one number per class, got {scale.shape} and {bias.shape}"
        )
    return scale, bias


def tempered(policy: ConfidencePolicy, manifest: Manifest) -> ConfidencePolicy:
    """``policy`` reading ``softmax(logits / T)`` when the manifest carries a temperature.

    With ``routing.method = "vector"`` a max-probability policy reads the vector-scaled
    probability of the returned label instead; other measures keep the scalar temperature."""
    r = routing_of(manifest)
    vec = _vector_of(manifest, r)
    if (
        vec is not None
        and manifest.confidence != "none"
        and type(policy).__name__ == ("MaxProbability")
    ):
        return VectorScaledConfidence(
            policy.output or manifest.score_output,
            *vec,
            from_probabilities=manifest.confidence == "probabilities",
        )
    t = float(r.get("temperature", 1.0))
    if t == 1.0 or manifest.confidence == "none":
        return policy
    if manifest.confidence == "probabilities" and isinstance(policy, _ProbabilityPolicy):
        policy = type(policy)(policy.output or manifest.score_output, "logits")
        return TemperedConfidence(policy, t, from_probabilities=True)
    return TemperedConfidence(policy, t)


class TemperedConfidence(ConfidencePolicy):
    """Scores ``softmax(logits / T)`` with an inner policy; the outputs themselves stay raw.

    Only the score output is divided (a copy of one small array per request); the caller gets
    the model's own outputs back, so calibration changes the routing decision and nothing else.
    """

    def __init__(
        self, inner: ConfidencePolicy, temperature: float, *, from_probabilities: bool = False
    ) -> None:
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.inner = inner
        self.output = inner.output
        self.temperature = float(temperature)
        self.from_probabilities = from_probabilities

    def _scaled(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            x = outputs[self.output]  # type: ignore[index]
        except KeyError:
            raise InputError(
                f"confidence output '{self.output}' is not among the outputs {sorted(outputs)}"
            ) from None
        if self.from_probabilities:
            x = np.log(np.clip(x, 1e-12, 1.0))
        return {self.output: x / self.temperature}  # type: ignore[dict-item]

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.inner(self._scaled(outputs))

    def lowest(self, outputs: Mapping[str, np.ndarray]) -> tuple[float, np.ndarray | None]:
        return self.inner.lowest(self._scaled(outputs))

    def __repr__(self) -> str:
        return f"TemperedConfidence({self.inner!r}, T={self.temperature:.4g})"


class VectorScaledConfidence(ConfidencePolicy):
    """The vector-scaled probability of the label the model returned (its own arg-max).

    Vector scaling may move the arg-max; the caller still gets the model's outputs, so the
    confidence must describe *that* label, not the rescaled one."""

    def __init__(
        self, output: str, scale: np.ndarray, bias: np.ndarray, *, from_probabilities: bool = False
    ) -> None:
        self.output = output
        self.scale = np.asarray(scale, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        self.from_probabilities = from_probabilities

    def __call__(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.asarray(self._scores(outputs), dtype=np.float64)
        if x.shape[1] != len(self.scale):
            raise InputError(
                f"confidence output '{self.output}' has {x.shape[1]} classes, the manifest's "
                f"vector scaling {len(self.scale)}"
            )
        if self.from_probabilities:
            x = np.log(np.clip(x, 1e-12, 1.0))
        return vector_confidence(x, self.scale, self.bias)

    def __repr__(self) -> str:
        return f"VectorScaledConfidence({self.output!r}, classes={len(self.scale)})"
