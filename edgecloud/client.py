"""HybridClient: the one call an application makes.

``client.infer(inputs)`` answers on the device when it can and in the nearest healthy cloud region
when it should, and always says which and why (``HybridResult.source`` and ``.reason``). The
routing rules are in docs/routing.md; in short, for the default ``edge_first`` mode:

1. validate the inputs once against the manifest (bad input is an ``InputError``, never routed);
2. take a local inference slot; if the device is saturated, go to the cloud at once
   (``no_capacity``) and come back for a slot only if no region answers;
3. run locally; a confident answer is returned (``confident``);
4. otherwise ask the regions, nearest healthy first, within what is left of the deadline
   (``low_confidence``); if none answers, return the local answer ``degraded`` with the reason
   (``cloud_failed`` or ``deadline``) and every region's error; never raise for that.

The hot path (step 1, 3 and a confident answer) is kept to attribute reads, one lock round trip
for the in-flight counter, the capacity check and three numpy reductions for the confidence; a
result's top-k labels are computed only when asked for.

Thread safety: one client serves any number of threads. The model (backend + manifest + policy)
sits in one immutable slot swapped by reference under a lock (``swap_model``), with an in-flight
count per slot so the caller can wait until the old backend is idle before closing it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from edgecloud.config import ClientConfig, RegionConfig, load_config
from edgecloud.errors import (
    ConfigError,
    EdgeCloudError,
    InputError,
    NoRouteError,
    RuntimeBackendError,
)
from edgecloud.package.io import ModelPackage
from edgecloud.package.manifest import Manifest
from edgecloud.routing import escalation as _esc
from edgecloud.routing.breaker import CircuitBreaker
from edgecloud.routing.capacity import CapacityLimiter, CpuLoadGate
from edgecloud.routing.confidence import (
    ConfidencePolicy,
    CustomConfidence,
    confidence_from_manifest,
    softmax,
)
from edgecloud.routing.deadline import Deadline
from edgecloud.routing.modes import Mode, Reason, parse_mode
from edgecloud.routing.regions import (
    MIN_ATTEMPT,
    CloudInputs,
    CloudOutcome,
    HealthProber,
    Region,
    RegionHealth,
    RegionSelector,
    health_metrics,
)
from edgecloud.runtime.base import Backend, InputPolicy
from edgecloud.transport.compact import check_setting, downcast_fp16, wants_fp16
from edgecloud.transport.v2 import InferRequest

__all__ = ["DEFAULT_THRESHOLD", "HybridClient", "HybridResult", "reshape_adapter"]

DEFAULT_THRESHOLD = 0.9
Shape = tuple[int, ...]


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


def _check_overrides(threshold: float | None, escalate: str | None) -> None:
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0.0 <= threshold <= 1.0
    ):
        raise ConfigError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if escalate is not None:
        _esc.check_escalate(escalate)


def reshape_adapter(shape: Shape | Mapping[str, Shape]) -> CloudInputs:
    """A ``cloud_inputs`` adapter reshaping each input to ``[batch, *shape]``.

    For a cloud model with another layout of the same data (the digits MLP takes [N, 64], the CNN
    [N, 1, 8, 8]); a mapping gives a shape per input name, inputs it omits pass unchanged.
    """
    per_input = dict(shape) if isinstance(shape, Mapping) else None
    fixed = tuple(shape) if per_input is None else ()  # type: ignore[arg-type]

    def adapt(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, arr in inputs.items():
            target = fixed if per_input is None else per_input.get(name)
            if target is None:
                out[name] = arr
                continue
            try:
                out[name] = arr.reshape((arr.shape[0], *target))
            except ValueError as exc:
                raise InputError(
                    f"input '{name}': cannot reshape {list(arr.shape)} to "
                    f"[batch, {', '.join(map(str, target))}] for the cloud model",
                    input_name=name,
                ) from exc
        return out

    return adapt


class _Slot:
    """The active model: swapped as one reference, counted while requests use it."""

    __slots__ = (
        "backend",
        "confidence",
        "inflight",
        "labels",
        "local_ewma",
        "manifest",
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
        self.confidence = confidence
        self.threshold = threshold
        self.inflight = 0
        self.labels = manifest.labels
        self.score_output = manifest.score_output if manifest.confidence != "none" else None
        self.score_kind = manifest.confidence
        self.local_ewma = 0.0
        self.version = manifest.version


class HybridClient:
    """Answers requests on the device or in the cloud; see the module docstring.

    Give it a package to load (``package`` + ``public_key``), or an already loaded ``backend``
    and its ``manifest`` (the device agent does this), or neither for a cloud-only client. Regions
    are ``Region`` objects or mappings like the config file's ``[[regions]]`` entries.
    """

    def __init__(
        self,
        package: Path | str | ModelPackage | None = None,
        *,
        public_key: Any = None,
        require_signature: bool = True,
        variant: str = "auto",
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        inter_op_threads: int | None = None,
        input_policy: InputPolicy | None = None,
        backend: Backend | None = None,
        manifest: Manifest | None = None,
        regions: Sequence[Region | Mapping[str, Any] | RegionConfig] = (),
        mode: Mode | str = Mode.EDGE_FIRST,
        threshold: float | Mapping[str, float] | None = None,
        confidence: str | ConfidencePolicy | Callable[..., Any] = "max_probability",
        deadline: float | None = 1.0,
        max_concurrency: int = 1,
        max_queue: int = 0,
        max_wait: float = 0.05,
        max_cpu_percent: float | None = None,
        cloud_inputs: CloudInputs | None = None,
        cloud_input_shape: Shape | Mapping[str, Shape] | None = None,
        probe_interval: float | None = 5.0,
        probe_timeout: float = 1.0,
        failure_threshold: int = 3,
        cooldown: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        escalation: _esc.Escalation | Mapping[str, Any] | None = None,
        upstream_fp16: bool | Sequence[str] = False,
    ) -> None:
        self._clock = clock
        #: FP16 inputs upstream, to all regions or those named (edgecloud/transport/compact.py)
        self._upstream_fp16 = check_setting(upstream_fp16)
        #: Background escalation, rate limit and audits (edgecloud/routing/escalation.py).
        self.escalation = (
            escalation
            if isinstance(escalation, _esc.Escalation)
            else _esc.Escalation(**dict(escalation or {}), clock=clock)
        )
        self._mode = parse_mode(mode)
        if deadline is not None and not deadline > 0:
            raise ConfigError(f"deadline must be > 0 seconds or None, got {deadline!r}")
        self._deadline = deadline
        self._threshold = threshold
        self._confidence_spec = confidence
        self._failure_threshold = failure_threshold
        self._cooldown = cooldown
        if cloud_inputs is not None and cloud_input_shape is not None:
            raise ConfigError("give cloud_inputs or cloud_input_shape, not both")
        self._cloud_inputs = (
            reshape_adapter(cloud_input_shape) if cloud_input_shape is not None else cloud_inputs
        )
        self._lock = threading.Condition(threading.Lock())
        self._closed = False
        self._ids = itertools.count()
        self._owned_backend = False
        self._retired: list[_Slot] = []
        gate = CpuLoadGate(max_cpu_percent) if max_cpu_percent is not None else None
        self.capacity = CapacityLimiter(
            max_concurrency, max_queue=max_queue, max_wait=max_wait, cpu_gate=gate
        )

        if backend is not None or manifest is not None:
            if package is not None:
                raise ConfigError("give either package or backend+manifest, not both")
            if backend is None or manifest is None:
                raise ConfigError("backend and manifest must be given together")
        elif package is not None:
            from edgecloud.runtime.loader import load_backend

            backend = load_backend(
                package,
                public_key=public_key,
                variant=variant,
                providers=providers,
                threads=threads,
                inter_op_threads=inter_op_threads,
                policy=input_policy,
                require_signature=require_signature,
            )
            manifest = backend.manifest
            self._owned_backend = True
        self._slot: _Slot | None = (
            self._make_slot(backend, manifest) if backend is not None and manifest else None
        )

        built: list[Region] = []
        try:
            for r in regions:
                built.append(self._region(r))
        except BaseException:
            for b in built:
                b.transport.close()
            self.close()
            raise
        self.selector = RegionSelector(built, clock=clock)
        self.prober: HealthProber | None = None
        if probe_interval is not None and built:
            self.prober = HealthProber(
                self.selector,
                interval=probe_interval,
                timeout=probe_timeout,
                clock=clock,
                model_for=self._probe_model,
            ).start()

    # -- construction helpers -------------------------------------------------------------------

    @classmethod
    def from_config(cls, path: Path | str | ClientConfig, **overrides: Any) -> HybridClient:
        """Build a client from a TOML file (docs/routing.md); keyword ``overrides`` win."""
        cfg = path if isinstance(path, ClientConfig) else load_config(path)
        kwargs: dict[str, Any] = {
            "package": cfg.package,
            "public_key": cfg.public_key,
            "require_signature": cfg.require_signature,
            "variant": cfg.variant,
            "providers": cfg.providers,
            "threads": cfg.threads,
            "inter_op_threads": cfg.inter_op_threads,
            "input_policy": InputPolicy(
                allow_cast=cfg.allow_cast,
                allow_int_to_float=cfg.allow_int_to_float,
                nonfinite=cfg.nonfinite,  # type: ignore[arg-type]
            ),
            "regions": cfg.regions,
            "mode": cfg.mode,
            "threshold": cfg.threshold,
            "confidence": cfg.confidence,
            "deadline": cfg.deadline,
            "max_concurrency": cfg.max_concurrency,
            "max_queue": cfg.max_queue,
            "max_wait": cfg.max_wait,
            "max_cpu_percent": cfg.max_cpu_percent,
            "cloud_input_shape": cfg.cloud_input_shape,
            "probe_interval": cfg.probe_interval,
            "probe_timeout": cfg.probe_timeout,
            "failure_threshold": cfg.failure_threshold,
            "cooldown": cfg.cooldown,
            "escalation": {
                "escalate": cfg.escalate,
                "audit_rate": cfg.audit_rate,
                "rate_limit": cfg.escalation_rate_limit,
            },
        }
        if "backend" in overrides:
            kwargs["package"] = None
        kwargs.update(overrides)
        return cls(**kwargs)

    def _region(self, spec: Region | Mapping[str, Any] | RegionConfig) -> Region:
        if isinstance(spec, Region):
            return spec
        if isinstance(spec, RegionConfig):
            spec = {
                "name": spec.name,
                "endpoint": spec.endpoint,
                "model": spec.model,
                "version": spec.version,
                "priority": spec.priority,
                "timeout": spec.timeout,
                "cloud_input_shape": spec.cloud_input_shape,
                "options": spec.options,
            }
        if not isinstance(spec, Mapping):
            raise ConfigError(f"a region must be a Region or a mapping, got {type(spec).__name__}")
        known = {
            "name", "endpoint", "model", "version", "priority", "timeout",
            "cloud_input_shape", "cloud_inputs", "options", "transport",
        }  # fmt: skip
        unknown = sorted(set(spec) - known)
        name = spec.get("name")
        if unknown:
            raise ConfigError(f"region {name!r}: unknown key(s) {unknown}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a region needs a 'name', got {spec!r}")
        transport = spec.get("transport")
        if transport is None:
            endpoint = spec.get("endpoint")
            if endpoint is None:
                raise ConfigError(f"region '{name}': needs an 'endpoint' or a 'transport'")
            from edgecloud.transport import open_transport

            transport = open_transport(endpoint, region=name, **dict(spec.get("options") or {}))
        adapter = spec.get("cloud_inputs")
        shape = spec.get("cloud_input_shape")
        if adapter is not None and shape is not None:
            raise ConfigError(f"region '{name}': give cloud_inputs or cloud_input_shape, not both")
        if shape is not None:
            adapter = reshape_adapter(shape)
        return Region(
            name,
            transport,
            priority=int(spec.get("priority") or 0),
            model=spec.get("model"),
            version=spec.get("version"),
            timeout=spec.get("timeout"),
            cloud_inputs=adapter,
            breaker=CircuitBreaker(self._failure_threshold, self._cooldown, clock=self._clock),
        )

    def _make_slot(self, backend: Backend, manifest: Manifest) -> _Slot:
        spec = self._confidence_spec
        policy: ConfidencePolicy | None
        if isinstance(spec, ConfidencePolicy):
            policy = spec
        elif isinstance(spec, str):
            policy = confidence_from_manifest(manifest, spec)
        elif callable(spec):
            policy = CustomConfidence(spec)
        else:
            raise ConfigError(f"confidence must be a name, a policy or a function, got {spec!r}")
        return _Slot(backend, manifest, policy, self._threshold_for(manifest, self._threshold))

    @staticmethod
    def _threshold_for(manifest: Manifest, t: float | Mapping[str, float] | None) -> float:
        if isinstance(t, Mapping):
            default = t.get("*", manifest.metadata.get("confidence_threshold", DEFAULT_THRESHOLD))
            return float(t.get(manifest.name, default))
        if t is None:
            return float(manifest.metadata.get("confidence_threshold", DEFAULT_THRESHOLD))
        return float(t)

    # -- model swap -----------------------------------------------------------------------------

    @property
    def backend(self) -> Backend | None:
        slot = self._slot
        return None if slot is None else slot.backend

    @property
    def manifest(self) -> Manifest | None:
        slot = self._slot
        return None if slot is None else slot.manifest

    @property
    def threshold(self) -> float | None:
        slot = self._slot
        return None if slot is None else slot.threshold

    @property
    def mode(self) -> Mode:
        """The routing mode new requests use when ``infer`` is given none (``set_policy``)."""
        return self._mode

    def set_policy(
        self,
        *,
        mode: Mode | str | None = None,
        threshold: float | Mapping[str, float] | None = None,
    ) -> None:
        """Change the routing policy for new requests; ``None`` leaves that part unchanged.

        For a fleet controller or an operator changing the policy of a running client: both
        values are validated before anything changes (a bad one is a ``ConfigError`` naming
        it), then applied together under the client's lock to the active model and remembered
        for models swapped in later, exactly like the constructor's ``mode``/``threshold``.
        Requests already running keep the policy they started with.
        """
        new_mode = self._mode if mode is None else parse_mode(mode)
        if threshold is not None:
            items = threshold.items() if isinstance(threshold, Mapping) else [("", threshold)]
            for name, value in items:
                what = f"threshold for '{name}'" if name else "threshold"
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not 0.0 <= float(value) <= 1.0
                ):
                    raise ConfigError(f"{what} must be a number in [0, 1], got {value!r}")
            if isinstance(threshold, Mapping):
                threshold = {str(k): float(v) for k, v in threshold.items()}
            else:
                threshold = float(threshold)
        with self._lock:
            self._mode = new_mode
            if threshold is not None:
                self._threshold = threshold
                slot = self._slot
                if slot is not None:
                    slot.threshold = self._threshold_for(slot.manifest, threshold)

    def swap_model(self, backend: Backend, manifest: Manifest) -> Backend | None:
        """Make ``backend`` the model for new requests; return the old one (not closed).

        Requests already running finish on the old backend; ``wait_drained(old)`` returns once
        they have, after which the caller may close it.
        """
        new = self._make_slot(backend, manifest)
        with self._lock:
            # set_policy may have run since _make_slot read the threshold.
            new.threshold = self._threshold_for(manifest, self._threshold)
            old = self._slot
            self._slot = new
            if old is not None:
                self._retired.append(old)
        return None if old is None else old.backend

    def inflight(self, backend: Backend | None = None) -> int:
        """Requests currently running on ``backend`` (default: the active one)."""
        with self._lock:
            slot = self._find(backend)
            return 0 if slot is None else slot.inflight

    def wait_drained(self, backend: Backend, timeout: float | None = None) -> bool:
        """Wait until no request runs on ``backend``; False if ``timeout`` passed first."""
        with self._lock:
            slot = self._find(backend)
            if slot is None:
                return True
            ok = self._lock.wait_for(lambda: slot.inflight == 0, timeout)
            if ok and slot in self._retired:
                self._retired.remove(slot)
            return ok

    def _find(self, backend: Backend | None) -> _Slot | None:
        if backend is None or (self._slot is not None and self._slot.backend is backend):
            return self._slot
        for s in self._retired:
            if s.backend is backend:
                return s
        return None

    # -- inference ------------------------------------------------------------------------------

    def infer(
        self,
        inputs: Mapping[str, Any],
        *,
        deadline: float | None = None,
        mode: Mode | str | None = None,
        threshold: float | None = None,
        escalate: str | None = None,
    ) -> HybridResult:
        """Answer one request (any batch size routes as one unit: its least confident row).

        ``threshold`` overrides the model's for this request; ``escalate`` ("sync" or
        "background") the client's escalation mode (edgecloud/routing/escalation.py)."""
        if threshold is not None or escalate is not None:
            _check_overrides(threshold, escalate)
        if self._closed:
            raise RuntimeBackendError("HybridClient is closed")
        m = self._mode if mode is None else parse_mode(mode)
        seconds = self._deadline if deadline is None else deadline
        if seconds is not None and not seconds > 0:
            raise ConfigError(f"deadline must be > 0 seconds or None, got {seconds!r}")
        start = self._clock()
        lock = self._lock
        with lock:
            slot = self._slot
            if slot is not None:
                slot.inflight += 1
        try:
            if slot is not None and m is Mode.EDGE_FIRST:
                feed = slot.backend.validate(inputs)
                return self._edge_first(slot, feed, start, seconds, threshold, escalate)
            dl = Deadline(seconds, clock=self._clock, start=start)
            return self._route(slot, inputs, m, dl)
        finally:
            if slot is not None:
                with lock:
                    slot.inflight -= 1
                    if slot.inflight == 0 and slot is not self._slot:
                        lock.notify_all()

    async def ainfer(
        self,
        inputs: Mapping[str, Any],
        *,
        deadline: float | None = None,
        mode: Mode | str | None = None,
        threshold: float | None = None,
        escalate: str | None = None,
    ) -> HybridResult:
        """``infer`` on a worker thread: an event loop is never blocked by a model or a region."""
        return await asyncio.to_thread(
            self.infer, inputs, deadline=deadline, mode=mode, threshold=threshold, escalate=escalate
        )

    def _route(
        self, slot: _Slot | None, inputs: Mapping[str, Any], mode: Mode, dl: Deadline
    ) -> HybridResult:
        if slot is None:
            if mode is Mode.EDGE_ONLY:
                raise NoRouteError("mode edge_only needs a local model, and this client has none")
            feed = {str(k): np.asarray(v) for k, v in inputs.items()}
            return self._cloud_only(slot, feed, dl)
        feed = slot.backend.validate(inputs)
        if mode is Mode.EDGE_FIRST:
            return self._edge_first(slot, feed, dl.start, dl.seconds)
        if mode is Mode.EDGE_ONLY:
            return self._edge(slot, feed, dl, Reason.FORCED, wait=True)
        if mode is Mode.CLOUD_ONLY:
            return self._cloud_only(slot, feed, dl)
        return self._cloud_first(slot, feed, dl)

    def _run_local(self, slot: _Slot, feed: dict[str, np.ndarray]) -> tuple[dict[str, Any], float]:
        """Run on a slot already taken; release it; return outputs and seconds spent."""
        clock = self._clock
        t0 = clock()
        try:
            outputs = slot.backend.run_validated(feed)
        finally:
            self.capacity.release()
        spent = clock() - t0
        slot.local_ewma += 0.2 * (spent - slot.local_ewma)
        return outputs, spent

    def _score(self, slot: _Slot, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        policy = slot.confidence
        if policy is None:
            return None
        return policy(outputs)

    def _result(
        self,
        slot: _Slot | None,
        outputs: dict[str, np.ndarray],
        source: str,
        reason: Reason,
        rows: np.ndarray | None,
        *,
        conf: float | None = None,
        **kw: Any,
    ) -> HybridResult:
        if conf is None and rows is not None:
            conf = float(rows.min())
        return HybridResult(
            outputs,
            source,
            reason,
            conf,
            confidences=rows,
            model=slot.manifest.name if slot is not None else "",
            labels=slot.labels if slot is not None else (),
            score_output=slot.score_output if slot is not None else None,
            score_kind=slot.score_kind if slot is not None else "logits",
            version=slot.version if slot is not None else "",
            **kw,
        )

    def _edge_first(
        self,
        slot: _Slot,
        feed: dict[str, np.ndarray],
        start: float,
        seconds: float | None,
        threshold: float | None = None,
        escalate: str | None = None,
    ) -> HybridResult:
        """The default path; the confident case is the hot path, so it builds no Deadline."""
        clock = self._clock
        budget = float("inf") if seconds is None else seconds - (clock() - start)
        if not self.capacity.try_acquire(budget):
            return self._saturated(slot, feed, Deadline(seconds, clock=clock, start=start))
        outputs, local = self._run_local(slot, feed)
        policy = slot.confidence
        if policy is None:
            return self._result(slot, outputs, "edge", Reason.NO_CONFIDENCE, None, local_time=local)
        conf, rows = policy.lowest(outputs)
        if conf >= (slot.threshold if threshold is None else threshold):
            r = HybridResult(
                outputs,
                "edge",
                Reason.CONFIDENT,
                conf,
                False,
                local,
                0.0,
                {},
                rows,
                slot.manifest.name,
                slot.labels,
                slot.score_output,
                slot.score_kind,
                slot.version,
            )
            esc = self.escalation
            if esc.audit.rate and self.selector.regions and esc.audit():
                _esc.audit(self, slot, feed, r)
            return r
        dl = Deadline(seconds, clock=clock, start=start)
        if not self.selector.regions:
            return self._result(
                slot, outputs, "edge", Reason.NO_REGIONS, rows, conf=conf, degraded=True,
                local_time=local,
            )  # fmt: skip
        if not self.escalation.allow():
            limited: HybridResult = _esc.rate_limited(self, slot, outputs, rows, conf, local)
            return limited
        if (escalate or self.escalation.mode) == "background":
            now: HybridResult = _esc.background(self, slot, feed, outputs, rows, conf, local)
            return now
        if dl.remaining() < MIN_ATTEMPT:
            return self._result(
                slot, outputs, "edge", Reason.DEADLINE, rows, conf=conf, degraded=True,
                local_time=local,
            )  # fmt: skip
        out = self.selector.route(self._requester(slot, feed), dl)
        if out.response is not None:
            return self._cloud_result(slot, out, Reason.LOW_CONFIDENCE, local, outputs)
        return self._result(
            slot,
            outputs,
            "edge",
            Reason.DEADLINE if out.deadline_hit else Reason.CLOUD_FAILED,
            rows,
            conf=conf,
            degraded=True,
            local_time=local,
            cloud_time=out.cloud_time,
            errors=out.errors,
        )

    def _saturated(self, slot: _Slot, feed: dict[str, np.ndarray], dl: Deadline) -> HybridResult:
        """The device is busy: the cloud first, then a blocking wait for a local slot."""
        errors: dict[str, EdgeCloudError] = {}
        cloud_time = 0.0
        deadline_hit = False
        if self.selector.regions:
            out = self.selector.route(self._requester(slot, feed), dl)
            if out.response is not None:
                return self._cloud_result(slot, out, Reason.NO_CAPACITY, 0.0)
            errors, cloud_time, deadline_hit = out.errors, out.cloud_time, out.deadline_hit
        wait = max(dl.remaining(), self.capacity.max_wait)
        if not self.capacity.acquire(timeout=None if wait == float("inf") else wait):
            raise NoRouteError(
                "device saturated (no local slot within "
                f"{wait:.3f} s) and no cloud region answered: "
                + ("; ".join(f"{n}: {e}" for n, e in errors.items()) or "no regions configured")
            )
        return self._degraded(slot, feed, errors, cloud_time, deadline_hit or dl.expired())

    def _edge(
        self, slot: _Slot, feed: dict[str, np.ndarray], dl: Deadline, reason: Reason, *, wait: bool
    ) -> HybridResult:
        left = dl.remaining()
        if not self.capacity.acquire(timeout=None if left == float("inf") else max(left, 0.0)):
            raise NoRouteError(f"no local inference slot became free within {left:.3f} s")
        outputs, local = self._run_local(slot, feed)
        return self._result(
            slot, outputs, "edge", reason, self._score(slot, outputs), local_time=local
        )

    def _cloud_only(
        self, slot: _Slot | None, feed: dict[str, np.ndarray], dl: Deadline
    ) -> HybridResult:
        if not self.selector.regions:
            raise NoRouteError("mode cloud_only needs a cloud region, and none is configured")
        out = self.selector.route(self._requester(slot, feed), dl)
        if out.response is None:
            raise NoRouteError(
                "no cloud region answered: " + "; ".join(f"{n}: {e}" for n, e in out.errors.items())
            )
        return self._cloud_result(slot, out, Reason.FORCED, 0.0)

    def _cloud_first(self, slot: _Slot, feed: dict[str, np.ndarray], dl: Deadline) -> HybridResult:
        errors: dict[str, EdgeCloudError] = {}
        cloud_time = 0.0
        deadline_hit = False
        if self.selector.regions:
            # Keep enough of the deadline to answer locally if the cloud fails.
            reserve = 2.0 * slot.local_ewma
            cloud_dl = dl
            if dl.expires_at is not None and reserve > 0:
                cloud_dl = Deadline(None, clock=self._clock)
                cloud_dl.expires_at = dl.expires_at - reserve
            out = self.selector.route(self._requester(slot, feed), cloud_dl)
            if out.response is not None:
                return self._cloud_result(slot, out, Reason.FORCED, 0.0)
            errors, cloud_time, deadline_hit = out.errors, out.cloud_time, out.deadline_hit
        left = dl.remaining()
        if not self.capacity.acquire(timeout=None if left == float("inf") else left):
            raise NoRouteError(
                "no cloud region answered and no local slot became free: "
                + "; ".join(f"{n}: {e}" for n, e in errors.items())
            )
        return self._degraded(slot, feed, errors, cloud_time, deadline_hit)

    def _degraded(
        self,
        slot: _Slot,
        feed: dict[str, np.ndarray],
        errors: dict[str, EdgeCloudError],
        cloud_time: float,
        deadline_hit: bool,
    ) -> HybridResult:
        """The local answer, marked degraded, once the cloud was wanted and did not answer.

        The caller holds a local capacity slot.
        """
        outputs, local = self._run_local(slot, feed)
        if not self.selector.regions:
            reason = Reason.NO_REGIONS
        else:
            reason = Reason.DEADLINE if deadline_hit else Reason.CLOUD_FAILED
        return self._result(
            slot,
            outputs,
            "edge",
            reason,
            self._score(slot, outputs),
            degraded=True,
            local_time=local,
            cloud_time=cloud_time,
            errors=errors,
        )

    def _requester(
        self, slot: _Slot | None, feed: dict[str, np.ndarray]
    ) -> Callable[[Region], InferRequest]:
        default_model = slot.manifest.name if slot is not None else None
        client_adapter = self._cloud_inputs

        def make(region: Region) -> InferRequest:
            model = region.model or default_model
            if model is None:
                raise ConfigError(
                    f"region '{region.name}': no 'model' configured and no local manifest to "
                    "take the name from"
                )
            adapter = region.cloud_inputs or client_adapter
            inputs = adapter(feed) if adapter is not None else feed
            req = InferRequest(
                model=model,
                inputs=inputs,
                version=region.version,
                id=f"ec-{next(self._ids)}",
            )
            return downcast_fp16(req) if wants_fp16(self._upstream_fp16, region.name) else req

        return make

    def _cloud_result(
        self,
        slot: _Slot | None,
        out: CloudOutcome,
        reason: Reason,
        local: float,
        local_outputs: dict[str, np.ndarray] | None = None,
    ) -> HybridResult:
        assert out.response is not None
        assert out.region is not None
        outputs = out.response.outputs
        conf = None
        if slot is not None and slot.confidence is not None:
            try:
                conf = slot.confidence(outputs)
            except EdgeCloudError:
                conf = None  # the cloud model names its outputs differently: no confidence
        return self._result(
            slot,
            outputs,
            f"cloud:{out.region.name}",
            reason,
            conf,
            local_time=local,
            cloud_time=out.cloud_time,
            errors=out.errors,
            local_outputs=local_outputs,
        )

    # -- batches --------------------------------------------------------------------------------

    def infer_batch(
        self,
        batch: Sequence[Mapping[str, Any]] | Mapping[str, Any] | np.ndarray,
        *,
        deadline: float | None = None,
        mode: Mode | str | None = None,
    ) -> list[HybridResult]:
        """Answer many samples; one result per sample (row), in order.

        ``batch`` is a list of per-sample input mappings (each with or without its batch axis),
        a mapping of batched arrays, or, for a one-input model, one batched array. In
        ``edge_first`` mode the batch runs locally once and only its unsure rows go to the cloud,
        as one sub-batch request; other modes route the whole batch as one request.
        """
        if self._closed:
            raise RuntimeBackendError("HybridClient is closed")
        feed = self._stack(batch)
        n = next(iter(feed.values())).shape[0] if feed else 0
        if n == 0:
            return []
        m = self._mode if mode is None else parse_mode(mode)
        if m is not Mode.EDGE_FIRST or self._slot is None:
            return self._split(self.infer(feed, deadline=deadline, mode=m), n)
        dl = Deadline(self._deadline if deadline is None else deadline, clock=self._clock)
        with self._lock:
            slot = self._slot
            slot.inflight += 1
        try:
            return self._batch_edge_first(slot, feed, n, dl)
        finally:
            with self._lock:
                slot.inflight -= 1
                if slot.inflight == 0 and slot is not self._slot:
                    self._lock.notify_all()

    def _stack(
        self, batch: Sequence[Mapping[str, Any]] | Mapping[str, Any] | np.ndarray
    ) -> dict[str, np.ndarray]:
        slot = self._slot
        specs = {s.name: s for s in slot.manifest.inputs} if slot is not None else {}
        if isinstance(batch, np.ndarray):
            if len(specs) != 1:
                raise InputError(
                    "a bare array needs a one-input model; pass a mapping of input name -> array"
                )
            return {next(iter(specs)): batch}
        if isinstance(batch, Mapping):
            return {str(k): np.asarray(v) for k, v in batch.items()}
        items = list(batch)
        if not items:
            return {}
        names = list(items[0].keys())
        out = {}
        for name in names:
            arrs = []
            for i, item in enumerate(items):
                if not isinstance(item, Mapping) or name not in item:
                    raise InputError(f"batch item {i}: missing input '{name}'", input_name=name)
                arrs.append(np.asarray(item[name]))
            rank = len(specs[name].shape) if name in specs else arrs[0].ndim + 1
            if all(a.ndim == rank - 1 for a in arrs):
                out[name] = np.stack(arrs)
            else:
                try:
                    out[name] = np.concatenate(arrs)
                except ValueError as exc:
                    raise InputError(
                        f"input '{name}': batch items have incompatible shapes "
                        f"{[list(a.shape) for a in arrs]}",
                        input_name=name,
                    ) from exc
        return out

    def _batch_edge_first(
        self, slot: _Slot, feed: Mapping[str, Any], n: int, dl: Deadline
    ) -> list[HybridResult]:
        valid = slot.backend.validate(feed)
        if not self.capacity.try_acquire(dl.remaining()):
            return self._split(self._saturated(slot, valid, dl), n)
        outputs, local = self._run_local(slot, valid)
        conf = self._score(slot, outputs)
        per_row_local = local / n
        if conf is None:
            return self._split(
                self._result(slot, outputs, "edge", Reason.NO_CONFIDENCE, None, local_time=local),
                n,
            )
        unsure = np.flatnonzero(conf < slot.threshold)
        results = [
            self._row(slot, outputs, i, "edge", Reason.CONFIDENT, conf, local_time=per_row_local)
            for i in range(n)
        ]
        if unsure.size == 0:
            return results
        if not self.selector.regions or dl.remaining() < MIN_ATTEMPT:
            reason = Reason.NO_REGIONS if not self.selector.regions else Reason.DEADLINE
            for i in unsure:
                results[i] = self._row(
                    slot, outputs, int(i), "edge", reason, conf, degraded=True,
                    local_time=per_row_local,
                )  # fmt: skip
            return results
        sub = {k: v[unsure] for k, v in valid.items()}
        out = self.selector.route(self._requester(slot, sub), dl)
        if out.response is not None:
            cloud = self._cloud_result(slot, out, Reason.LOW_CONFIDENCE, per_row_local)
            ccloud = cloud.confidences
            for j, i in enumerate(unsure):
                results[i] = self._row(
                    slot, cloud.outputs, j, cloud.source, Reason.LOW_CONFIDENCE, ccloud,
                    local_time=per_row_local, cloud_time=out.cloud_time, errors=out.errors,
                    local_outputs={k: v[i : i + 1] for k, v in outputs.items()},
                )  # fmt: skip
            return results
        reason = Reason.DEADLINE if out.deadline_hit else Reason.CLOUD_FAILED
        for i in unsure:
            results[i] = self._row(
                slot, outputs, int(i), "edge", reason, conf, degraded=True,
                local_time=per_row_local, cloud_time=out.cloud_time, errors=out.errors,
            )  # fmt: skip
        return results

    def _row(
        self,
        slot: _Slot,
        outputs: Mapping[str, np.ndarray],
        i: int,
        source: str,
        reason: Reason,
        conf: np.ndarray | None,
        **kw: Any,
    ) -> HybridResult:
        row = {k: v[i : i + 1] for k, v in outputs.items()}
        c = None if conf is None else conf[i : i + 1]
        return self._result(slot, row, source, reason, c, **kw)

    def _split(self, result: HybridResult, n: int) -> list[HybridResult]:
        if n == 1:
            return [result]
        out = []
        for i in range(n):
            c = None if result.confidences is None else result.confidences[i : i + 1]
            out.append(
                HybridResult(
                    {k: v[i : i + 1] for k, v in result.outputs.items()},
                    result.source,
                    result.reason,
                    None if c is None else float(c[0]),
                    degraded=result.degraded,
                    local_time=result.local_time / n,
                    cloud_time=result.cloud_time,
                    errors=result.errors,
                    confidences=c,
                    model=result.model,
                    labels=result.labels,
                    score_output=result.score_output,
                    score_kind=result.score_kind,
                    version=result.version,
                    local_outputs=None
                    if result.local_outputs is None
                    else {k: v[i : i + 1] for k, v in result.local_outputs.items()},
                )
            )
        return out

    # -- lifecycle ------------------------------------------------------------------------------

    def _probe_model(self, region: Region) -> str | None:
        """The model a region is asked about: its own ``model``, else the local model's name."""
        slot = self._slot
        return region.model or (slot.manifest.name if slot is not None else None)

    def region_health(self) -> list[RegionHealth]:
        """Per region: readiness, failures by kind, the error retrying will not fix, features."""
        return self.selector.health() if hasattr(self, "selector") else []

    def region_metrics(self) -> str:
        """``region_health()`` as Prometheus text (``routing.regions.health_metrics``)."""
        return health_metrics(self.region_health())

    def regions_status(self) -> list[dict[str, Any]]:
        """Every region's breaker state, smoothed RTT and counters, best first."""
        return self.selector.status() if hasattr(self, "selector") else []

    def close(self) -> None:
        """Stop the prober, close the transports and the backend this client loaded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        prober = getattr(self, "prober", None)
        if prober is not None:
            prober.stop()
        selector = getattr(self, "selector", None)
        if selector is not None:
            for r in selector.regions:
                try:
                    r.transport.close()
                except EdgeCloudError:
                    pass
        self.escalation.close()
        slot = self._slot
        if self._owned_backend and slot is not None:
            slot.backend.close()

    def __enter__(self) -> HybridClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
