"""The history's schema, as a chain of versioned migrations: the one place that creates or changes a table.

A database records the versions applied in ``mrad_schema``. Opening one
applies the missing versions in order, all in one transaction under a lock
(two runs starting at once upgrade it once), so a database is always at one
version of the chain. One written by a newer mrad-edge is refused, never
changed. The statements are the same for SQLite and PostgreSQL but for the
column types, filled in per database (``{id}``, ``{real}``, ``{int}``).

A later version is one more :class:`Migration` at the end of ``MIGRATIONS``;
a released one is never edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from ..errors import MradError


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    statements: tuple[str, ...]


MIGRATIONS = (
    Migration(1, "results, operator verdicts and events", (
        # One row per record of mrad-run. at_ms: the frame's time, milliseconds since 1970 UTC.
        """CREATE TABLE mrad_results (
            id {id},
            frame_key TEXT NOT NULL UNIQUE,
            run TEXT NOT NULL,
            at_ms {int} NOT NULL,
            station TEXT NOT NULL,
            source TEXT NOT NULL,
            frame {int} NOT NULL,
            camera_frame {int},
            part_id TEXT,
            recipe TEXT,
            bundle TEXT,
            enrollment {int},
            calibration TEXT,
            threshold {real},
            threshold_stale {int} NOT NULL DEFAULT 0,
            score {real},
            decision TEXT,
            latency_ms {real},
            late {int} NOT NULL DEFAULT 0,
            age_ms {real},
            dropped TEXT,
            error TEXT,
            picture TEXT,
            heatmap TEXT)""",
        "CREATE INDEX mrad_results_at ON mrad_results (at_ms)",
        "CREATE INDEX mrad_results_part ON mrad_results (part_id)",
        "CREATE INDEX mrad_results_recipe ON mrad_results (recipe, at_ms)",
        # The operator's verdict on a frame (the page's review): the latest one per frame.
        """CREATE TABLE mrad_verdicts (
            frame_key TEXT PRIMARY KEY,
            verdict TEXT NOT NULL CHECK (verdict IN ('good', 'defect')),
            operator TEXT NOT NULL,
            at_ms {int} NOT NULL)""",
        # Event records (a camera lost, a sink lost or back, a recipe changed), each as its JSON.
        """CREATE TABLE mrad_events (
            id {id},
            event_key TEXT NOT NULL UNIQUE,
            run TEXT NOT NULL,
            at_ms {int} NOT NULL,
            station TEXT NOT NULL,
            event TEXT NOT NULL,
            record TEXT NOT NULL)""",
        "CREATE INDEX mrad_events_at ON mrad_events (at_ms)",
    )),
)
NEWEST = MIGRATIONS[-1].version
SCHEMA_TABLE = "mrad_schema"


def version(db) -> int:
    """The schema version of ``db`` (0: no history there yet)."""
    if not db.has_table(SCHEMA_TABLE):
        return 0
    (found,) = db.execute(f"SELECT COALESCE(MAX(version), 0) FROM {SCHEMA_TABLE}").fetchone()
    return int(found)


def upgrade(db, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring ``db`` to the newest version of ``migrations``; the version it was at. ``db``: a store's
    :class:`~mrad.runtime.history.store.Database`."""
    newest = migrations[-1].version
    if version(db) == newest:  # the usual case, without taking the lock
        return newest
    with db.transaction(exclusive=True):
        found = version(db)  # again under the lock: another process may have just upgraded it
        if found > newest:
            raise MradError(f"{db.shown} holds a history of schema version {found}, newer than this mrad-edge "
                            f"knows ({newest}): upgrade mrad-edge, or give another --history")
        if found == 0:
            db.execute(f"CREATE TABLE {SCHEMA_TABLE} (version {db.types['int']} PRIMARY KEY, what TEXT NOT NULL, "
                       "applied TEXT NOT NULL)")
        for migration in migrations:
            if migration.version <= found:
                continue
            for statement in migration.statements:
                db.execute(statement.format(**db.types))
            db.execute(f"INSERT INTO {SCHEMA_TABLE} (version, what, applied) VALUES (?, ?, ?)",
                       (migration.version, migration.what, datetime.now(timezone.utc).isoformat(timespec="seconds")))
    return found
