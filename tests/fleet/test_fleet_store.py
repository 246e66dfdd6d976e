"""The ``FleetStore`` contract, run against every implementation that can run here.

SQLite always; the SQLAlchemy store on a SQLite URL; PostgreSQL on the server that
``EDGECLOUD_TEST_POSTGRES_URL`` names, or else on a throwaway local cluster
(tests/fixtures/postgres.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecloud.deps import available
from edgecloud.errors import FleetError, MissingDependencyError
from edgecloud.fleet.jobs import AbortCriterion, Execution, JobEngine, RolloutConfig
from edgecloud.fleet.messages import ExecutionState
from edgecloud.fleet.registry import Device, Shadow
from edgecloud.fleet.store import (
    FleetStore,
    ShadowConflict,
    SqlAlchemyFleetStore,
    SqliteFleetStore,
    open_store,
)
from tests.fixtures.postgres import postgres_bin, running_postgres


def _kinds() -> list[object]:
    kinds: list[object] = ["sqlite"]
    kinds.append(
        pytest.param(
            "sqlalchemy-sqlite",
            marks=pytest.mark.skipif(
                not available("sqlalchemy"), reason="SQLAlchemy is not installed"
            ),
        )
    )
    kinds.append(
        pytest.param(
            "postgresql",
            marks=pytest.mark.skipif(
                not available("sqlalchemy")
                or not (os.environ.get("EDGECLOUD_TEST_POSTGRES_URL") or postgres_bin()),
                reason="needs SQLAlchemy and PostgreSQL (./dev.sh test installs both)",
            ),
        )
    )
    return kinds


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """EDGECLOUD_TEST_POSTGRES_URL when set, else a throwaway local cluster."""
    url = os.environ.get("EDGECLOUD_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with running_postgres() as pg:
        yield pg.url


@pytest.fixture(params=_kinds())
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetStore]:
    kind = request.param
    s: FleetStore
    if kind == "sqlite":
        s = SqliteFleetStore(tmp_path / "fleet.sqlite")
    elif kind == "sqlalchemy-sqlite":
        s = SqlAlchemyFleetStore(f"sqlite:///{tmp_path / 'fleet-sa.sqlite'}")
    else:
        s = SqlAlchemyFleetStore(request.getfixturevalue("postgres_url"))
        import sqlalchemy as sa

        with s._engine.begin() as conn:  # a clean slate
            for table in ("devices", "shadows", "jobs", "executions", "leases"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
    yield s
    s.close()


def test_store_roundtrips_everything(store: FleetStore) -> None:
    assert isinstance(store, FleetStore)
    d = Device(
        "d1",
        group="g",
        labels={"site": "a"},
        online=True,
        model_version="2",
        counters={"telemetry": 3},
        reported={"model": {"version": "2"}},
    )
    store.save_devices([d])
    d.counters["telemetry"] = 4
    store.save_devices([d])  # an upsert, not a second row
    assert store.load_devices() == [d]
    engine = JobEngine(lambda: 100.0)
    job = engine.create(
        "j1",
        "deploy",
        {"version": "2"},
        ["d1", "d2"],
        rollout=RolloutConfig(max_per_minute=5),
        abort=[AbortCriterion("REJECTED", 10, 2)],
    )
    store.save_jobs([job])
    store.save_executions(engine.executions.values())
    e = engine.executions["j1", "d1"]
    e.state = ExecutionState.SUCCEEDED
    store.save_executions([e])
    assert store.load_jobs() == [job]
    loaded = {(x.job_id, x.device_id): x for x in store.load_executions()}
    assert loaded["j1", "d1"] == e
    assert loaded["j1", "d2"].state == ExecutionState.QUEUED
    assert isinstance(loaded["j1", "d2"], Execution)


def test_shadow_compare_and_set(store: FleetStore) -> None:
    store.save_shadow(Shadow("d1", 1, {"policy": {"threshold": 0.5}}), expected_version=0)
    with pytest.raises(ShadowConflict) as info:
        store.save_shadow(Shadow("d1", 1, {"x": 1}), expected_version=0)
    assert info.value.current == 1
    store.save_shadow(Shadow("d1", 2, {"policy": {"threshold": 0.7}}), expected_version=1)
    with pytest.raises(ShadowConflict, match="version 2"):
        store.save_shadow(Shadow("d1", 2, {}), expected_version=1)
    assert [s.version for s in store.load_shadows()] == [2]


def test_concurrent_writers_one_wins(store: FleetStore) -> None:
    """Two writers based on the same version: exactly one succeeds (no lost update)."""
    store.save_shadow(Shadow("d1", 1, {}), expected_version=0)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.save_shadow(Shadow("d1", 2, {"writer": i}), expected_version=1)
            results.append("ok")
        except ShadowConflict:
            results.append("conflict")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict"] * 7 + ["ok"]


def test_open_store_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(tmp_path / "a.sqlite")
    assert isinstance(s, SqliteFleetStore)
    s.close()
    s = open_store(f"sqlite:///{tmp_path / 'b.sqlite'}")
    assert isinstance(s, SqliteFleetStore)
    s.close()
    # a database URL without SQLAlchemy installed: one clear error naming the extra
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(MissingDependencyError, match=r"edgecloud\[postgres\]"):
        open_store("postgresql://fleet:pw@127.0.0.1:1/fleet")


@pytest.mark.skipif(not available("sqlalchemy"), reason="SQLAlchemy is not installed")
def test_unreachable_database_is_a_clear_error() -> None:
    """No server (or no driver): an error naming the URL without its password."""
    with pytest.raises((FleetError, MissingDependencyError)) as info:
        SqlAlchemyFleetStore("postgresql://fleet:secret@127.0.0.1:1/fleet")
    assert "secret" not in str(info.value)
    if isinstance(info.value, MissingDependencyError):
        assert "edgecloud[postgres]" in str(info.value)
    else:
        assert "postgresql://fleet:***@" in str(info.value)


def test_unwritable_sqlite_path_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FleetError, match="cannot open it"):
        SqliteFleetStore(blocker / "sub" / "fleet.sqlite")


@pytest.mark.skipif(
    not (available("sqlalchemy") and available("psycopg") and postgres_bin()),
    reason="needs SQLAlchemy, psycopg and PostgreSQL (./dev.sh test installs them)",
)
def test_plain_postgresql_url_uses_psycopg3(postgres_url: str) -> None:
    """Users write ``postgresql://``; with psycopg 3 installed that must just work."""
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    s = open_store(plain)
    try:
        assert isinstance(s, SqlAlchemyFleetStore)
        assert s.url.startswith("postgresql+psycopg://")
        s.save_shadow(Shadow("plain", 1, {}), expected_version=0)
        assert any(x.device_id == "plain" for x in s.load_shadows())
    finally:
        s.close()


def test_lease_is_held_by_one_holder_until_it_expires_or_is_released(store: FleetStore) -> None:
    assert store.acquire_lease("controller", "a", 1.0)
    assert not store.acquire_lease("controller", "b", 1.0)  # held by a
    assert store.acquire_lease("controller", "a", 1.0)  # a renews
    assert store.acquire_lease("other", "b", 1.0)  # another lease is independent
    time.sleep(1.3)
    assert store.acquire_lease("controller", "b", 1.0)  # expired: b takes it
    assert not store.acquire_lease("controller", "a", 1.0)
    store.release_lease("controller", "a")  # not a's: changes nothing
    assert not store.acquire_lease("controller", "a", 1.0)
    store.release_lease("controller", "b")
    assert store.acquire_lease("controller", "a", 1.0)
