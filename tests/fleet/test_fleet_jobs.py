"""Unit tests of the job engine's logic with a fake clock (the real-broker tests are in
test_fleet.py; these pin the state machine, rollout rate and abort arithmetic exactly)."""

from __future__ import annotations

import pytest

from edgecloud.errors import FleetError
from edgecloud.fleet.jobs import (
    AbortCriterion,
    JobEngine,
    JobStatus,
    RolloutConfig,
    parse_duration,
    parse_rate,
    parse_retry,
)
from edgecloud.fleet.messages import ExecutionState, ExecutionUpdate
from edgecloud.fleet.registry import compute_delta, merge_patch

S = ExecutionState


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _upd(job: str, dev: str, state: ExecutionState, seq: int, reason: str = "") -> ExecutionUpdate:
    return ExecutionUpdate(job, dev, state, seq, 0.0, reason)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(clock: Clock) -> JobEngine:
    return JobEngine(clock)


DEVS = [f"d{i}" for i in range(10)]


def test_state_machine_queued_in_progress_succeeded(engine: JobEngine) -> None:
    engine.create("j1", "deploy", {"version": "2"}, ["a", "b"])
    r = engine.tick({"a", "b"})
    assert [d for d, _ in r.notify] == ["a", "b"]
    assert r.notify[0][1].job_id == "j1"
    assert r.notify[0][1].document == {"version": "2"}
    # a notified execution is not sent again
    assert engine.tick({"a", "b"}).notify == []
    assert engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 1)) is not None
    assert engine.executions["j1", "a"].state == S.IN_PROGRESS
    engine.apply_update(_upd("j1", "a", S.SUCCEEDED, 2))
    assert engine.jobs["j1"].status == JobStatus.IN_PROGRESS
    engine.apply_update(_upd("j1", "b", S.SUCCEEDED, 1))
    assert engine.jobs["j1"].status == JobStatus.COMPLETED
    assert engine.counts("j1")["SUCCEEDED"] == 2


def test_updates_are_idempotent_by_seq_and_terminal_is_final(engine: JobEngine) -> None:
    engine.create("j1", "deploy", {}, ["a"])
    engine.tick({"a"})
    assert engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 5)) is not None
    assert engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 5)) is None  # redelivery
    assert engine.apply_update(_upd("j1", "a", S.FAILED, 4)) is None  # older than applied
    assert engine.apply_update(_upd("j1", "a", S.SUCCEEDED, 6)) is not None
    assert engine.apply_update(_upd("j1", "a", S.FAILED, 7)) is None  # terminal is final
    assert engine.executions["j1", "a"].state == S.SUCCEEDED
    assert engine.apply_update(_upd("nope", "a", S.SUCCEEDED, 9)) is None


def test_offline_device_stays_queued_until_online(engine: JobEngine) -> None:
    engine.create("j1", "deploy", {}, ["a", "b"])
    r = engine.tick({"a"})
    assert [d for d, _ in r.notify] == ["a"]
    assert engine.executions["j1", "b"].state == S.QUEUED
    assert engine.tick({"a"}).notify == []
    assert [d for d, _ in engine.tick({"a", "b"}).notify] == ["b"]


def test_notified_but_unstarted_execution_is_resent_after_reconnect(engine: JobEngine) -> None:
    engine.create("j1", "deploy", {}, ["a"])
    assert len(engine.tick({"a"}).notify) == 1
    engine.device_offline("a")
    assert engine.tick(set()).notify == []
    assert len(engine.tick({"a"}).notify) == 1


def test_in_progress_timeout_always_applies(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, ["a", "b"], timeout_s=30)
    engine.tick({"a", "b"})
    engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 1))
    clock.t += 29
    engine.tick({"a", "b"})
    assert engine.executions["j1", "a"].state == S.IN_PROGRESS
    clock.t += 2
    engine.tick(set())  # the device died: it is offline too
    assert engine.executions["j1", "a"].state == S.TIMED_OUT
    assert engine.executions["j1", "b"].state == S.TIMED_OUT  # notified, never answered
    assert engine.jobs["j1"].status == JobStatus.COMPLETED


