"""Routing policies, each alone, with a fake clock and fake regions (no waiting, no network).

These are unit tests of the decision logic; the same policies run against real servers in
tests/test_hybrid_e2e.py.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
import pytest

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    InputError,
    ProtocolError,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from edgecloud.package import Manifest, TensorSpec
from edgecloud.routing import (
    BreakerState,
    CapacityLimiter,
    CircuitBreaker,
    CpuLoadGate,
    CustomConfidence,
    Deadline,
    Entropy,
    HealthProber,
    Margin,
    MaxProbability,
    Mode,
    Region,
    RegionSelector,
    confidence_from_manifest,
    parse_mode,
)
from edgecloud.routing.regions import PERSISTENT_KINDS, failure_kind
from edgecloud.transport.base import Transport
from edgecloud.transport.v2 import InferRequest, InferResponse


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


# -- confidence ----------------------------------------------------------------------------------


def test_max_probability_from_logits_matches_softmax() -> None:
    logits = np.array([[2.0, 1.0, 0.1], [0.0, 0.0, 0.0], [1000.0, 0.0, -1000.0]], np.float32)
    conf = MaxProbability("y")({"y": logits})
    e = np.exp(logits[0] - logits[0].max())
    assert conf[0] == pytest.approx(e.max() / e.sum(), rel=1e-6)
    assert conf[1] == pytest.approx(1 / 3, rel=1e-6)
    assert conf[2] == pytest.approx(1.0)  # stable for huge logits, no overflow
    assert MaxProbability("y", "probabilities")({"y": np.array([[0.2, 0.7, 0.1]])})[0] == 0.7


def test_margin_and_entropy() -> None:
    p = np.array([[0.5, 0.4, 0.1], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    m = Margin("y", "probabilities")({"y": p})
    np.testing.assert_allclose(m, [0.1, 1.0, 0.0], atol=1e-9)
    e = Entropy("y", "probabilities")({"y": p})
    assert e[1] == pytest.approx(1.0)
    assert e[2] == pytest.approx(0.0, abs=1e-9)
    assert 0 < e[0] < 1
    # same ordering from logits
    logits = np.log(np.clip(p, 1e-9, 1))
    np.testing.assert_allclose(Margin("y")({"y": logits}), m, atol=1e-6)


def test_custom_confidence_and_errors() -> None:
    c = CustomConfidence(lambda out: out["score"].max())
    assert c({"score": np.array([0.1, 0.8])})[0] == pytest.approx(0.8)
    with pytest.raises(ConfigError):
        CustomConfidence(3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"confidence output 'y' is not among the outputs \['z'\]"):
        MaxProbability("y")({"z": np.zeros((1, 3))})
    with pytest.raises(ConfigError, match="kind"):
        MaxProbability("y", "scores")


def test_confidence_from_manifest() -> None:
    def man(conf: str, output: str | None = None) -> Manifest:
        return Manifest(
            name="m",
            version="1",
            inputs=(TensorSpec("x", "float32", ("b", 4)),),
            outputs=(TensorSpec("feat", "float32", ("b", 8)), TensorSpec("p", "float32", ("b", 3))),
            variants=(),
            confidence=conf,  # type: ignore[arg-type]
            confidence_output=output,
        )

    pol = confidence_from_manifest(man("probabilities", "p"))
    assert isinstance(pol, MaxProbability)
    assert pol.output == "p"
    assert pol.kind == "probabilities"
    assert isinstance(confidence_from_manifest(man("logits"), "entropy"), Entropy)
    assert confidence_from_manifest(man("logits")).output == "feat"  # type: ignore[union-attr]
    assert confidence_from_manifest(man("none")) is None
    with pytest.raises(ConfigError, match="confidence measure"):
        confidence_from_manifest(man("logits"), "vibes")


# -- modes and deadline --------------------------------------------------------------------------


def test_modes() -> None:
    assert parse_mode("cloud_first") is Mode.CLOUD_FIRST
    with pytest.raises(ConfigError, match="edge_first"):
        parse_mode("edge-first")


def test_deadline_spends_down_on_the_injected_clock() -> None:
    clock = FakeClock()
    d = Deadline(0.5, clock=clock)
    assert d.remaining() == pytest.approx(0.5)
    clock.advance(0.2)
    assert d.remaining() == pytest.approx(0.3)
    assert d.elapsed() == pytest.approx(0.2)
    clock.advance(1)
    assert d.remaining() == 0.0
    assert d.expired()
    assert math.isinf(Deadline(None, clock=clock).remaining())
    with pytest.raises(ConfigError):
        Deadline(0, clock=clock)


# -- circuit breaker -----------------------------------------------------------------------------


def test_breaker_full_cycle() -> None:
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, cooldown=10, clock=clock)
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    b.record_failure()
    assert b.allow()
    b.record_success()  # success resets the consecutive count
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    clock.advance(9.9)
    assert not b.allow()
    clock.advance(0.2)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # the one probe
    assert not b.allow()  # nobody else while it is out
    b.record_failure()  # probe failed: open again, new cool-down
    assert b.state is BreakerState.OPEN
    clock.advance(10)
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    assert b.allow()


def test_breaker_release_returns_probe_slot() -> None:
    clock = FakeClock()
    b = CircuitBreaker(1, 5, clock=clock)
    b.record_failure()
    clock.advance(5)
    assert b.allow()
    b.release()
    assert b.allow()


def test_breaker_rejects_bad_config() -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker(0)
    with pytest.raises(ConfigError):
        CircuitBreaker(1, -1)


# -- capacity ------------------------------------------------------------------------------------


def test_capacity_saturates_without_waiting() -> None:
    cap = CapacityLimiter(2, max_queue=0)
    assert cap.try_acquire()
    assert cap.try_acquire()
    t0 = time.monotonic()
    assert not cap.try_acquire()
    assert time.monotonic() - t0 < 0.01
    cap.release()
    assert cap.try_acquire()
    cap.release()
    cap.release()
    with pytest.raises(RuntimeError):
        cap.release()


def test_capacity_queue_is_bounded_and_waits_at_most_max_wait() -> None:
    cap = CapacityLimiter(1, max_queue=1, max_wait=2.0)
    assert cap.try_acquire()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(cap.try_acquire()))
    waiter.start()
    for _ in range(200):
        if cap.waiting == 1:
            break
        time.sleep(0.005)
    assert cap.waiting == 1
    assert not cap.try_acquire()  # queue full: refused at once
    cap.release()  # the waiter gets the slot
    waiter.join(2)
    assert got == [True]
    # the wait is bounded by the budget (the request's deadline) as well
    t0 = time.monotonic()
    assert not cap.try_acquire(budget=0.02)
    assert time.monotonic() - t0 < 0.5
    cap.release()


def test_cpu_gate_samples_at_most_every_interval() -> None:
    clock = FakeClock()
    readings = iter([95.0, 10.0])
    calls = []

    def sampler() -> float:
        calls.append(1)
        return next(readings)

    gate = CpuLoadGate(90, interval=1.0, sampler=sampler, clock=clock)
    cap = CapacityLimiter(4, cpu_gate=gate)
    assert not cap.try_acquire()
    assert not cap.try_acquire()  # cached, not resampled
    assert len(calls) == 1
    clock.advance(1.0)
    assert cap.try_acquire()
    assert len(calls) == 2
    with pytest.raises(ConfigError):
        CpuLoadGate(0, sampler=sampler)


def test_cpu_gate_with_real_psutil() -> None:
    gate = CpuLoadGate(100)
    assert 0.0 <= gate.load <= 100.0
    assert gate()


# -- region selection ----------------------------------------------------------------------------


class FakeRegionTransport(Transport):
    """A region whose latency (on the fake clock) and failures a test scripts."""

    def __init__(self, name: str, clock: FakeClock, latency: float = 0.01) -> None:
        self.region = name
        self.clock = clock
        self.latency = latency
        self.fail: Exception | None = None
        self.ready_value: bool | None = True
        self.calls: list[float] = []

    def infer(self, request: InferRequest, *, timeout: float) -> InferResponse:
        self.calls.append(timeout)
        if self.latency > timeout:
            self.clock.advance(timeout)
            raise TransportTimeout(f"{self.region} timed out", region=self.region)
        self.clock.advance(self.latency)
        if self.fail is not None:
            raise self.fail
        return InferResponse(model=request.model, outputs={"y": np.ones((1, 2))})

    def ready(self, *, timeout: float) -> bool | None:
        self.clock.advance(min(self.latency, timeout))
        if self.fail is not None:
            raise self.fail
        return self.ready_value


def _regions(clock: FakeClock, *lat: float, **kw: object) -> list[Region]:
    return [
        Region(
            f"r{i}",
            FakeRegionTransport(f"r{i}", clock, latency),
            breaker=CircuitBreaker(2, 30, clock=clock),
            **kw,  # type: ignore[arg-type]
        )
        for i, latency in enumerate(lat)
    ]


def _req(region: Region) -> InferRequest:
    return InferRequest(model=region.model or "m", inputs={"x": np.zeros((1, 2))})


def _ft(r: Region) -> FakeRegionTransport:
    assert isinstance(r.transport, FakeRegionTransport)
    return r.transport


def test_nearest_region_by_probe_rtt() -> None:
    clock = FakeClock()
    regions = _regions(clock, 0.08, 0.02, 0.05)
    sel = RegionSelector(regions, clock=clock)
    HealthProber(sel, interval=1, clock=clock).probe_once()
    assert [r.name for r in sel.ordered()] == ["r1", "r2", "r0"]
    assert regions[1].rtt == pytest.approx(0.02)
    out = sel.route(_req, Deadline(1, clock=clock))
    assert out.region is regions[1]
    assert out.errors == {}
    assert out.cloud_time == pytest.approx(0.02)


def test_priority_beats_rtt_and_unmeasured_go_last() -> None:
    clock = FakeClock()
    a, b, c = _regions(clock, 0.01, 0.05, 0.02)
    b.priority = -1
    sel = RegionSelector([a, b, c], clock=clock)
    a.observe_rtt(0.01)
    b.observe_rtt(0.05)
    assert [r.name for r in sel.ordered()] == ["r1", "r0", "r2"]


def test_rtt_is_smoothed() -> None:
    clock = FakeClock()
    (r,) = _regions(clock, 0.01)
    r.observe_rtt(0.1)
    r.observe_rtt(0.2)
    assert r.rtt == pytest.approx(0.1 + 0.3 * 0.1)


def test_failover_to_next_region_and_breaker_trips() -> None:
    clock = FakeClock()
    near, far = _regions(clock, 0.01, 0.03)
    sel = RegionSelector([near, far], clock=clock)
    near.observe_rtt(0.01)
    far.observe_rtt(0.03)
    _ft(near).fail = ConnectionFailed("refused", region="r0")
    out = sel.route(_req, Deadline(1, clock=clock))
    assert out.region is far
    assert isinstance(out.errors["r0"], ConnectionFailed)
    sel.route(_req, Deadline(1, clock=clock))
    assert near.breaker.state is BreakerState.OPEN  # 2 consecutive failures
    calls = len(_ft(near).calls)
    out = sel.route(_req, Deadline(1, clock=clock))
    assert len(_ft(near).calls) == calls  # not even tried while open
    assert out.region is far
    assert out.errors == {}  # the open region sorts last, and far answered first
    assert [r.name for r in sel.ordered()] == ["r1", "r0"]
    _ft(far).fail = ConnectionFailed("refused", region="r1")
    out = sel.route(_req, Deadline(1, clock=clock))
    assert out.response is None
    assert "circuit open after 2 consecutive failures" in str(out.errors["r0"])
    _ft(far).fail = None
    # after the cool-down one request probes it; success closes it again
    clock.advance(30)
    _ft(near).fail = None
    out = sel.route(_req, Deadline(1, clock=clock))
    assert out.region is near
    assert near.breaker.state is BreakerState.CLOSED


def test_slow_region_capped_by_region_timeout_then_next() -> None:
    clock = FakeClock()
    slow, ok = _regions(clock, 0.5, 0.05)
    slow.timeout = 0.1
    slow.observe_rtt(0.01)  # looked near, has become slow
    sel = RegionSelector([slow, ok], clock=clock)
    out = sel.route(_req, Deadline(0.3, clock=clock))
    assert out.region is ok
    assert _ft(slow).calls == [pytest.approx(0.1)]
    assert _ft(ok).calls == [pytest.approx(0.2)]  # the remaining deadline
    assert isinstance(out.errors["r0"], TransportTimeout)
    assert slow.rtt == pytest.approx(0.01)  # a failure is not an RTT sample


def test_deadline_bounds_the_whole_failover() -> None:
    clock = FakeClock()
    regions = _regions(clock, 1.0, 1.0, 1.0)
    sel = RegionSelector(regions, clock=clock)
    out = sel.route(_req, Deadline(0.25, clock=clock))
    assert out.response is None
    assert out.deadline_hit
    assert out.cloud_time == pytest.approx(0.25)
    assert _ft(regions[0]).calls == [pytest.approx(0.25)]
    assert _ft(regions[1]).calls == []
    assert "deadline left no time" in str(out.errors["r2"])
    assert set(out.errors) == {"r0", "r1", "r2"}


def test_all_regions_fail_reports_each() -> None:
    clock = FakeClock()
    a, b = _regions(clock, 0.01, 0.01)
    _ft(a).fail = AuthError("401", region="r0", status=401)
    _ft(b).fail = RuntimeError("bug in a user transport")
    out = RegionSelector([a, b], clock=clock).route(_req, Deadline(1, clock=clock))
    assert out.response is None
    assert not out.deadline_hit
    assert isinstance(out.errors["r0"], AuthError)
    assert isinstance(out.errors["r1"], TransportError)
    assert "RuntimeError: bug in a user transport" in str(out.errors["r1"])


def test_prober_half_open_probe_and_not_ready() -> None:
    clock = FakeClock()
    (r,) = _regions(clock, 0.01)
    sel = RegionSelector([r], clock=clock)
    prober = HealthProber(sel, interval=1, clock=clock)
    _ft(r).ready_value = False
    prober.probe_once()
    prober.probe_once()
    assert r.breaker.state is BreakerState.OPEN
    assert "not ready" in str(r.last_error)
    prober.probe_once()  # open and cooling: not probed
    clock.advance(30)
    _ft(r).ready_value = True
    prober.probe_once()  # the half-open probe succeeds
    assert r.breaker.state is BreakerState.CLOSED
    _ft(r).ready_value = None  # no probe: judged by requests only
    rtt = r.rtt
    prober.probe_once()
    assert r.rtt == rtt
    assert r.breaker.state is BreakerState.CLOSED


def test_prober_thread_starts_and_stops_promptly() -> None:
    clock = FakeClock()
    (r,) = _regions(clock, 0.0)
    prober = HealthProber(RegionSelector([r]), interval=0.01).start()
    for _ in range(200):
        if r.rtt is not None:
            break
        time.sleep(0.005)
    assert r.rtt is not None
    t0 = time.monotonic()
    prober.stop()
    assert not prober.running
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ConfigError):
        HealthProber(RegionSelector([r]), interval=0)


def test_region_config_errors() -> None:
    clock = FakeClock()
    t = FakeRegionTransport("x", clock)
    with pytest.raises(ConfigError, match="unique"):
        RegionSelector([Region("x", t), Region("x", t)])
    with pytest.raises(ConfigError, match="timeout"):
        Region("x", t, timeout=0)


def test_batch_of_one_fast_path_agrees_with_the_array_path() -> None:
    rng = np.random.default_rng(0)
    for k in (2, 10, 64, 100):
        x = (rng.standard_normal((1, k)) * 5).astype(np.float32)
        for kind in ("logits", "probabilities"):
            pol = MaxProbability("y", kind)
            arr = x if kind == "logits" else np.abs(x) / np.abs(x).sum()
            low, rows = pol.lowest({"y": arr})
            assert low == pytest.approx(float(pol({"y": arr})[0]), rel=1e-6)
            assert (rows is None) == (k <= MaxProbability.SMALL)
    batch = rng.standard_normal((3, 10)).astype(np.float32)
    low, rows = MaxProbability("y").lowest({"y": batch})
    assert rows is not None
    assert low == pytest.approx(float(rows.min()))
    nan = np.full((1, 10), np.nan, np.float32)
    low, _ = MaxProbability("y").lowest({"y": nan})
    assert math.isnan(low)  # NaN confidence never passes a threshold (NaN >= t is False)
    low, rows = Margin("y").lowest({"y": batch})
    assert low == pytest.approx(float(Margin("y")({"y": batch}).min()))


def test_probe_success_does_not_hide_failing_requests() -> None:
    """A region whose probe answers (an MQTT broker that is up) while its inference path times
    out (no worker behind it) must still trip after repeated request failures; otherwise every
    request would wait out its timeout there instead of failing over at once."""
    clock = FakeClock()
    near, far = _regions(clock, 0.5, 0.02)
    near.timeout = 0.1  # infer times out; ready() still answers True
    sel = RegionSelector([near, far], clock=clock)
    # Probes answer within 1 ms for both regions, so near stays first by config order.
    prober = HealthProber(sel, interval=1, timeout=0.001, clock=clock)
    for _ in range(2):
        prober.probe_once()
        out = sel.route(_req, Deadline(1, clock=clock))
        assert out.region is far
        assert isinstance(out.errors["r0"], TransportTimeout)
    assert near.breaker.state is BreakerState.OPEN
    calls = len(_ft(near).calls)
    out = sel.route(_req, Deadline(1, clock=clock))
    assert out.region is far
    assert len(_ft(near).calls) == calls  # skipped while open: no more waiting on it


# ----------------------------------------------------------------- model readiness and health


class ModelAwareTransport(FakeRegionTransport):
    """Answers ``model_ready`` per model, as a V2 server's model readiness path does."""

    def __init__(self, name: str, clock: FakeClock, latency: float = 0.01) -> None:
        super().__init__(name, clock, latency)
        self.loaded: set[str] = set()
        self.asked: list[tuple[str | None, str | None]] = []

    def model_ready(
        self, model: str | None, version: str | None = None, *, timeout: float
    ) -> bool | None:
        self.asked.append((model, version))
        return model in self.loaded


