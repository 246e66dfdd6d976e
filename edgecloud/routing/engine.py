"""What every routing policy routes with: local slots, the regions, escalation and the results.

A ``Router`` is built once per client and shared by its policies (``routing.policies``), so a
policy is only the order in which it asks the edge and the cloud. It runs the local model on a
capacity slot already taken (``run_local``), scores it, asks the regions (``route``), and builds
every ``HybridResult`` the same way (``result``, ``cloud_result``, ``degraded``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgecloud.errors import ConfigError, EdgeCloudError, NoRouteError
from edgecloud.routing.capacity import CapacityLimiter
from edgecloud.routing.deadline import Deadline
from edgecloud.routing.escalation import Escalation
from edgecloud.routing.modes import Reason
from edgecloud.routing.regions import CloudInputs, CloudOutcome, Region, RegionSelector
from edgecloud.routing.result import HybridResult, ModelSlot
from edgecloud.transport.compact import downcast_fp16, quantize_int8, selects
from edgecloud.transport.v2 import InferRequest

__all__ = ["Router"]


class Router:
    """The machinery the policies share; see the module docstring."""

    __slots__ = (
        "_ids",
        "capacity",
        "clock",
        "cloud_inputs",
        "escalation",
        "selector",
        "upstream_fp16",
        "upstream_int8",
    )

    def __init__(
        self,
        capacity: CapacityLimiter,
        selector: RegionSelector,
        escalation: Escalation,
        *,
        cloud_inputs: CloudInputs | None = None,
        upstream_fp16: bool | frozenset[str] = False,
        upstream_int8: bool | frozenset[str] = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.selector = selector
        self.escalation = escalation
        self.cloud_inputs = cloud_inputs
        #: FP16 inputs upstream, to all regions or those named (edgecloud/transport/compact.py)
        self.upstream_fp16 = upstream_fp16
        #: INT8 (UINT8 + dequantize parameters) likewise; settings keep the two apart per region
        self.upstream_int8 = upstream_int8
        self.clock = clock
        self._ids = itertools.count()

    # -- the edge -------------------------------------------------------------------------------

    def run_local(
        self, slot: ModelSlot, feed: dict[str, np.ndarray]
    ) -> tuple[dict[str, Any], float]:
        """Run on a capacity slot already taken; release it; return outputs and seconds spent."""
        clock = self.clock
        t0 = clock()
        try:
            outputs = slot.backend.run_validated(feed)
        finally:
            self.capacity.release()
        spent = clock() - t0
        slot.local_ewma += 0.2 * (spent - slot.local_ewma)
        return outputs, spent

    @staticmethod
    def score(slot: ModelSlot, outputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
        policy = slot.confidence
        return None if policy is None else policy(outputs)

    def acquire(self, dl: Deadline, what: str) -> None:
        """A local slot within what is left of ``dl``, else ``NoRouteError`` saying ``what``."""
        left = dl.remaining()
        if not self.capacity.acquire(timeout=None if left == float("inf") else max(left, 0.0)):
            raise NoRouteError(what.format(left=left))

    # -- the cloud ------------------------------------------------------------------------------

    def requester(
        self, slot: ModelSlot | None, feed: dict[str, np.ndarray]
    ) -> Callable[[Region], InferRequest]:
        """How each region is asked for ``feed``: its model (or the local one's name), adapted."""
        default_model = slot.model if slot is not None else None
        client_adapter = self.cloud_inputs
        ids = self._ids
        fp16, int8 = self.upstream_fp16, self.upstream_int8

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
                model=model, inputs=inputs, version=region.version, id=f"ec-{next(ids)}"
            )
            if fp16 and selects(fp16, region.name):
                return downcast_fp16(req)
            if int8 and selects(int8, region.name):
                return quantize_int8(req)
            return req

        return make

    def route(
        self, slot: ModelSlot | None, feed: dict[str, np.ndarray], dl: Deadline
    ) -> CloudOutcome:
        """Ask the regions, best first, within ``dl``."""
        return self.selector.route(self.requester(slot, feed), dl)

    # -- results --------------------------------------------------------------------------------

    @staticmethod
    def result(
        slot: ModelSlot | None,
        outputs: dict[str, np.ndarray],
        source: str,
        reason: Reason,
        rows: np.ndarray | None,
        *,
        conf: float | None = None,
        **kw: Any,
    ) -> HybridResult:
        """A result carrying ``slot``'s identity; ``conf`` defaults to the lowest row's."""
        if conf is None and rows is not None:
            conf = float(rows.min())
        if slot is None:
            return HybridResult(
                outputs=outputs, source=source, reason=reason, confidence=conf,
                confidences=rows, **kw,
            )  # fmt: skip
        return HybridResult(
            outputs=outputs,
            source=source,
            reason=reason,
            confidence=conf,
            confidences=rows,
            model=slot.model,
            labels=slot.labels,
            score_output=slot.score_output,
            score_kind=slot.score_kind,
            version=slot.version,
            **kw,
        )

    def cloud_result(
        self,
        slot: ModelSlot | None,
        out: CloudOutcome,
        reason: Reason,
        local: float,
        local_outputs: dict[str, np.ndarray] | None = None,
    ) -> HybridResult:
        """The region's answer, scored by the local policy where the cloud's outputs allow."""
        assert out.response is not None
        assert out.region is not None
        outputs = out.response.outputs
        conf = None
        if slot is not None and slot.confidence is not None:
            try:
                conf = slot.confidence(outputs)
            except EdgeCloudError:
                conf = None  # the cloud model names its outputs differently: no confidence
        return self.result(
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

    def degraded(
        self,
        slot: ModelSlot,
        feed: dict[str, np.ndarray],
        errors: dict[str, EdgeCloudError],
        cloud_time: float,
        deadline_hit: bool,
    ) -> HybridResult:
        """The local answer, marked degraded, once the cloud was wanted and did not answer.

        The caller holds a local capacity slot.
        """
        outputs, local = self.run_local(slot, feed)
        if not self.selector.regions:
            reason = Reason.NO_REGIONS
        else:
            reason = Reason.DEADLINE if deadline_hit else Reason.CLOUD_FAILED
        return self.result(
            slot,
            outputs,
            "edge",
            reason,
            self.score(slot, outputs),
            degraded=True,
            local_time=local,
            cloud_time=cloud_time,
            errors=errors,
        )

    def saturated(self, slot: ModelSlot, feed: dict[str, np.ndarray], dl: Deadline) -> HybridResult:
        """The device is busy: the cloud first, then a blocking wait for a local slot."""
        errors: dict[str, EdgeCloudError] = {}
        cloud_time = 0.0
        deadline_hit = False
        if self.selector.regions:
            out = self.route(slot, feed, dl)
            if out.response is not None:
                return self.cloud_result(slot, out, Reason.NO_CAPACITY, 0.0)
            errors, cloud_time, deadline_hit = out.errors, out.cloud_time, out.deadline_hit
        wait = max(dl.remaining(), self.capacity.max_wait)
        if not self.capacity.acquire(timeout=None if wait == float("inf") else wait):
            raise NoRouteError(
                "device saturated (no local slot within "
                f"{wait:.3f} s) and no cloud region answered: "
                + ("; ".join(f"{n}: {e}" for n, e in errors.items()) or "no regions configured")
            )
        return self.degraded(slot, feed, errors, cloud_time, deadline_hit or dl.expired())

    def cloud_only(
        self, slot: ModelSlot | None, feed: dict[str, np.ndarray], dl: Deadline
    ) -> HybridResult:
        """The cloud's answer or ``NoRouteError``: no local fallback."""
        if not self.selector.regions:
            raise NoRouteError("mode cloud_only needs a cloud region, and none is configured")
        out = self.route(slot, feed, dl)
        if out.response is None:
            raise NoRouteError(
                "no cloud region answered: " + "; ".join(f"{n}: {e}" for n, e in out.errors.items())
            )
        return self.cloud_result(slot, out, Reason.FORCED, 0.0)