def test_job_timeout_times_out_queued_executions(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, ["a", "off"], job_timeout_s=60)
    engine.tick({"a"})
    engine.apply_update(_upd("j1", "a", S.SUCCEEDED, 1))
    clock.t += 61
    engine.tick({"a"})
    assert engine.executions["j1", "off"].state == S.TIMED_OUT
    assert "job timeout" in engine.executions["j1", "off"].reason
    assert engine.jobs["j1"].status == JobStatus.COMPLETED


def test_max_per_minute_spreads_notifications(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, DEVS, rollout=RolloutConfig(max_per_minute=6))
    online = set(DEVS)
    sent = len(engine.tick(online).notify)
    assert sent == 1  # not a burst of 6
    for _ in range(60):  # one minute in 1 s steps
        clock.t += 1
        sent += len(engine.tick(online).notify)
    assert sent == 7  # 1 at t=0 and 6 over the next minute
    for _ in range(30):
        clock.t += 1
        sent += len(engine.tick(online).notify)
    assert sent == 10


def test_exponential_rollout_grows_with_successes(engine: JobEngine, clock: Clock) -> None:
    rollout = RolloutConfig(base_rate_per_minute=6, increment_factor=2, on_succeeded=2)
    assert rollout.rate(0) == 6
    assert rollout.rate(1) == 6
    assert rollout.rate(2) == 12
    assert rollout.rate(4) == 24
    assert RolloutConfig(base_rate_per_minute=6, max_per_minute=10).rate(10) == 10
    engine.create("j1", "deploy", {}, DEVS, rollout=rollout)
    online = set(DEVS)
    notified: list[str] = []

    def step(seconds: int) -> None:
        for _ in range(seconds):
            clock.t += 1
            for d, _n in engine.tick(online).notify:
                notified.append(d)
                engine.apply_update(_upd("j1", d, S.SUCCEEDED, 1))

    notified += [d for d, _ in engine.tick(online).notify]
    for d in notified:
        engine.apply_update(_upd("j1", d, S.SUCCEEDED, 1))
    step(10)  # 6/min -> one more at 10 s; 2 succeeded -> 12/min
    assert len(notified) == 2
    step(5)  # 12/min -> one more at 5 s; 3 succeeded
    assert len(notified) == 3
    step(5)  # still 12/min (needs 4 for 24/min)
    assert len(notified) == 4
    step(10)  # 24/min: one per 2.5 s, then 48/min
    assert len(notified) >= 8


def test_abort_criteria_cancel_the_rest(engine: JobEngine, clock: Clock) -> None:
    crit = AbortCriterion("REJECTED", threshold_percent=50, min_executed=2)
    engine.create("j1", "deploy", {}, DEVS, rollout=RolloutConfig(max_per_minute=60), abort=[crit])
    online = set(DEVS)
    notes = engine.tick(online).notify
    engine.apply_update(_upd("j1", notes[0][0], S.REJECTED, 1, "bad signature"))
    assert engine.jobs["j1"].status == JobStatus.IN_PROGRESS  # min_executed not reached
    clock.t += 1
    d2 = engine.tick(online).notify[0][0]
    clock.t += 1
    d3 = engine.tick(online).notify[0][0]  # notified, still running when the job aborts
    engine.apply_update(_upd("j1", d2, S.REJECTED, 1, "bad signature"))
    job = engine.jobs["j1"]
    assert job.status == JobStatus.CANCELED
    assert "aborted" in job.reason
    counts = engine.counts("j1")
    assert counts["REJECTED"] == 2
    # notified but not started (AWS's QUEUED): canceled too, and the device is told to stop
    assert counts["CANCELED"] == 8
    assert engine.executions["j1", d3].state == S.CANCELED
    cancels = engine.drain().cancel
    assert [(d, c.job_id, c.execution_number) for d, c in cancels] == [(d3, "j1", 1)]
    # had it already run, its final report is recorded next to the controller's decision
    engine.apply_update(_upd("j1", d3, S.SUCCEEDED, 1))
    e3 = engine.executions["j1", d3]
    assert e3.state == S.SUCCEEDED
    assert e3.ended_by_controller is not None
    assert e3.ended_by_controller["state"] == "CANCELED"
    clock.t += 100
    assert engine.tick(online).notify == []