def test_a_region_whose_model_is_not_ready_is_chosen_last() -> None:
    clock = FakeClock()
    near = ModelAwareTransport("near", clock, latency=0.001)
    far = ModelAwareTransport("far", clock, latency=0.05)
    far.loaded.add("m")
    regions = [
        Region("near", near, priority=0, model="m", version="2"),
        Region("far", far, priority=5, model="m", version="2"),
    ]
    sel = RegionSelector(regions, clock=clock)
    prober = HealthProber(sel, interval=1, timeout=0.5, clock=clock)
    prober.probe_once()
    # The model, with its version, is what was asked about; not the server.
    assert near.asked == [("m", "2")]
    assert [r.model_ready for r in regions] == [False, True]
    assert [r.name for r in sel.ordered()] == ["far", "near"]
    out = sel.route(lambda r: InferRequest("m", {"x": np.ones((1, 2))}), Deadline(5, clock=clock))
    assert out.region is regions[1]
    assert near.calls == []
    # Loaded now: the probe puts the nearer, higher-priority region first again.
    near.loaded.add("m")
    prober.probe_once()
    assert [r.name for r in sel.ordered()] == ["near", "far"]
    # A not-ready region is still the last resort when no other region answers.
    near.loaded.clear()
    prober.probe_once()
    far.fail = ConnectionFailed("far is down", region="far")
    out = sel.route(lambda r: InferRequest("m", {"x": np.ones((1, 2))}), Deadline(5, clock=clock))
    assert out.region is regions[0]
    assert regions[0].model_ready is True  # it answered


