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

Where things live: the settings (one schema with the config files) in ``edgecloud.settings``;
each mode is a policy object in ``routing.policies`` over the shared ``routing.engine.Router``;
the result and the model slot in ``routing.result``; regions are built in ``routing.factory``.
This module holds what is the client's own: construction, the model slot and its swap, the
in-flight count, and the lifecycle.

The hot path (step 1, 3 and a confident answer) is kept to attribute reads, one lock round trip
for the in-flight counter, the capacity check and three numpy reductions for the confidence; a
result's top-k labels are computed only when asked for.

Thread safety: one client serves any number of threads. The model (backend + manifest + policy)
sits in one immutable slot swapped by reference under a lock (``swap_model``), with an in-flight
count per slot so the caller can wait until the old backend is idle before closing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

import numpy as np

from edgecloud.config import ClientConfig, load_config
from edgecloud.errors import ConfigError, EdgeCloudError, RuntimeBackendError
from edgecloud.package.io import ModelPackage
from edgecloud.package.manifest import Manifest
from edgecloud.routing import escalation as _esc
from edgecloud.routing.batch import split_result, stack_batch
from edgecloud.routing.calibrated import confidence_from_manifest
from edgecloud.routing.capacity import CapacityLimiter, CpuLoadGate
from edgecloud.routing.confidence import ConfidencePolicy, CustomConfidence
from edgecloud.routing.deadline import Deadline
from edgecloud.routing.engine import Router
from edgecloud.routing.factory import RegionSpec, build_regions, reshape_adapter
from edgecloud.routing.modes import Mode, parse_mode
from edgecloud.routing.policies import EdgeFirst, RoutingPolicy, make_policies
from edgecloud.routing.prober import HealthProber
from edgecloud.routing.regions import Region, RegionHealth, RegionSelector, health_metrics
from edgecloud.routing.result import DEFAULT_THRESHOLD, HybridResult, ModelSlot, threshold_for
from edgecloud.runtime.base import Backend
from edgecloud.settings import (
    ClientOptions,
    ClientSettings,
    EscalationSettings,
    check_threshold,
)

__all__ = ["DEFAULT_THRESHOLD", "HybridClient", "HybridResult", "reshape_adapter"]


def _check_overrides(threshold: float | None, escalate: str | None) -> None:
    if threshold is not None:
        check_threshold(threshold)
    if escalate is not None:
        _esc.check_escalate(escalate)


