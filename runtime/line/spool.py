"""An outbox's store that outlasts the process: items in a SQLite file until their far end has them, oldest first.

Made for MQTT's ``--mqtt-buffer`` and shared with the history's buffer
(``--history-buffer``): the same table, so one implementation is tested for
both. Each item is a (topic, payload) pair: an MQTT topic and message, or the
kind of a history write and its JSON. One process per file (a lock beside it):
two would deliver the same items twice.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..files import lock_file


class Spool:
    """Items in the SQLite file ``path`` until ``done``, oldest first; ``what`` names it in the lock's error.

    ``len`` counts those not yet handed out by ``take``; each statement commits. Items handed out and never
    ``done`` are handed out again by the next process that opens the file (at least once).
    """

    def __init__(self, path: Path, what: str):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = lock_file(path.with_suffix(".lock"), f"{what} {path}")  # two runs would send it twice
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the latest items, never the file
            # AUTOINCREMENT: keys never come back, so "above the last key handed out" means "not handed out"
            self._db.execute("CREATE TABLE IF NOT EXISTS spool (key INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "topic TEXT NOT NULL, payload BLOB NOT NULL)")
            (self._waiting,) = self._db.execute("SELECT COUNT(*) FROM spool").fetchone()
        except BaseException:
            self._lock.close()
            raise
        self._handed = 0

    def __len__(self) -> int:
        return self._waiting

    def put(self, item: tuple[str, bytes]) -> None:
        self._db.execute("INSERT INTO spool (topic, payload) VALUES (?, ?)", item)
        self._waiting += 1

    def take(self, n: int) -> list:
        rows = self._db.execute("SELECT key, topic, payload FROM spool WHERE key > ? ORDER BY key LIMIT ?",
                                (self._handed, n)).fetchall()
        if rows:
            self._handed = rows[-1][0]
            self._waiting -= len(rows)
        return [(key, (topic, payload)) for key, topic, payload in rows]

    def done(self, key) -> None:
        self._db.execute("DELETE FROM spool WHERE key = ?", (key,))

    def done_many(self, keys: list) -> None:
        """Forget several delivered items in one transaction (one commit, not one per item)."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM spool WHERE key = ?", [(key,) for key in keys])

    def drop_oldest(self) -> None:
        self._db.execute("DELETE FROM spool WHERE key = (SELECT MIN(key) FROM spool WHERE key > ?)", (self._handed,))
        self._waiting -= 1

    def close(self) -> None:
        self._db.close()
        self._lock.close()