def test_prober_asks_the_model_from_model_for_and_plain_transports_their_server() -> None:
    clock = FakeClock()
    aware = ModelAwareTransport("a", clock)
    aware.loaded.add("local_model")
    plain = FakeRegionTransport("b", clock)  # the base class's model_ready asks ready()
    regions = [Region("a", aware), Region("b", plain)]
    prober = HealthProber(
        RegionSelector(regions, clock=clock),
        interval=1,
        clock=clock,
        model_for=lambda r: r.model or "local_model",
    )
    prober.probe_once()
    assert aware.asked == [("local_model", None)]
    assert [r.model_ready for r in regions] == [True, True]
    plain.ready_value = False
    prober.probe_once()
    assert regions[1].model_ready is False


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (TransportTimeout("t"), "timeout"),
        (ConnectionFailed("c"), "connection"),
        (AuthError("a", status=401), "auth"),
        (ProtocolError("p"), "protocol"),
        (RemoteError("x", status=404), "unknown_model"),
        (RemoteError("x", status=400), "rejected"),
        (RemoteError("x", status=429), "overloaded"),
        (RemoteError("x", status=503), "overloaded"),
        (RemoteError("x", status=500), "server_error"),
        (InputError("i"), "config"),
        (TransportError("?"), "other"),
    ],
)
def test_failure_kinds(err: Exception, kind: str) -> None:
    assert failure_kind(err) == kind
    assert (kind in PERSISTENT_KINDS) == (
        kind in {"auth", "protocol", "unknown_model", "rejected", "config"}
    )