def test_abort_percent_and_failure_types() -> None:
    c = AbortCriterion("ALL", threshold_percent=30, min_executed=10)
    base = {s.value: 0 for s in S}
    assert not c.tripped({**base, "FAILED": 5})  # only 5 executed
    assert c.tripped({**base, "FAILED": 1, "TIMED_OUT": 2, "SUCCEEDED": 7})
    assert not c.tripped({**base, "FAILED": 2, "SUCCEEDED": 8})
    assert not AbortCriterion("TIMED_OUT", 10, 1).tripped({**base, "FAILED": 5})
    with pytest.raises(FleetError, match="failure_type"):
        AbortCriterion("BROKEN", 10, 1)
    with pytest.raises(FleetError, match="threshold_percent"):
        AbortCriterion("ALL", 0, 1)


def test_failed_job_does_not_block_the_next(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, ["a"], timeout_s=10)
    clock.t += 1
    engine.create("j2", "deploy", {}, ["a"])
    r = engine.tick({"a"})
    assert [(d, n.job_id) for d, n in r.notify] == [("a", "j1")]  # one at a time, oldest first
    engine.apply_update(_upd("j1", "a", S.FAILED, 1, "disk full"))
    r = engine.tick({"a"})
    assert [(d, n.job_id) for d, n in r.notify] == [("a", "j2")]


def test_stuck_execution_times_out_then_next_job_runs(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, ["a"], timeout_s=10)
    engine.create("j2", "rollback", {}, ["a"])
    engine.tick({"a"})
    engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 1))
    clock.t += 11
    r = engine.tick({"a"})
    assert engine.executions["j1", "a"].state == S.TIMED_OUT
    assert [n.job_id for _, n in r.notify] == ["j2"]


def test_cancel(engine: JobEngine) -> None:
    engine.create("j1", "deploy", {}, ["a", "b", "c"])
    engine.tick({"a"})
    engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 1))
    engine.cancel("j1")
    assert engine.executions["j1", "a"].state == S.IN_PROGRESS
    assert engine.executions["j1", "b"].state == S.CANCELED
    with pytest.raises(FleetError, match="already CANCELED"):
        engine.cancel("j1")
    engine.create("j2", "deploy", {}, ["a"])
    engine.tick({"a"})
    engine.cancel("j2", force=True)
    assert engine.executions["j2", "a"].state == S.CANCELED


def test_bad_jobs_are_refused(engine: JobEngine) -> None:
    with pytest.raises(FleetError, match="operation"):
        engine.create("j", "reboot", {}, ["a"])
    with pytest.raises(FleetError, match="at least one target"):
        engine.create("j", "deploy", {}, [])
    with pytest.raises(FleetError, match="job id"):
        engine.create("bad/id", "deploy", {}, ["a"])
    engine.create("j", "deploy", {}, ["a"])
    with pytest.raises(FleetError, match="already exists"):
        engine.create("j", "deploy", {}, ["a"])
    with pytest.raises(FleetError, match="no job"):
        engine.cancel("missing")
    with pytest.raises(FleetError, match="max_per_minute"):
        RolloutConfig(max_per_minute=0)


def test_durations_and_rates() -> None:
    assert parse_duration("10m") == 600
    assert parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_rate("10/min") == 10
    assert parse_rate("1/s") == 60
    assert parse_rate(5) == 5
    for bad in ("-1", "soon", "0"):
        with pytest.raises(FleetError):
            parse_duration(bad)
    with pytest.raises(FleetError, match="rate"):
        parse_rate("fast")


def test_job_roundtrip_through_dicts(engine: JobEngine) -> None:
    from edgecloud.fleet.jobs import Execution, Job

    job = engine.create(
        "j1",
        "deploy",
        {"v": 1},
        ["a"],
        rollout=RolloutConfig(max_per_minute=5),
        abort=[AbortCriterion("FAILED", 20, 3)],
        job_timeout_s=99,
    )
    assert Job.from_dict(job.to_dict()) == job
    e = engine.executions["j1", "a"]
    assert Execution.from_dict(e.to_dict()) == e


