"""The four routing modes as policy objects behind one protocol (rules in docs/routing.md).

A client builds one of each over its ``Router`` (``make_policies``) and picks the one its mode
names for each request, so a mode is one small class: in what order it asks the edge and the
cloud, and what it answers when one of them cannot. ``EdgeFirst.infer`` on a confident answer is
the SDK's hot path: no ``Deadline``, one capacity check, one confidence reduction, one result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from edgecloud.errors import EdgeCloudError, NoRouteError
from edgecloud.routing import escalation as _esc
from edgecloud.routing.batch import row_result, split_result
from edgecloud.routing.deadline import Deadline
from edgecloud.routing.engine import Router
from edgecloud.routing.modes import Mode, Reason
from edgecloud.routing.regions import MIN_ATTEMPT
from edgecloud.routing.result import HybridResult, ModelSlot

__all__ = [
    "CloudFirst",
    "CloudOnly",
    "EdgeFirst",
    "EdgeOnly",
    "RoutingPolicy",
    "make_policies",
]


class RoutingPolicy(Protocol):
    """One routing mode: answers a request (or a batch) on ``slot``, the edge, or the regions.

    ``slot`` is the model bound to this request (None for a cloud-only client); ``inputs`` are
    not validated yet; ``start``/``seconds`` are the request's clock reading and deadline.
    """

    mode: Mode

    def infer(
        self,
        slot: ModelSlot | None,
        inputs: Mapping[str, Any],
        start: float,
        seconds: float | None,
        threshold: float | None = None,
        escalate: str | None = None,
    ) -> HybridResult: ...


class _Policy:
    mode: Mode

    def __init__(self, router: Router) -> None:
        self.router = router

    def infer(
        self,
        slot: ModelSlot | None,
        inputs: Mapping[str, Any],
        start: float,
        seconds: float | None,
        threshold: float | None = None,
        escalate: str | None = None,
    ) -> HybridResult:
        dl = Deadline(seconds, clock=self.router.clock, start=start)
        if slot is None:
            return self.router.cloud_only(
                None, {str(k): np.asarray(v) for k, v in inputs.items()}, dl
            )
        return self.route(slot, slot.backend.validate(inputs), dl)

    def route(self, slot: ModelSlot, feed: dict[str, np.ndarray], dl: Deadline) -> HybridResult:
        raise NotImplementedError


class EdgeOnly(_Policy):
    """Locally, always (offline operation, privacy); waits for a slot within the deadline."""

    mode = Mode.EDGE_ONLY

    def infer(
        self,
        slot: ModelSlot | None,
        inputs: Mapping[str, Any],
        start: float,
        seconds: float | None,
        threshold: float | None = None,
        escalate: str | None = None,
    ) -> HybridResult:
        if slot is None:
            raise NoRouteError("mode edge_only needs a local model, and this client has none")
        return super().infer(slot, inputs, start, seconds)

    def route(self, slot: ModelSlot, feed: dict[str, np.ndarray], dl: Deadline) -> HybridResult:
        r = self.router
        r.acquire(dl, "no local inference slot became free within {left:.3f} s")
        outputs, local = r.run_local(slot, feed)
        return r.result(
            slot, outputs, "edge", Reason.FORCED, r.score(slot, outputs), local_time=local
        )


class CloudOnly(_Policy):
    """The cloud, always; no local fallback (``NoRouteError`` when no region answers)."""

    mode = Mode.CLOUD_ONLY

    def route(self, slot: ModelSlot, feed: dict[str, np.ndarray], dl: Deadline) -> HybridResult:
        return self.router.cloud_only(slot, feed, dl)


class CloudFirst(_Policy):
    """The cloud; the local answer, degraded, when no region answers within the deadline."""

    mode = Mode.CLOUD_FIRST

    def route(self, slot: ModelSlot, feed: dict[str, np.ndarray], dl: Deadline) -> HybridResult:
        r = self.router
        errors: dict[str, EdgeCloudError] = {}
        cloud_time = 0.0
        deadline_hit = False
        if r.selector.regions:
            # Keep enough of the deadline to answer locally if the cloud fails.
            reserve = 2.0 * slot.local_ewma
            cloud_dl = dl
            if dl.expires_at is not None and reserve > 0:
                cloud_dl = Deadline(None, clock=r.clock)
                cloud_dl.expires_at = dl.expires_at - reserve
            out = r.route(slot, feed, cloud_dl)
            if out.response is not None:
                return r.cloud_result(slot, out, Reason.FORCED, 0.0)
            errors, cloud_time, deadline_hit = out.errors, out.cloud_time, out.deadline_hit
        left = dl.remaining()
        if not r.capacity.acquire(timeout=None if left == float("inf") else left):
            raise NoRouteError(
                "no cloud region answered and no local slot became free: "
                + "; ".join(f"{n}: {e}" for n, e in errors.items())
            )
        return r.degraded(slot, feed, errors, cloud_time, deadline_hit)


class EdgeFirst(_Policy):
    """Locally; the cloud when the answer is unsure or the device busy (the default)."""

    mode = Mode.EDGE_FIRST

    def infer(
        self,
        slot: ModelSlot | None,
        inputs: Mapping[str, Any],
        start: float,
        seconds: float | None,
        threshold: float | None = None,
        escalate: str | None = None,
    ) -> HybridResult:
        if slot is None:
            return super().infer(slot, inputs, start, seconds)
        feed = slot.backend.validate(inputs)
        r = self.router
        clock = r.clock
        budget = float("inf") if seconds is None else seconds - (clock() - start)
        if not r.capacity.try_acquire(budget):
            return r.saturated(slot, feed, Deadline(seconds, clock=clock, start=start))
        outputs, local = r.run_local(slot, feed)
        policy = slot.confidence
        if policy is None:
            return r.result(slot, outputs, "edge", Reason.NO_CONFIDENCE, None, local_time=local)
        conf, rows = policy.lowest(outputs)
        if conf >= (slot.threshold if threshold is None else threshold):
            # Positional: the confident answer is the hot path (see ModelSlot.identity).
            res = HybridResult(
                outputs, "edge", Reason.CONFIDENT, conf, False, local, 0.0, {}, rows,
                *slot.identity,
            )  # fmt: skip
            esc = r.escalation
            if esc.audit.rate and r.selector.regions and esc.audit():
                _esc.audit(r, slot, feed, res)
            return res
        return self._unsure(slot, feed, outputs, rows, conf, local, start, seconds, escalate)

    def _unsure(
        self,
        slot: ModelSlot,
        feed: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        rows: np.ndarray | None,
        conf: float,
        local: float,
        start: float,
        seconds: float | None,
        escalate: str | None,
    ) -> HybridResult:
        r = self.router
        dl = Deadline(seconds, clock=r.clock, start=start)
        if not r.selector.regions:
            return r.result(
                slot, outputs, "edge", Reason.NO_REGIONS, rows, conf=conf, degraded=True,
                local_time=local,
            )  # fmt: skip
        if not r.escalation.allow():
            limited: HybridResult = _esc.rate_limited(r, slot, outputs, rows, conf, local)
            return limited
        if (escalate or r.escalation.mode) == "background":
            now: HybridResult = _esc.background(r, slot, feed, outputs, rows, conf, local)
            return now
        if dl.remaining() < MIN_ATTEMPT:
            return r.result(
                slot, outputs, "edge", Reason.DEADLINE, rows, conf=conf, degraded=True,
                local_time=local,
            )  # fmt: skip
        out = r.route(slot, feed, dl)
        if out.response is not None:
            return r.cloud_result(slot, out, Reason.LOW_CONFIDENCE, local, outputs)
        return r.result(
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

    def infer_batch(
        self, slot: ModelSlot, feed: Mapping[str, Any], n: int, dl: Deadline
    ) -> list[HybridResult]:
        """The batch runs locally once; only its unsure rows go to the cloud, as one request.

        (Other modes route a batch as one request: ``HybridClient.infer_batch``.)
        """
        r = self.router
        valid = slot.backend.validate(feed)
        if not r.capacity.try_acquire(dl.remaining()):
            return split_result(r.saturated(slot, valid, dl), n)
        outputs, local = r.run_local(slot, valid)
        conf = r.score(slot, outputs)
        per_row = local / n
        if conf is None:
            return split_result(
                r.result(slot, outputs, "edge", Reason.NO_CONFIDENCE, None, local_time=local), n
            )
        unsure = np.flatnonzero(conf < slot.threshold)
        results = [
            row_result(r, slot, outputs, i, "edge", Reason.CONFIDENT, conf, local_time=per_row)
            for i in range(n)
        ]
        if unsure.size == 0:
            return results
        if not r.selector.regions or dl.remaining() < MIN_ATTEMPT:
            reason = Reason.NO_REGIONS if not r.selector.regions else Reason.DEADLINE
            for i in unsure:
                results[i] = row_result(
                    r, slot, outputs, int(i), "edge", reason, conf, degraded=True,
                    local_time=per_row,
                )  # fmt: skip
            return results
        sub = {k: v[unsure] for k, v in valid.items()}
        out = r.route(slot, sub, dl)
        if out.response is not None:
            cloud = r.cloud_result(slot, out, Reason.LOW_CONFIDENCE, per_row)
            for j, i in enumerate(unsure):
                results[i] = row_result(
                    r, slot, cloud.outputs, j, cloud.source, Reason.LOW_CONFIDENCE,
                    cloud.confidences, local_time=per_row, cloud_time=out.cloud_time,
                    errors=out.errors, local_outputs={k: v[i : i + 1] for k, v in outputs.items()},
                )  # fmt: skip
            return results
        reason = Reason.DEADLINE if out.deadline_hit else Reason.CLOUD_FAILED
        for i in unsure:
            results[i] = row_result(
                r, slot, outputs, int(i), "edge", reason, conf, degraded=True,
                local_time=per_row, cloud_time=out.cloud_time, errors=out.errors,
            )  # fmt: skip
        return results


#: The policy class of each mode.
POLICIES: dict[Mode, type[_Policy]] = {
    p.mode: p for p in (EdgeFirst, EdgeOnly, CloudOnly, CloudFirst)
}


def make_policies(router: Router) -> dict[Mode, RoutingPolicy]:
    """One policy object per mode over ``router``: what a client chooses from per request."""
    return {mode: cls(router) for mode, cls in POLICIES.items()}