def test_non_transient_failures_are_logged_once_until_the_region_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    t = FakeRegionTransport("r", clock)
    region = Region("r", t, breaker=CircuitBreaker(100, 1, clock=clock))
    sel = RegionSelector([region], clock=clock)

    def send() -> None:
        sel.route(lambda r: InferRequest("m", {"x": np.ones((1, 2))}), Deadline(5, clock=clock))

    caplog.set_level(logging.ERROR, logger="edgecloud.routing.regions")
    t.fail = AuthError("HTTP 401: bad token", region="r", status=401)
    for _ in range(5):
        send()
    t.fail = TransportTimeout("slow", region="r")
    send()  # transient: counted, never logged loudly
    health = sel.health()[0]
    assert health.failures_by_kind == {"auth": 5, "timeout": 1}
    assert health.persistent_error is not None
    assert "bad token" in health.persistent_error
    assert health.consecutive_failures == 6
    assert len(caplog.records) == 1
    assert "auth" in caplog.records[0].getMessage()
    t.fail = None
    send()
    health = sel.health()[0]
    assert (health.persistent_error, health.consecutive_failures, health.answered) == (None, 0, 1)
    assert health.as_dict()["failures_by_kind"] == {"auth": 5, "timeout": 1}
    t.fail = AuthError("HTTP 403: revoked", region="r", status=403)
    send()
    send()
    assert len(caplog.records) == 2  # logged again once after the region had recovered