def test_merge_patch_and_delta() -> None:
    base = {"policy": {"mode": "edge_first", "threshold": 0.5}, "model": {"version": "1"}}
    new = merge_patch(base, {"policy": {"threshold": 0.8}, "model": None})
    assert new == {"policy": {"mode": "edge_first", "threshold": 0.8}}
    assert base["policy"]["threshold"] == 0.5  # not mutated
    reported = {"policy": {"mode": "edge_first", "threshold": 0.5}, "extra": 1}
    assert compute_delta(new, reported) == {"policy": {"threshold": 0.8}}
    assert compute_delta(reported, reported) == {}


def test_timeouts_can_be_held_back_for_a_tick(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, ["a"], timeout_s=10, job_timeout_s=5)
    engine.tick({"a"})
    clock.t += 60
    engine.tick({"a"}, timeouts=False)  # just reconnected: the queued update may be on its way
    assert engine.executions["j1", "a"].state == S.QUEUED
    engine.apply_update(_upd("j1", "a", S.SUCCEEDED, 1))
    engine.tick({"a"})
    assert engine.executions["j1", "a"].state == S.SUCCEEDED


# -- reconciliation, cancel, retries (issue 13) -------------------------------------------------
def _upd_n(
    job: str,
    dev: str,
    state: ExecutionState,
    seq: int,
    n: int,
    reason: str = "",
    details: dict[str, object] | None = None,
) -> ExecutionUpdate:
    return ExecutionUpdate(job, dev, state, seq, 0.0, reason, dict(details or {}), n)


def test_rates_per_hour_and_retry_specs() -> None:
    assert parse_rate("10/hour") == pytest.approx(10 / 60)
    assert parse_rate("6/h") == pytest.approx(0.1)
    assert parse_rate("2/sec") == 120
    assert parse_retry("FAILED:2,TIMED_OUT:1") == {"FAILED": 2, "TIMED_OUT": 1}
    assert parse_retry({"all": 3}) == {"ALL": 3}
    assert parse_retry(None) == {}
    for bad, field in (
        ("FAILED", "FAILED:2"),
        ("REJECTED:1", "failure type"),
        ("FAILED:x", "integer"),
        ("FAILED:11", "0, 10"),
        ("TIMED_OUT:1.5", "integer"),
    ):
        with pytest.raises(FleetError, match=field):
            parse_retry(bad)


def test_a_late_final_report_after_timed_out_is_recorded(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, ["a", "b"], timeout_s=10)
    engine.tick({"a", "b"})
    engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 1))
    engine.apply_update(_upd("j1", "b", S.IN_PROGRESS, 1))
    clock.t += 11
    r = engine.tick({"a", "b"})
    assert engine.executions["j1", "a"].state == S.TIMED_OUT
    # both devices are told to stop what the controller gave up on
    assert sorted(d for d, _ in r.cancel) == ["a", "b"]
    assert engine.jobs["j1"].status == JobStatus.COMPLETED
    # "a" had installed it anyway (its report was stuck in its outbox): recorded
    e = engine.apply_update(_upd("j1", "a", S.SUCCEEDED, 2, "installed"))
    assert e is not None
    assert e.state == S.SUCCEEDED
    assert e.ended_by_controller is not None
    assert e.ended_by_controller["state"] == "TIMED_OUT"
    assert "after the controller marked it TIMED_OUT" in e.reason
    assert engine.counts("j1")["SUCCEEDED"] == 1
    assert engine.counts("j1")["TIMED_OUT"] == 1
    # "b" obeyed the cancel: its confirmation does not change the state
    assert engine.apply_update(_upd("j1", "b", S.CANCELED, 2)) is None
    b = engine.executions["j1", "b"]
    assert b.state == S.TIMED_OUT
    assert b.details["device_confirmed"] is True
    # a second late report for "a" changes nothing
    assert engine.apply_update(_upd("j1", "a", S.FAILED, 3)) is None
    assert engine.executions["j1", "a"].state == S.SUCCEEDED


