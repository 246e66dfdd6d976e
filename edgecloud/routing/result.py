"""A request's answer (``HybridResult``) and the model it ran on (``ModelSlot``).

Both sit below the policies that build them (``routing.policies``) and the client that returns
them. A result copies its model's identity (name, version, labels, how to read confidence) from
the slot when it is built, so it stays right while ``swap_model`` replaces the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgecloud.errors import EdgeCloudError
from edgecloud.package.manifest import Manifest
from edgecloud.routing.confidence import ConfidencePolicy, softmax
from edgecloud.routing.modes import Reason
from edgecloud.runtime.base import Backend

__all__ = ["DEFAULT_THRESHOLD", "IDENTITY_FIELDS", "HybridResult", "ModelSlot", "threshold_for"]

#: The threshold of a model whose manifest names none.
DEFAULT_THRESHOLD = 0.9


@dataclass(eq=False, slots=True)
class HybridResult:
    """One answer and how it was reached.

    ``source`` is ``"edge"`` or ``"cloud:<region>"``; ``reason`` one of ``Reason``'s values;
    ``degraded`` is True when a better answer was wanted but not available (the cloud failed or
    the deadline left no time), so the application can treat the answer with care. Times are in
    seconds. ``errors`` maps a region name to what went wrong there, when anything did.
    ``version`` is the manifest version of the local model the request ran on.
    """

    outputs: dict[str, np.ndarray]
    source: str
    reason: Reason
    confidence: float | None = None
    degraded: bool = False
    local_time: float = 0.0
    cloud_time: float = 0.0
    errors: dict[str, EdgeCloudError] = field(default_factory=dict)
    confidences: np.ndarray | None = None
    model: str = ""
    labels: tuple[str, ...] = ()
    score_output: str | None = None
    score_kind: str = "logits"
    #: Manifest version of the local model bound to this request (the one that ran, or that
    #: validated the inputs for the cloud; "" for a cloud-only client), so a caller knows which
    #: version answered even while ``swap_model`` replaces the model.
    version: str = ""
    #: The local model's outputs when it ran but the cloud's answer was returned (low
    #: confidence), for hard-example capture; None otherwise (``outputs`` are then the local ones
    #: when ``source == "edge"``).
    local_outputs: dict[str, np.ndarray] | None = None
    #: The cloud's answer to come: set for ``escalate="background"`` and audited requests.
    cloud_future: Future[HybridResult] | None = None

    @property
    def region(self) -> str | None:
        return self.source[6:] if self.source.startswith("cloud:") else None

    def probabilities(self, row: int = 0) -> np.ndarray | None:
        """Class probabilities of one row, when the model is a classifier."""
        if self.score_output is None or self.score_output not in self.outputs:
            return None
        x = np.asarray(self.outputs[self.score_output])
        x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[None, :]
        p = softmax(x[row : row + 1].astype(np.float64)) if self.score_kind == "logits" else x
        return np.asarray(p[0] if p.shape[0] == 1 else p[row])

    def top_k(self, k: int = 5, row: int = 0) -> list[tuple[str, float]]:
        """The ``k`` most likely labels of one row with their probabilities (computed lazily)."""
        p = self.probabilities(row)
        if p is None:
            return []
        idx = np.argsort(-p)[:k]
        names = self.labels
        return [(names[i] if i < len(names) else str(int(i)), float(p[i])) for i in idx]

    @property
    def label(self) -> str | None:
        top = self.top_k(1)
        return top[0][0] if top else None

    def error_summary(self) -> str:
        return "; ".join(f"{name}: {err}" for name, err in self.errors.items())


#: The fields of ``HybridResult`` that name the model, right after its first nine.
IDENTITY_FIELDS = ("model", "labels", "score_output", "score_kind", "version")


class ModelSlot:
    """The active model: swapped as one reference, counted while requests use it."""

    __slots__ = (
        "backend",
        "confidence",
        "identity",
        "inflight",
        "labels",
        "local_ewma",
        "manifest",
        "model",
        "score_kind",
        "score_output",
        "threshold",
        "version",
    )

    def __init__(
        self,
        backend: Backend,
        manifest: Manifest,
        confidence: ConfidencePolicy | None,
        threshold: float,
    ) -> None:
        self.backend = backend
        self.manifest = manifest
        self.model = manifest.name
        self.confidence = confidence
        self.threshold = threshold
        self.inflight = 0
        self.labels = manifest.labels
        self.score_output = manifest.score_output if manifest.confidence != "none" else None
        self.score_kind = manifest.confidence
        self.local_ewma = 0.0
        self.version = manifest.version
        #: The values of ``HybridResult``'s ``IDENTITY_FIELDS``, in order: the hot path builds
        #: its result positionally, ``HybridResult(<the first 9 fields>, *slot.identity)``,
        #: which costs half of a keyword call (tests/routing/test_policies.py pins the order).
        self.identity = (self.model, self.labels, self.score_output, self.score_kind, self.version)


def threshold_for(manifest: Manifest, t: float | Mapping[str, float] | None) -> float:
    """The threshold a model gets: its own entry in ``t``, ``t["*"]``, ``t``, or its manifest's."""
    if isinstance(t, Mapping):
        default = t.get("*", manifest.metadata.get("confidence_threshold", DEFAULT_THRESHOLD))
        return float(t.get(manifest.name, default))
    if t is None:
        return float(manifest.metadata.get("confidence_threshold", DEFAULT_THRESHOLD))
    return float(t)