class HybridClient:
    """Answers requests on the device or in the cloud; see the module docstring.

    Give it a package to load (``package`` + ``public_key``), or an already loaded ``backend``
    and its ``manifest`` (the device agent does this), or neither for a cloud-only client.
    Regions are ``Region`` objects, ``RegionConfig``s or mappings of the same keys. Settings
    come as a ``ClientSettings`` (``settings=``), as the flat keywords of ``ClientOptions``
    (``threshold=0.8``, ``max_concurrency=2``; they win over ``settings``), or both.
    ``escalation`` is an ``Escalation``, an ``EscalationSettings`` or a mapping of its fields.
    """

    def __init__(
        self,
        package: Path | str | ModelPackage | None = None,
        *,
        public_key: Any = None,
        backend: Backend | None = None,
        manifest: Manifest | None = None,
        regions: Sequence[RegionSpec] = (),
        settings: ClientSettings | None = None,
        escalation: _esc.Escalation | EscalationSettings | Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options: Unpack[ClientOptions],
    ) -> None:
        self._clock = clock
        self._closed = False
        self._owned_backend = False
        self._slot: ModelSlot | None = None
        s = (settings or ClientSettings()).with_options(**options)
        if isinstance(escalation, Mapping):
            try:
                escalation = EscalationSettings(**escalation)
            except TypeError as exc:
                raise ConfigError(f"escalation: {exc}") from None
        if isinstance(escalation, EscalationSettings):
            s = dataclasses.replace(s, escalation=escalation)
        #: Everything this client was configured with (``set_policy`` keeps it current).
        self.settings = s
        #: Background escalation, rate limit and audits (edgecloud/routing/escalation.py).
        self.escalation = (
            escalation
            if isinstance(escalation, _esc.Escalation)
            else _esc.Escalation.from_settings(s.escalation, clock=clock)
        )
        rs, loc = s.routing, s.local
        self._deadline = rs.deadline
        self._threshold = rs.threshold
        self._lock = threading.Condition(threading.Lock())
        self._retired: list[ModelSlot] = []
        gate = CpuLoadGate(loc.max_cpu_percent) if loc.max_cpu_percent is not None else None
        self.capacity = CapacityLimiter(
            loc.max_concurrency, max_queue=loc.max_queue, max_wait=loc.max_wait, cpu_gate=gate
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
                variant=loc.variant,
                providers=loc.providers,
                threads=loc.threads,
                inter_op_threads=loc.inter_op_threads,
                policy=loc.input_policy,
                require_signature=loc.require_signature,
            )
            manifest = backend.manifest
            self._owned_backend = True
        if backend is not None and manifest:
            self._slot = self._make_slot(backend, manifest)

        try:
            built = build_regions(regions, s.failover, clock=clock)
        except BaseException:
            self.close()
            raise
        self.selector = RegionSelector(built, clock=clock)
        cloud_inputs = (
            reshape_adapter(rs.cloud_input_shape)
            if rs.cloud_input_shape is not None
            else rs.cloud_inputs
        )
        self._router = Router(
            self.capacity,
            self.selector,
            self.escalation,
            cloud_inputs=cloud_inputs,
            upstream_fp16=rs.upstream_fp16,
            upstream_int8=rs.upstream_int8,
            clock=clock,
        )
        #: One policy object per mode (``routing.policies``); ``_policy`` is the client's mode.
        self._policies = make_policies(self._router)
        self._policy: RoutingPolicy = self._policies[parse_mode(rs.mode)]
        self.prober: HealthProber | None = None
        fo = s.failover
        if fo.probe_interval is not None and built:
            self.prober = HealthProber(
                self.selector,
                interval=fo.probe_interval,
                timeout=fo.probe_timeout,
                clock=clock,
                model_for=self._probe_model,
            ).start()

    @classmethod
    def from_config(cls, path: Path | str | ClientConfig, **overrides: Any) -> HybridClient:
        """Build a client from a TOML file (docs/routing.md); keyword ``overrides`` win."""
        cfg = path if isinstance(path, ClientConfig) else load_config(path)
        kwargs: dict[str, Any] = {
            "package": None if "backend" in overrides else cfg.package,
            "public_key": cfg.public_key,
            "regions": cfg.regions,
            "settings": cfg.settings,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def _make_slot(self, backend: Backend, manifest: Manifest) -> ModelSlot:
        spec = self.settings.routing.confidence
        policy: ConfidencePolicy | None
        if isinstance(spec, ConfidencePolicy):
            policy = spec
        elif isinstance(spec, str):
            policy = confidence_from_manifest(manifest, spec)
        elif callable(spec):
            policy = CustomConfidence(spec)
        else:
            raise ConfigError(f"confidence must be a name, a policy or a function, got {spec!r}")
        return ModelSlot(backend, manifest, policy, threshold_for(manifest, self._threshold))

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
        return self._policy.mode

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
        policy = self._policy if mode is None else self._policies[parse_mode(mode)]
        checked = None if threshold is None else check_threshold(threshold)
        with self._lock:
            self._policy = policy
            routing = dataclasses.replace(self.settings.routing, mode=policy.mode)
            if checked is not None:
                self._threshold = checked
                routing = dataclasses.replace(routing, threshold=checked)
                slot = self._slot
                if slot is not None:
                    slot.threshold = threshold_for(slot.manifest, checked)
            self.settings = dataclasses.replace(self.settings, routing=routing)

    def swap_model(self, backend: Backend, manifest: Manifest) -> Backend | None:
        """Make ``backend`` the model for new requests; return the old one (not closed).

        Requests already running finish on the old backend; ``wait_drained(old)`` returns once
        they have, after which the caller may close it.
        """
        new = self._make_slot(backend, manifest)
        with self._lock:
            # set_policy may have run since _make_slot read the threshold.
            new.threshold = threshold_for(manifest, self._threshold)
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

    def _find(self, backend: Backend | None) -> ModelSlot | None:
        if backend is None or (self._slot is not None and self._slot.backend is backend):
            return self._slot
        for s in self._retired:
            if s.backend is backend:
                return s
        return None

    def _enter(self) -> ModelSlot | None:
        """Bind a request to the active model: counted in flight until ``_leave``."""
        with self._lock:
            slot = self._slot
            if slot is not None:
                slot.inflight += 1
        return slot

    def _leave(self, slot: ModelSlot) -> None:
        with self._lock:
            slot.inflight -= 1
            if slot.inflight == 0 and slot is not self._slot:
                self._lock.notify_all()

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
        policy = self._policy if mode is None else self._policies[parse_mode(mode)]
        seconds = self._deadline if deadline is None else deadline
        if seconds is not None and not seconds > 0:
            raise ConfigError(f"deadline must be > 0 seconds or None, got {seconds!r}")
        start = self._clock()
        slot = self._enter()
        try:
            return policy.infer(slot, inputs, start, seconds, threshold, escalate)
        finally:
            if slot is not None:
                self._leave(slot)

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
        feed = stack_batch(self._slot, batch)
        n = next(iter(feed.values())).shape[0] if feed else 0
        if n == 0:
            return []
        policy = self._policy if mode is None else self._policies[parse_mode(mode)]
        if not isinstance(policy, EdgeFirst) or self._slot is None:
            return split_result(self.infer(feed, deadline=deadline, mode=policy.mode), n)
        dl = Deadline(self._deadline if deadline is None else deadline, clock=self._clock)
        slot = self._enter()
        assert slot is not None  # a slot is never unset once set
        try:
            return policy.infer_batch(slot, feed, n, dl)
        finally:
            self._leave(slot)

    # -- lifecycle ------------------------------------------------------------------------------

    def _probe_model(self, region: Region) -> str | None:
        """The model a region is asked about: its own ``model``, else the local model's name."""
        slot = self._slot
        return region.model or (slot.model if slot is not None else None)

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
