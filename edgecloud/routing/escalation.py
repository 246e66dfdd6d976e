"""Escalation controls: background escalation, a per-device rate limit, audits.

Groundlight-style controls over *how* an unsure answer goes to the cloud, composed by one
``Escalation`` object the client owns (``HybridClient(escalation=...)``, or ``client.escalation``
changed at run time with ``configure``):

- ``escalate="sync"`` (default): the caller waits for the cloud, as before.
- ``escalate="background"``: the local answer is returned at once (``reason = "background"``,
  not degraded) and ``result.cloud_future`` (a ``concurrent.futures.Future[HybridResult]``)
  resolves with the cloud's answer later, or with the local answer marked degraded if no region
  answered. Listeners (``escalation.listeners``) see every finished escalation, which is how the
  device agent puts them into telemetry.
- ``rate_limit`` / ``burst``: a token bucket on escalations per second for this device. An
  unsure request over the limit is answered locally, ``degraded``, ``reason = "rate_limited"``;
  so a bad camera cannot flood the cloud.
- ``audit_rate``: that fraction of *confident* answers is also sent to the cloud in the
  background; ``stats()["audits"]`` counts agreement (edgecloud/routing/audit.py). Audits do not
  take escalation tokens: they are a measurement, bounded by their own rate.

Background work runs on ``workers`` daemon threads fed by a queue of at most ``max_queue``
requests; when it is full a new escalation or audit is dropped and counted, never queued
without bound. The inputs are copied when queued (the caller may reuse its arrays). Each cloud
call has its own ``deadline`` (seconds), independent of the request's, since nobody waits.
The clock is injected for the limiter's tests.

Failure modes: a dropped background escalation resolves its future at once with the local
answer ``degraded`` (``reason = "cloud_failed"``, ``errors = {"background": ...}``); ``close``
stops the workers and resolves what is still queued the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from edgecloud.errors import ConfigError
from edgecloud.routing.audit import AuditSampler, check_rate

__all__ = ["ESCALATE_MODES", "BackgroundPool", "Escalation", "TokenBucket"]

log = logging.getLogger(__name__)

ESCALATE_MODES = ("sync", "background")


def check_escalate(mode: object) -> str:
    if mode not in ESCALATE_MODES:
        raise ConfigError(f"escalate must be one of {list(ESCALATE_MODES)}, got {mode!r}")
    return str(mode)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; ``try_acquire`` never blocks."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise ConfigError(f"escalation rate_limit must be > 0 per second, got {rate!r}")
        b = max(1.0, float(rate)) if burst is None else burst
        if isinstance(b, bool) or not isinstance(b, int | float) or not b >= 1:
            raise ConfigError(f"escalation burst must be >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = float(b)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


Job = tuple[Callable[[], Any], "Future[Any]", Callable[[], Any]]


class BackgroundPool:
    """Daemon threads draining a bounded queue; ``submit`` returns None when it is full."""

    def __init__(self, workers: int = 1, max_queue: int = 32) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"escalation workers must be an int >= 1, got {workers!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"escalation max_queue must be an int >= 1, got {max_queue!r}")
        self._q: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def _start(self) -> None:
        # Threads start with the first job: a client that never escalates in the background
        # costs no thread.
        if not self._threads:
            for i in range(self._workers):
                t = threading.Thread(target=self._run, name=f"edgecloud-escalate-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def submit(
        self, fn: Callable[[], Any], on_drop: Callable[[], Any] | None = None
    ) -> Future[Any] | None:
        """Queue ``fn``; the future gets its result (or ``on_drop()`` if closed before it ran)."""
        fut: Future[Any] = Future()
        with self._lock:
            if self._closed:
                return None
            self._start()
            try:
                self._q.put_nowait((fn, fut, on_drop or (lambda: None)))
            except queue.Full:
                return None
        return fut

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            fn, fut, _ = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # delivered to whoever holds the future
                fut.set_exception(exc)

    def pending(self) -> int:
        return self._q.qsize()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:  # resolve what never ran
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _, fut, on_drop = job
                if fut.set_running_or_notify_cancel():
                    fut.set_result(on_drop())
        for _ in self._threads:
            try:
                self._q.put(None, timeout=timeout)
            except queue.Full:
                break
        for t in self._threads:
            t.join(timeout)


Listener = Callable[[str, dict[str, Any]], None]


class Escalation:
    """The client's escalation policy and its counters; see the module docstring."""

    def __init__(
        self,
        *,
        escalate: str = "sync",
        rate_limit: float | None = None,
        burst: float | None = None,
        audit_rate: float = 0.0,
        workers: int = 1,
        max_queue: int = 32,
        deadline: float = 5.0,
        seed: int | None = None,
        recent: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(deadline, int | float) or not deadline > 0:
            raise ConfigError(f"escalation deadline must be > 0 seconds, got {deadline!r}")
        self._clock = clock
        self._seed = seed
        self.mode = check_escalate(escalate)
        self.limiter = TokenBucket(rate_limit, burst, clock=clock) if rate_limit else None
        self.audit = AuditSampler(audit_rate, seed=seed)
        self.deadline = float(deadline)
        self.pool = BackgroundPool(workers, max_queue)
        self.listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.counts = {
            "background_sent": 0,
            "background_answered": 0,
            "background_failed": 0,
            "background_dropped": 0,
            "rate_limited": 0,
        }
        self.audits = {
            "sent": 0,
            "agreed": 0,
            "disagreed": 0,
            "incomparable": 0,
            "failed": 0,
            "dropped": 0,
        }

    @classmethod
    def from_settings(
        cls, settings: Any, *, clock: Callable[[], float] = time.monotonic
    ) -> Escalation:
        """Build from an ``edgecloud.settings.EscalationSettings`` (its fields are the keywords)."""
        import dataclasses

        return cls(**dataclasses.asdict(settings), clock=clock)

    @property
    def audit_rate(self) -> float:
        return self.audit.rate

    def configure(
        self,
        *,
        escalate: str | None = None,
        rate_limit: float | None = None,
        burst: float | None = None,
        audit_rate: float | None = None,
    ) -> None:
        """Change the policy of a running client (``None`` keeps that part; ``rate_limit=0``
        removes the limit). Everything is checked before anything changes."""
        mode = check_escalate(escalate) if escalate is not None else self.mode
        rate = check_rate(audit_rate) if audit_rate is not None else None
        limiter = self.limiter
        if rate_limit is not None:
            if isinstance(rate_limit, bool) or not isinstance(rate_limit, int | float):
                raise ConfigError(f"escalation rate_limit must be a number, got {rate_limit!r}")
            limiter = TokenBucket(rate_limit, burst, clock=self._clock) if rate_limit else None
        self.mode = mode
        self.limiter = limiter
        if rate is not None:
            self.audit = AuditSampler(rate, seed=self._seed)

    def allow(self) -> bool:
        """Take an escalation token (True when unlimited); count a refusal."""
        lim = self.limiter
        if lim is None or lim.try_acquire():
            return True
        self._count("rate_limited")
        return False

    def _count(self, key: str, table: str = "counts") -> None:
        with self._lock:
            getattr(self, table)[key] += 1

    def notify(self, event: str, info: dict[str, Any]) -> None:
        """Record one finished background escalation or audit and tell the listeners."""
        with self._lock:
            self._recent.append({"event": event, **info})
        for fn in list(self.listeners):
            try:
                fn(event, info)
            except Exception as exc:  # a listener must never break the worker
                log.warning("escalation listener failed: %s", exc)

    def stats(self) -> dict[str, Any]:
        """Counters for telemetry: escalations, audits with their agreement rate, recent events."""
        with self._lock:
            a = dict(self.audits)
            compared = a["agreed"] + a["disagreed"]
            return {
                "mode": self.mode,
                "rate_limit": self.limiter.rate if self.limiter is not None else None,
                "audit_rate": self.audit.rate,
                **self.counts,
                "pending": self.pool.pending(),
                "audits": {
                    **a,
                    "agreement": round(a["agreed"] / compared, 6) if compared else None,
                },
                "recent": list(self._recent),
            }

    def close(self, timeout: float = 5.0) -> None:
        self.pool.close(timeout)


# -- the routing side (duck-typed on ``routing.engine.Router``, which imports this module) --


def _copy(feed: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    return {k: np.array(v, copy=True) for k, v in feed.items()}


def _summary(r: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": r.model,
        "version": r.version,
        "source": r.source,
        "reason": str(r.reason),
        "degraded": r.degraded,
        "label": r.label,
        "cloud_time": round(r.cloud_time, 6),
        **extra,
    }


def background(
    router: Any, slot: Any, feed: dict[str, Any], outputs: Any, rows: Any, conf: float, local: float
) -> Any:
    """The local answer now (``reason = background``), the cloud's later on ``cloud_future``."""
    from edgecloud.errors import RoutingError
    from edgecloud.routing.deadline import Deadline
    from edgecloud.routing.modes import Reason

    esc: Escalation = router.escalation
    feed = _copy(feed)

    def local_answer(reason: Reason, err: Any, **kw: Any) -> Any:
        return router.result(
            slot, outputs, "edge", reason, rows, conf=conf, degraded=True, local_time=local,
            errors=err, **kw,
        )  # fmt: skip

    def run() -> Any:
        out = router.selector.route(
            router.requester(slot, feed), Deadline(esc.deadline, clock=router.clock)
        )
        if out.response is not None:
            r = router.cloud_result(slot, out, Reason.LOW_CONFIDENCE, local, outputs)
            esc._count("background_answered")
        else:
            reason = Reason.DEADLINE if out.deadline_hit else Reason.CLOUD_FAILED
            r = local_answer(reason, out.errors, cloud_time=out.cloud_time)
            esc._count("background_failed")
        esc.notify("background", _summary(r, edge_confidence=round(conf, 6)))
        return r

    def dropped(why: str) -> Any:
        return local_answer(Reason.CLOUD_FAILED, {"background": RoutingError(why)})

    fut = esc.pool.submit(run, lambda: dropped("client closed before the escalation ran"))
    if fut is None:
        esc._count("background_dropped")
        fut = Future()
        fut.set_result(dropped("background queue full: escalation dropped"))
    else:
        esc._count("background_sent")
    r = router.result(slot, outputs, "edge", Reason.BACKGROUND, rows, conf=conf, local_time=local)
    r.cloud_future = fut
    return r


def rate_limited(router: Any, slot: Any, outputs: Any, rows: Any, conf: float, local: float) -> Any:
    from edgecloud.errors import RoutingError
    from edgecloud.routing.modes import Reason

    lim = router.escalation.limiter
    err = RoutingError(f"escalation rate limit ({lim.rate:g}/s) reached on this device")
    return router.result(
        slot, outputs, "edge", Reason.RATE_LIMITED, rows, conf=conf, degraded=True,
        local_time=local, errors={"rate_limit": err},
    )  # fmt: skip


def audit(router: Any, slot: Any, feed: dict[str, Any], result: Any) -> None:
    """Send a confident request to the cloud in the background and count agreement."""
    from edgecloud.routing.audit import agree
    from edgecloud.routing.deadline import Deadline
    from edgecloud.routing.modes import Reason

    esc: Escalation = router.escalation
    feed = _copy(feed)
    local_outputs = result.outputs

    def run() -> Any:
        out = router.selector.route(
            router.requester(slot, feed), Deadline(esc.deadline, clock=router.clock)
        )
        if out.response is None:
            esc._count("failed", "audits")
            esc.notify("audit", {"model": result.model, "version": result.version, "agreed": None})
            return None
        r = router.cloud_result(slot, out, Reason.AUDIT, 0.0, local_outputs)
        ok = agree(local_outputs, r.outputs, slot.score_output)
        esc._count("incomparable" if ok is None else ("agreed" if ok else "disagreed"), "audits")
        esc.notify(
            "audit",
            _summary(
                r,
                agreed=ok,
                edge_label=result.label,
                edge_confidence=None if result.confidence is None else round(result.confidence, 6),
            ),
        )
        return r

    fut = esc.pool.submit(run, lambda: None)
    if fut is None:
        esc._count("dropped", "audits")
        return
    esc._count("sent", "audits")
    result.cloud_future = fut