def test_interrupted_execution_is_resumed_or_canceled(engine: JobEngine, clock: Clock) -> None:
    engine.create("j1", "deploy", {}, ["a", "b"], timeout_s=60)
    engine.tick({"a", "b"})
    engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 1))
    engine.apply_update(_upd("j1", "b", S.IN_PROGRESS, 1))
    started = engine.executions["j1", "a"].started_at
    # "a" restarted and asks: still running here, so it is notified again, clock unchanged
    clock.t += 5
    engine.apply_update(_upd_n("j1", "a", S.IN_PROGRESS, 2, 1, details={"interrupted": True}))
    notes = engine.tick({"a", "b"}).notify
    assert [(d, n.job_id, n.execution_number) for d, n in notes] == [("a", "j1", 1)]
    assert engine.executions["j1", "a"].started_at == started
    # "b" restarts after the job was force-canceled: it gets a cancel, not the job
    engine.cancel("j1", force=True)
    engine.drain()
    assert (
        engine.apply_update(_upd_n("j1", "b", S.IN_PROGRESS, 2, 1, details={"interrupted": True}))
        is None
    )
    r = engine.tick({"a", "b"})
    assert r.notify == []
    assert [(d, c.job_id, c.execution_number) for d, c in r.cancel] == [("b", "j1", 1)]


def test_retries_per_failure_type(engine: JobEngine, clock: Clock) -> None:
    crit = AbortCriterion("ALL", threshold_percent=50, min_executed=1)
    engine.create(
        "j1",
        "deploy",
        {},
        ["a", "b"],
        timeout_s=10,
        retry={"FAILED": 1, "TIMED_OUT": 1},
        abort=[crit],
    )
    engine.tick({"a", "b"})
    engine.apply_update(_upd("j1", "a", S.IN_PROGRESS, 1))
    engine.apply_update(_upd("j1", "a", S.FAILED, 2, "download failed"))
    a = engine.executions["j1", "a"]
    # retried: a new attempt, the failed one kept, the abort rule not tripped by it
    assert a.state == S.QUEUED
    assert a.execution_number == 2
    assert [x["state"] for x in a.attempts] == ["FAILED"]
    assert engine.jobs["j1"].status == JobStatus.IN_PROGRESS
    notes = engine.tick({"a", "b"}).notify
    assert ("a", 2) in [(d, n.execution_number) for d, n in notes]
    # a late report of the first attempt goes to that attempt, not the current one
    engine.apply_update(_upd_n("j1", "a", S.SUCCEEDED, 3, 1))
    assert a.state == S.QUEUED or a.state == S.IN_PROGRESS
    assert a.attempts[0]["device_state"] == "SUCCEEDED"
    # "b" times out: retried too, and told to stop its first attempt
    engine.apply_update(_upd("j1", "b", S.IN_PROGRESS, 1))
    engine.apply_update(_upd_n("j1", "a", S.IN_PROGRESS, 4, 2))
    clock.t += 5
    engine.apply_update(_upd_n("j1", "a", S.SUCCEEDED, 5, 2))
    clock.t += 6
    r = engine.tick({"a"})
    b = engine.executions["j1", "b"]
    assert b.execution_number == 2
    assert b.state == S.QUEUED
    assert ("b", 1) in [(d, c.execution_number) for d, c in r.cancel]
    assert a.state == S.SUCCEEDED
    # the second failure of "b" (timed out again) is final and trips the abort rule
    engine.tick({"a", "b"})
    engine.apply_update(_upd_n("j1", "b", S.IN_PROGRESS, 2, 2))
    clock.t += 11
    engine.tick({"a", "b"})
    assert b.state == S.TIMED_OUT
    assert engine.jobs["j1"].status == JobStatus.CANCELED
    # REJECTED is never retried
    engine.create("j2", "deploy", {}, ["c"], retry={"ALL": 3})
    engine.tick({"c"})
    engine.apply_update(_upd("j2", "c", S.REJECTED, 9, "bad signature"))
    assert engine.executions["j2", "c"].state == S.REJECTED
    assert engine.jobs["j2"].status == JobStatus.COMPLETED
