"""The agent's durable outbox and small key-value state, in one SQLite file (WAL mode).

Every telemetry record and job update is written here *first* and published from here, so the
broker being down, the agent being killed or the device losing power between "produced" and
"acknowledged" loses nothing: a row is deleted only when the broker's PUBACK for it arrives
(QoS 1), and rows are sent in insertion order, after a restart too. The same file holds the
per-device sequence counters (so ``seq`` keeps increasing across restarts) and the job journal
(so a job finished before a restart is reported again, not redone).

Drop policy (the queue is bounded; a device offline for weeks must not fill its disk):

1. Above ``max_rows`` rows or ``max_bytes`` payload bytes, the oldest *telemetry* rows are
   dropped first, one by one, until the queue fits again.
2. Job updates and shadow reports are never dropped for that reason: they are few and the
   controller's view of a deployment depends on them. Only when the queue holds more than
   ``hard_cap_rows`` rows and no telemetry is left to drop are the oldest of them dropped.
3. Every dropped row increments a cumulative ``dropped`` counter (per kind) that every
   heartbeat reports, so the controller sees a gap in ``seq`` and knows it was a drop, not a
   loss, even when the heartbeat right after the drop was itself dropped.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecloud.errors import StoreError

__all__ = ["DurableQueue", "OutboxItem"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    execution_number INTEGER NOT NULL,
    status TEXT NOT NULL,
    notification TEXT NOT NULL,
    result TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
);
"""

#: Kinds that are never dropped below the hard cap.
PROTECTED_KINDS = frozenset({"job", "state"})


@dataclass(frozen=True)
class OutboxItem:
    id: int
    kind: str
    topic: str
    payload: bytes
    retain: bool


class DurableQueue:
    """Thread-safe; one connection guarded by a lock (the agent's writes are small and rare)."""

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int = 10_000,
        max_bytes: int = 16 * 1024 * 1024,
        hard_cap_rows: int = 50_000,
        fsync: bool = True,
    ) -> None:
        """``fsync=False`` (SQLite ``synchronous=NORMAL`` in WAL mode) syncs only at checkpoints:
        a power cut may lose the last records but never corrupts the file. For flash that must
        not be worn by one fsync per telemetry record; the agent keeps the default."""
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.hard_cap_rows = hard_cap_rows
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the agent queue {self.path}: {exc}") from exc

    # -- outbox --------------------------------------------------------------------------
    def put(self, kind: str, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Append one message; applies the drop policy; returns the row id."""
        with self._lock, self._tx():
            cur = self._db.execute(
                "INSERT INTO outbox(kind, topic, payload, retain, created) VALUES (?,?,?,?,?)",
                (kind, topic, payload, int(retain), time.time()),
            )
            self._enforce_limits()
            return int(cur.lastrowid or 0)

    def put_with_seq(
        self, counter: str, kind: str, topic: str, build: Any, *, retain: bool = False
    ) -> int:
        """Take the next value of ``counter`` and enqueue ``build(seq) -> bytes`` atomically,
        so a crash can neither reuse a seq nor lose a record that consumed one."""
        with self._lock, self._tx():
            seq = self._next(counter)
            payload = build(seq)
            self._db.execute(
                "INSERT INTO outbox(kind, topic, payload, retain, created) VALUES (?,?,?,?,?)",
                (kind, topic, payload, int(retain), time.time()),
            )
            self._enforce_limits()
            return seq

    def peek(self, after_id: int = 0, limit: int = 100) -> list[OutboxItem]:
        """The oldest rows with id > ``after_id``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, topic, payload, retain FROM outbox WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [OutboxItem(int(r[0]), r[1], r[2], bytes(r[3]), bool(r[4])) for r in rows]

    def ack(self, item_id: int) -> None:
        """The broker acknowledged the row: now it may go."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def stats(self) -> dict[str, int]:
        with self._lock:
            n, b = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
        return {"rows": int(n), "bytes": int(b)}

    def dropped(self) -> dict[str, int]:
        """Rows dropped per kind, in total since the queue was created.

        Cumulative on purpose: a heartbeat carrying the count may itself be dropped later, and a
        running total still lets the receiver tell how much went missing between two records.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM kv WHERE key LIKE 'dropped:%'"
            ).fetchall()
        return {k.split(":", 1)[1]: int(v) for k, v in rows}

    def _enforce_limits(self) -> None:
        n, b = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        while n > self.max_rows or b > self.max_bytes:
            row = self._db.execute(
                "SELECT id, LENGTH(payload) FROM outbox WHERE kind NOT IN ('job', 'state') "
                "ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                break
            self._drop(int(row[0]), "telemetry")
            n, b = n - 1, b - int(row[1])
        while n > self.hard_cap_rows:
            row = self._db.execute("SELECT id, kind FROM outbox ORDER BY id LIMIT 1").fetchone()
            self._drop(int(row[0]), str(row[1]))
            n -= 1

    def _drop(self, item_id: int, kind: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
        self._db.execute(
            "INSERT INTO kv(key, value) VALUES (?, '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
            (f"dropped:{kind}",),
        )

    # -- counters and small state --------------------------------------------------------
    def next_seq(self, counter: str) -> int:
        with self._lock, self._tx():
            return self._next(counter)

    def _next(self, counter: str) -> int:
        self._db.execute(
            "INSERT INTO kv(key, value) VALUES (?, '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
            (f"seq:{counter}",),
        )
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (f"seq:{counter}",))
        return int(row.fetchone()[0])

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO kv(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- job journal -----------------------------------------------------------------------
    def job_get(self, key: str) -> tuple[str, str, str] | None:
        """(status, notification JSON, result JSON) of a job execution, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT status, notification, result FROM jobs WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]))

    def job_put(
        self,
        key: str,
        job_id: str,
        execution_number: int,
        status: str,
        notification: str,
        result: str = "",
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs(key, job_id, execution_number, status, notification, result, "
                "updated) VALUES (?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
                "status = excluded.status, result = excluded.result, updated = excluded.updated",
                (key, job_id, execution_number, status, notification, result, time.time()),
            )

    def jobs_with_status(self, status: str) -> list[tuple[str, str]]:
        """(key, notification JSON) of every job in ``status``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, notification FROM jobs WHERE status = ? ORDER BY updated", (status,)
            ).fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def prune_jobs(self, keep: int = 1000) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM jobs WHERE key NOT IN "
                "(SELECT key FROM jobs ORDER BY updated DESC LIMIT ?)",
                (keep,),
            )

    # -- lifecycle -------------------------------------------------------------------------
    def _tx(self) -> _Tx:
        return _Tx(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK; errors become ``StoreError``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"agent queue: {exc}") from exc
