"""SQLite persistence for accepted entries (the only module here that does I/O).

WAL mode, and one transaction per saved batch: a process killed at any point
leaves either the whole batch or none of it, and a commit that returned is
durable against the process dying (synchronous=NORMAL loses commits only on
power loss or an OS crash; pass synchronous="FULL" to cover those too).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from knexa.crdt.entry import Entry

DB_FILE = "ledger.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    wall_ms INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    author TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    payload BLOB NOT NULL,
    signature BLOB NOT NULL
) WITHOUT ROWID
"""


class LedgerStore:
    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        if path.is_dir():
            path = path / DB_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # autocommit off at the driver level: transactions are explicit below
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(_SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: Path, synchronous: str = "NORMAL") -> LedgerStore:
        return cls(data_dir / DB_FILE, synchronous)

    def save(self, entries: Iterable[Entry]) -> None:
        """Write all `entries` in one transaction, replacing older versions of their keys."""
        rows = [
            (
                e.key, e.wall_ms, e.counter, e.author, e.expires_at_ms, int(e.deleted),
                e.payload, e.signature,
            )
            for e in entries
        ]
        if not rows:
            return
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?)", rows)

    def delete(self, keys: Iterable[str]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])

    def load(self) -> list[Entry]:
        rows = self._db.execute(
            "SELECT key, payload, wall_ms, counter, author, expires_at_ms, deleted, signature "
            "FROM entries"
        )
        return [
            Entry(key, bytes(payload), wall, counter, author, expires, bool(deleted), bytes(sig))
            for key, payload, wall, counter, author, expires, deleted, sig in rows
        ]

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
