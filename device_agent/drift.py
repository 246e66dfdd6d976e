"""Drift signal: the live confidence histogram and offload rate vs the manifest's reference.

``edgecloud tune`` stores in the manifest's ``routing.reference`` the histogram (equal-width
bins of [0, 1]) of the calibrated edge confidence on its threshold split and the offload rate
the chosen threshold gave there; ``edgecloud convert`` stores the same (one per variant in
``routing.references``, converters/drift_reference.py), so a package that was only converted is
monitored too, by the same code. The reference read is the loaded variant's, else the package's
(``edgecloud.calibration.reference_for``). The agent feeds every answer's *edge* confidence
(computed with the manifest's own policy, temperature included, also when the cloud answered)
into a window of ``window`` requests. When a window closes it computes

- the total-variation distance between the window's histogram and the reference (0 = same,
  1 = disjoint), and
- the absolute difference between the window's offload rate and the reference's. When the
  reference names the threshold it was taken at (every reference convert and tune write), the
  window's rate is the share of its confidences below *that* threshold, so a device or fleet
  threshold set elsewhere compares like with like and cannot raise an alarm by itself; the
  live offload rate is reported beside it (``live_offload``). A reference without a threshold
  is compared with the live offload,

and raises an alarm when either exceeds its limit (``max_distance``, ``max_offload_shift``).
Memory is one window of counts; nothing grows with traffic. A model without a reference
(converted with too few validation rows and never tuned) is not monitored. The window and both
limits come from the fleet policy (``drift_window``, ``drift_max_distance``,
``drift_max_offload_shift``). ``report()`` goes into every heartbeat; an alarm is also returned
by ``observe`` so the agent can publish it at once as a telemetry record of kind ``drift``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgecloud.calibration import reference_for
from edgecloud.errors import ConfigError, PackageError
from edgecloud.package.manifest import Manifest
from edgecloud.routing.calibrated import confidence_from_manifest
from edgecloud.routing.confidence import ConfidencePolicy

__all__ = ["DriftMonitor"]


class DriftMonitor:
    """Windowed comparison against ``manifest.routing.reference``; see the module docstring."""

    def __init__(
        self, *, window: int = 200, max_distance: float = 0.25, max_offload_shift: float = 0.15
    ) -> None:
        self._lock = threading.Lock()
        self.window = 0
        self.max_distance = self.max_offload_shift = 0.0
        self._model: tuple[str, str, str] | None = None
        #: where the reference came from ("routing.references.int8", "routing.reference")
        self.source = ""
        self._policy: ConfidencePolicy | None = None
        self._ref: np.ndarray | None = None
        self._ref_offload = 0.0
        self._ref_threshold: float | None = None
        self._below = 0
        self._counts = np.zeros(1)
        self._n = 0
        self._offloaded = 0
        self.windows = 0
        self.alarms = 0
        self.last: dict[str, Any] | None = None
        self.configure(
            window=window, max_distance=max_distance, max_offload_shift=max_offload_shift
        )

    def configure(
        self,
        *,
        window: int | None = None,
        max_distance: float | None = None,
        max_offload_shift: float | None = None,
    ) -> None:
        """Change the limits (fleet policy ``drift_window``, ``drift_max_distance``,
        ``drift_max_offload_shift``); everything is checked before anything changes, and a new
        window size starts a fresh window."""
        self.apply(*self.checked(window, max_distance, max_offload_shift))

    def checked(
        self, window: int | None, max_distance: float | None, max_offload_shift: float | None
    ) -> tuple[int, float, float]:
        """The limits after this change, validated (ConfigError naming the key), not applied."""
        w = self.window if window is None else window
        if isinstance(w, bool) or not isinstance(w, int) or w < 10:
            raise ConfigError(f"drift_window must be an integer >= 10 requests, got {window!r}")
        limits = []
        for name, v, cur in (
            ("drift_max_distance", max_distance, self.max_distance),
            ("drift_max_offload_shift", max_offload_shift, self.max_offload_shift),
        ):
            v = cur if v is None else v
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < v <= 1.0:
                raise ConfigError(f"{name} must be a number in (0, 1], got {v!r}")
            limits.append(float(v))
        return w, limits[0], limits[1]

    def apply(self, window: int, max_distance: float, max_offload_shift: float) -> None:
        with self._lock:
            if window != self.window:
                self._counts[:] = 0
                self._n = self._offloaded = self._below = 0
            self.window = window
            self.max_distance, self.max_offload_shift = max_distance, max_offload_shift

    def _bind(self, manifest: Manifest, variant: str | None) -> None:
        key = (manifest.name, manifest.version, variant or "")
        if self._model == key:
            return
        self._model = key
        self._ref = self._policy = None
        try:
            ref, self.source = reference_for(manifest, variant)
            policy = confidence_from_manifest(manifest) if ref else None
        except PackageError as exc:  # a malformed reference or policy: not monitored, said why
            ref, policy, self.source = {}, None, f"none: {exc}"
        hist = ref.get("histogram")
        self._ref = np.asarray(hist, dtype=np.float64) if hist and policy else None
        self._ref_offload = float(ref.get("offload", 0.0))
        t = ref.get("threshold")
        self._ref_threshold = float(t) if isinstance(t, int | float) and 0 <= t <= 1 else None
        self._policy = policy
        self._counts = np.zeros(len(hist) if hist else 1)
        self._n = self._offloaded = self._below = 0
        self.last = None

    def observe(
        self,
        manifest: Manifest | None,
        edge_outputs: Mapping[str, np.ndarray] | None,
        offloaded: bool,
        variant: str | None = None,
    ) -> dict[str, Any] | None:
        """Count one answer of ``variant`` (the one loaded); returns an alarm record when this
        one closed a drifted window."""
        if manifest is None or edge_outputs is None:
            return None
        with self._lock:
            self._bind(manifest, variant)
            if self._ref is None or self._policy is None:
                return None
            try:
                conf = float(self._policy.lowest(edge_outputs)[0])
            except Exception:  # outputs the policy cannot read: not this monitor's problem
                return None
            bins = len(self._counts)
            self._counts[min(int(max(conf, 0.0) * bins), bins - 1)] += 1
            self._n += 1
            self._offloaded += bool(offloaded)
            if self._ref_threshold is not None:
                self._below += conf < self._ref_threshold
            if self._n < self.window:
                return None
            hist = self._counts / self._n
            distance = 0.5 * float(np.abs(hist - self._ref).sum())
            live = self._offloaded / self._n
            offload = live if self._ref_threshold is None else self._below / self._n
            shift = abs(offload - self._ref_offload)
            alarm = distance > self.max_distance or shift > self.max_offload_shift
            self.windows += 1
            self.alarms += alarm
            self.last = {
                "model": manifest.name,
                "version": manifest.version,
                "variant": variant or "",
                "reference": self.source,
                "window": self._n,
                "distance": round(distance, 4),
                "max_distance": self.max_distance,
                "offload": round(offload, 4),
                "offload_at": self._ref_threshold,
                "live_offload": round(live, 4),
                "reference_offload": round(self._ref_offload, 4),
                "offload_shift": round(shift, 4),
                "max_offload_shift": self.max_offload_shift,
                "histogram": [round(float(v), 4) for v in hist],
                "alarm": alarm,
            }
            self._counts[:] = 0
            self._n = self._offloaded = self._below = 0
            return dict(self.last) if alarm else None

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {
                "windows": self.windows,
                "alarms": self.alarms,
                "last": self.last,
                "reference": self.source,
            }
