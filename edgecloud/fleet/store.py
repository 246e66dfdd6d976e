"""Where the controller keeps devices, shadows, jobs and executions.

``FleetStore`` is the small seam: the controller keeps its working set in memory and writes
through to a store, and reads the store back only at startup. ``SqliteFleetStore`` (WAL, one
connection behind a lock) is the default and needs nothing installed; ``SqlAlchemyFleetStore``
takes a SQLAlchemy URL (``postgresql://...``) for when the fleet outgrows one machine. Both keep
each record as one JSON document in a row keyed by its id, so a new field needs no migration.

The one operation that must be atomic across controllers is the shadow's compare-and-set:
``save_shadow(shadow, expected_version)`` writes only when the stored version is still the
expected one, in the database, so a stale update is refused even when two controllers share it.

For two controllers on one database (high availability), ``acquire_lease`` is a lease row:
one statement takes the lease when it is free or expired, or renews it for its holder. On
PostgreSQL the expiry is computed with the database's clock, so the controllers' clocks need
not agree.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edgecloud.deps import available, require
from edgecloud.errors import ConfigError, FleetError, MissingDependencyError
from edgecloud.fleet.jobs import Execution, Job
from edgecloud.fleet.registry import Device, Shadow

__all__ = ["FleetStore", "ShadowConflict", "SqlAlchemyFleetStore", "SqliteFleetStore", "open_store"]


class ShadowConflict(FleetError):
    """A shadow update was based on a version that is no longer the current one."""

    def __init__(self, device_id: str, expected: int, current: int) -> None:
        self.device_id = device_id
        self.expected = expected
        self.current = current
        super().__init__(
            f"shadow of {device_id!r} is at version {current}, the update was based on "
            f"version {expected}: read it again and retry"
        )


@runtime_checkable
class FleetStore(Protocol):
    """Persistence for the controller. Every method is safe to call from any thread."""

    def load_devices(self) -> list[Device]: ...
    def save_devices(self, devices: Iterable[Device]) -> None: ...
    def load_shadows(self) -> list[Shadow]: ...
    def save_shadow(self, shadow: Shadow, expected_version: int) -> None:
        """Write ``shadow`` if the stored version is ``expected_version`` (0: none stored);
        raise ``ShadowConflict`` otherwise."""
        ...

    def load_jobs(self) -> list[Job]: ...
    def save_jobs(self, jobs: Iterable[Job]) -> None: ...
    def load_executions(self) -> list[Execution]: ...
    def save_executions(self, executions: Iterable[Execution]) -> None: ...
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease ``name`` for ``holder`` for ``ttl_s`` seconds; True if held."""
        ...

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now (a clean shutdown), if ``holder`` holds it."""
        ...

    def close(self) -> None: ...


_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS shadows (id TEXT PRIMARY KEY, version INTEGER NOT NULL,"
    " data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, data TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS executions (job_id TEXT NOT NULL, device_id TEXT NOT NULL,"
    " data TEXT NOT NULL, PRIMARY KEY (job_id, device_id))",
    "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
    " expires DOUBLE PRECISION NOT NULL)",
]

# Take the lease if free or expired, renew it if ours; a row comes back only if we hold it.
_LEASE_SQL = (
    "INSERT INTO leases (name, holder, expires) VALUES (:name, :holder, {now} + :ttl) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
    "WHERE leases.holder = excluded.holder OR leases.expires < {now} "
    "RETURNING holder"
)


def _j(d: dict[str, Any]) -> str:
    return json.dumps(d, separators=(",", ":"), sort_keys=True)


class SqliteFleetStore:
    """SQLite in WAL mode: readers never wait for the writer, a crash loses no committed row."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            for stmt in _SCHEMA:
                self._db.execute(stmt)
        except (sqlite3.Error, OSError) as exc:
            raise FleetError(f"fleet database {self.path}: cannot open it: {exc}") from exc
        self._lock = threading.Lock()

    def _write(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN")
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK") if self._db.in_transaction else None
                raise FleetError(f"fleet database {self.path}: write failed: {exc}") from exc

    def _read(self, sql: str) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql))
            except sqlite3.Error as exc:
                raise FleetError(f"fleet database {self.path}: read failed: {exc}") from exc

    def load_devices(self) -> list[Device]:
        return [Device.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM devices")]

    def save_devices(self, devices: Iterable[Device]) -> None:
        self._write(
            "INSERT OR REPLACE INTO devices (id, data) VALUES (?, ?)",
            [(d.device_id, _j(d.to_dict())) for d in devices],
        )

    def load_shadows(self) -> list[Shadow]:
        return [Shadow.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM shadows")]

    def save_shadow(self, shadow: Shadow, expected_version: int) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT version FROM shadows WHERE id = ?", (shadow.device_id,)
                ).fetchone()
                current = int(row[0]) if row else 0
                if current != expected_version:
                    self._db.execute("ROLLBACK")
                    raise ShadowConflict(shadow.device_id, expected_version, current)
                self._db.execute(
                    "INSERT OR REPLACE INTO shadows (id, version, data) VALUES (?, ?, ?)",
                    (shadow.device_id, shadow.version, _j(shadow.to_dict())),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise FleetError(f"fleet database {self.path}: shadow write failed: {exc}") from exc

    def load_jobs(self) -> list[Job]:
        return [Job.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM jobs")]

    def save_jobs(self, jobs: Iterable[Job]) -> None:
        self._write(
            "INSERT OR REPLACE INTO jobs (id, data) VALUES (?, ?)",
            [(j.job_id, _j(j.to_dict())) for j in jobs],
        )

    def load_executions(self) -> list[Execution]:
        return [
            Execution.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM executions")
        ]

    def save_executions(self, executions: Iterable[Execution]) -> None:
        self._write(
            "INSERT OR REPLACE INTO executions (job_id, device_id, data) VALUES (?, ?, ?)",
            [(e.job_id, e.device_id, _j(e.to_dict())) for e in executions],
        )

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        sql = _LEASE_SQL.format(now=":now")
        with self._lock:
            try:
                row = self._db.execute(
                    sql, {"name": name, "holder": holder, "ttl": ttl_s, "now": time.time()}
                ).fetchone()
            except sqlite3.Error as exc:
                raise FleetError(f"fleet database {self.path}: lease failed: {exc}") from exc
        return row is not None

    def release_lease(self, name: str, holder: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _with_driver(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; use psycopg 3 when only it is installed.

    The ``[postgres]`` extra installs psycopg 3, and a user should not have to know SQLAlchemy's
    dialect+driver spelling to point the controller at a database.
    """
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain) and not available("psycopg2") and available("psycopg"):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


class SqlAlchemyFleetStore:
    """The same tables through SQLAlchemy Core, for PostgreSQL (``postgresql://...``).

    SQLAlchemy and a driver (psycopg) are imported only here; install them yourself
    (``pip install sqlalchemy psycopg``). The shadow compare-and-set is one conditional UPDATE
    (or an INSERT that a primary key makes fail), so it holds across controllers.
    """

    def __init__(self, url: str) -> None:
        sa = require("sqlalchemy", "postgres", "needed for a database URL as the fleet store")
        self._sa = sa
        given, self.url = url, _with_driver(url)
        try:
            self._engine = sa.create_engine(self.url, pool_pre_ping=True)
            with self._engine.begin() as conn:
                for stmt in _SCHEMA:
                    conn.execute(sa.text(stmt))
        except ImportError as exc:  # the URL's database driver (psycopg, ...) is missing
            raise MissingDependencyError(
                exc.name or "the database driver", "postgres", f"needed for {_redact(given)}"
            ) from exc
        except Exception as exc:  # SQLAlchemy's DBAPIError tree, driver import errors
            raise FleetError(f"fleet database {_redact(given)}: cannot open it: {exc}") from exc

    def _upsert(self, table: str, keys: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        sa = self._sa
        where = " AND ".join(f"{k} = :{k}" for k in keys)
        try:
            with self._engine.begin() as conn:
                for r in rows:
                    conn.execute(sa.text(f"DELETE FROM {table} WHERE {where}"), r)
                cols = ", ".join(rows[0])
                vals = ", ".join(f":{c}" for c in rows[0])
                conn.execute(sa.text(f"INSERT INTO {table} ({cols}) VALUES ({vals})"), rows)
        except Exception as exc:
            raise FleetError(f"fleet database {_redact(self.url)}: write failed: {exc}") from exc

    def _read(self, sql: str) -> list[Any]:
        try:
            with self._engine.connect() as conn:
                return list(conn.execute(self._sa.text(sql)))
        except Exception as exc:
            raise FleetError(f"fleet database {_redact(self.url)}: read failed: {exc}") from exc

    def load_devices(self) -> list[Device]:
        return [Device.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM devices")]

    def save_devices(self, devices: Iterable[Device]) -> None:
        self._upsert(
            "devices", ("id",), [{"id": d.device_id, "data": _j(d.to_dict())} for d in devices]
        )

    def load_shadows(self) -> list[Shadow]:
        return [Shadow.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM shadows")]

    def save_shadow(self, shadow: Shadow, expected_version: int) -> None:
        sa = self._sa
        params = {
            "id": shadow.device_id,
            "v": shadow.version,
            "data": _j(shadow.to_dict()),
            "ev": expected_version,
        }
        try:
            with self._engine.begin() as conn:
                if expected_version == 0:
                    # A racing INSERT of the same id fails on the primary key (handled below).
                    exists = conn.execute(
                        sa.text("SELECT version FROM shadows WHERE id = :id"), params
                    ).first()
                    if exists is None:
                        conn.execute(
                            sa.text(
                                "INSERT INTO shadows (id, version, data) VALUES (:id, :v, :data)"
                            ),
                            params,
                        )
                        return
                    raise ShadowConflict(shadow.device_id, expected_version, int(exists[0]))
                res = conn.execute(
                    sa.text(
                        "UPDATE shadows SET version = :v, data = :data"
                        " WHERE id = :id AND version = :ev"
                    ),
                    params,
                )
                if res.rowcount != 1:
                    row = conn.execute(
                        sa.text("SELECT version FROM shadows WHERE id = :id"), params
                    ).first()
                    raise ShadowConflict(
                        shadow.device_id, expected_version, int(row[0]) if row else 0
                    )
        except ShadowConflict:
            raise
        except sa.exc.IntegrityError as exc:
            raise ShadowConflict(shadow.device_id, expected_version, expected_version + 1) from exc
        except Exception as exc:
            raise FleetError(
                f"fleet database {_redact(self.url)}: shadow write failed: {exc}"
            ) from exc

    def load_jobs(self) -> list[Job]:
        return [Job.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM jobs")]

    def save_jobs(self, jobs: Iterable[Job]) -> None:
        self._upsert("jobs", ("id",), [{"id": j.job_id, "data": _j(j.to_dict())} for j in jobs])

    def load_executions(self) -> list[Execution]:
        return [
            Execution.from_dict(json.loads(r[0])) for r in self._read("SELECT data FROM executions")
        ]

    def save_executions(self, executions: Iterable[Execution]) -> None:
        self._upsert(
            "executions",
            ("job_id", "device_id"),
            [
                {"job_id": e.job_id, "device_id": e.device_id, "data": _j(e.to_dict())}
                for e in executions
            ],
        )

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        sa = self._sa
        pg = self._engine.dialect.name == "postgresql"
        now = "EXTRACT(EPOCH FROM clock_timestamp())" if pg else ":now"
        params = {"name": name, "holder": holder, "ttl": ttl_s, "now": time.time()}
        try:
            with self._engine.begin() as conn:
                row = conn.execute(sa.text(_LEASE_SQL.format(now=now)), params).first()
        except Exception as exc:
            raise FleetError(f"fleet database {_redact(self.url)}: lease failed: {exc}") from exc
        return row is not None

    def release_lease(self, name: str, holder: str) -> None:
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    self._sa.text("DELETE FROM leases WHERE name = :name AND holder = :holder"),
                    {"name": name, "holder": holder},
                )
        except Exception as exc:
            raise FleetError(f"fleet database {_redact(self.url)}: lease failed: {exc}") from exc

    def close(self) -> None:
        self._engine.dispose()


def _redact(url: str) -> str:
    """A database URL without its password, for error messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def open_store(db: str | Path) -> FleetStore:
    """A path (or ``sqlite:///path``) opens SQLite; any other ``scheme://`` URL, SQLAlchemy."""
    text = str(db)
    if text.startswith("sqlite:///"):
        return SqliteFleetStore(text[len("sqlite:///") :])
    if "://" in text:
        if not text.split("://", 1)[0]:
            raise ConfigError(f"--db {text!r} is neither a file path nor a database URL")
        return SqlAlchemyFleetStore(text)
    return SqliteFleetStore(text)
