"""The line's history: every result in a database, pictures kept by a policy, queries and yield reports.

``mrad-run --history PATH_OR_URL`` writes one row per record (scored, error,
dropped or late) from a thread of its own; ``mrad-history`` reads them back.
From Python::

    >>> from mrad.runtime.history import open_store, Query
    >>> store = open_store("line3.sqlite")                  # or "postgresql://mes.plant/line3"
    >>> rows = list(store.rows(Query(recipe="part-a", decision="anomalous")))
    >>> rows[0]["score"], rows[0]["decision"], rows[0]["picture"]
    (0.8123, 'anomalous', '2025-05-20/3f9c0a1b2c4d-8e1f20aa-17.jpg')
    >>> store.record_verdict(rows[0]["frame_key"], "good", operator="anna")   # a false call, said by the page
    >>> store.close()

The database is an embedded SQLite file (WAL mode) or PostgreSQL (psycopg,
the ``history`` extra), with one schema, created and upgraded by
:mod:`~mrad.runtime.history.migrations`. Every bound and default of the
history lives here, once; mrad-run's options and their --help take them.
"""

from __future__ import annotations

import os
from pathlib import Path

GiB = 1 << 30

# Rows waiting for the database (PostgreSQL away, a disk full) at most, on disk; past it the oldest are dropped.
BUFFER_SIZE = 100_000
MAX_BUFFER_SIZE = 10_000_000
# Records handed over by the inspection thread and not yet taken by the writer, at most (the writer is behind
# only while it encodes pictures or a database call hangs): past it the oldest are dropped and counted.
INTAKE_SIZE = 10_000
# Frames held for their pictures until the writer saves them, at most: a frame is megabytes, a record bytes.
PICTURES_WAITING = 32
# Rows per database transaction.
BATCH_ROWS = 500
# Pictures: every anomalous frame with its heatmap, and one good frame in GOOD_EVERY (0: none); files older
# than KEEP_DAYS days, or past KEEP_BYTES bytes in all, are deleted oldest first (their rows stay).
GOOD_EVERY = 100
MAX_GOOD_EVERY = 1_000_000
KEEP_DAYS = 30.0
MAX_KEEP_DAYS = 36_500.0
KEEP_BYTES = 2 * GiB
MAX_KEEP_BYTES = 1 << 50
# A PostgreSQL server that does not answer is given up on after this long (connecting, or one statement).
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_S = 30
# A database that went away is tried again after these seconds, doubling: first, longest.
RETRY_S = (0.5, 30.0)

__all__ = ["HistoryStore", "Query", "open_store"]


def default_buffer() -> Path:
    """Where rows wait for PostgreSQL when no --history-buffer is given: the user's state folder."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mrad-edge" / "history"


def __getattr__(name: str):
    # the store is imported when asked for: line settings read the bounds above without loading it
    if name in ("open_store", "HistoryStore", "Query"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