def test_health_metrics_text_is_prometheus_format() -> None:
    from edgecloud.routing.regions import health_metrics

    clock = FakeClock()
    ok = FakeRegionTransport("ok", clock)
    bad = FakeRegionTransport('b"ad', clock)
    bad.fail = AuthError("401", region='b"ad', status=401)
    regions = [Region("ok", ok, priority=0), Region('b"ad', bad, priority=1)]
    sel = RegionSelector(regions, clock=clock)
    sel.route(lambda r: InferRequest("m", {"x": np.ones((1, 2))}), Deadline(5, clock=clock))
    ok.fail = ConnectionFailed("down", region="ok")
    sel.route(lambda r: InferRequest("m", {"x": np.ones((1, 2))}), Deadline(5, clock=clock))
    text = health_metrics(sel.health())
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['edgecloud_region_answered_total{region="ok"}'] == 1
    assert samples['edgecloud_region_failures_total{region="ok",kind="connection"}'] == 1
    assert samples['edgecloud_region_failures_total{region="b\\"ad",kind="auth"}'] == 1
    assert samples['edgecloud_region_persistent_error{region="b\\"ad"}'] == 1
    assert samples['edgecloud_region_persistent_error{region="ok"}'] == 0
    assert samples['edgecloud_region_ready{region="b\\"ad"}'] == -1
    assert samples['edgecloud_region_ready{region="ok"}'] == 1
    assert samples['edgecloud_region_breaker_open{region="ok"}'] == 0
