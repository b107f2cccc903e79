"""The history database: one row per record, the operator's verdicts, events; SQLite or PostgreSQL, one schema.

A store is used by one thread at a time (the history's writer thread has its
own; a page or a command opens another). Every write goes through
:meth:`HistoryStore.write` in one transaction and is idempotent (a row's
``frame_key`` is unique), so a batch tried again after a lost connection is
written once. What the page needs later: :meth:`HistoryStore.rows` to list
frames, :meth:`HistoryStore.record_verdict` to record an operator's verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..errors import MradError
from ..line.settings import shown_url
from . import CONNECT_TIMEOUT_S, STATEMENT_TIMEOUT_S, migrations

POSTGRES_SCHEMES = ("postgresql", "postgres")
VERDICTS = ("good", "defect")
DECISIONS = ("anomalous", "normal", "error", "dropped", "late")  # what --decision selects
OPERATOR_CHARS = 64
SCORE_BINS = 10_000  # score quantiles come from a histogram of this many bins over [0, 1]: within 1/20,000
SQLITE_BUSY_S = 10.0  # a writer waits this long for another one's transaction (mrad-history reads never block it)
MIGRATION_LOCK = 0x6D726164  # PostgreSQL advisory lock held while upgrading ("mrad")
ERROR_CHARS = 200  # of a database's error message, in events and the summary
STREAM_ROWS = 2000  # rows fetched at a time when listing
TIMED_DECISION = "r.at_ms * 2 + CASE WHEN r.decision = 'anomalous' THEN 1 ELSE 0 END"

# The columns of a result row, in the order exports list them; ``time`` and ``verdict_at`` are ISO 8601 UTC.
COLUMNS = ("time", "station", "run", "frame_key", "source", "frame", "camera_frame", "part_id", "recipe", "bundle",
           "enrollment", "calibration", "threshold", "threshold_stale", "score", "decision", "latency_ms", "late",
           "age_ms", "dropped", "error", "picture", "heatmap", "verdict", "verdict_by", "verdict_at")
_STORED = ("frame_key", "run", "at_ms", "station", "source", "frame", "camera_frame", "part_id", "recipe", "bundle",
           "enrollment", "calibration", "threshold", "threshold_stale", "score", "decision", "latency_ms", "late",
           "age_ms", "dropped", "error", "picture", "heatmap")
_EVENT = ("event_key", "run", "at_ms", "station", "event", "record")
_BOOLEAN = ("threshold_stale", "late")


def is_url(target) -> bool:
    return isinstance(target, str) and target.split("://", 1)[0] in POSTGRES_SCHEMES and "://" in target


def shown(target) -> str:
    """The history as records, events and the summary name it: a URL without its user and password."""
    return shown_url(target) if is_url(target) else str(target)


class Database:
    """A connection to a SQLite file or a PostgreSQL database, speaking one dialect of SQL (``?`` placeholders)."""

    def __init__(self, target, create: bool = True, timeout_s: float = CONNECT_TIMEOUT_S):
        self.target, self.shown = target, shown(target)
        self.postgres = is_url(target)
        self._secret = _password(target) if self.postgres else None
        if self.postgres:
            self._connect_postgres(timeout_s)
        else:
            self._connect_sqlite(Path(target), create)
        self.types = ({"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "real": "DOUBLE PRECISION",
                       "int": "BIGINT"} if self.postgres else
                      {"id": "INTEGER PRIMARY KEY", "real": "REAL", "int": "INTEGER"})

    def _connect_sqlite(self, path: Path, create: bool) -> None:
        if not create and not path.is_file():
            raise MradError(f"--history {path}: no history there (no such file); mrad-run --history {path} makes one")
        self.away: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
        self.refused: tuple[type[Exception], ...] = (sqlite3.Error,)
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, timeout=SQLITE_BUSY_S, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
            self._conn.execute("PRAGMA synchronous=NORMAL")  # a power cut may lose the last rows, never the file
        except (OSError, sqlite3.Error) as exc:
            raise MradError(f"--history {path} cannot be used: {self.describe(exc)} (a SQLite file, or a "
                            "postgresql:// URL)") from exc

    def _connect_postgres(self, timeout_s: float) -> None:
        try:
            import psycopg
        except ModuleNotFoundError as exc:
            raise MradError("--history postgresql://... needs psycopg, part of the 'history' extra: "
                            "pip install \"mrad-edge[history]\"") from exc
        self.away = (psycopg.OperationalError, psycopg.InterfaceError)
        self.refused = (psycopg.Error,)
        try:
            # keepalives and a user timeout: a server gone without closing the connection is noticed, not waited on
            self._conn = psycopg.connect(self.target, autocommit=True, connect_timeout=max(1, round(timeout_s)),
                                         application_name="mrad-edge", keepalives=1, keepalives_idle=10,
                                         keepalives_interval=5, keepalives_count=3,
                                         tcp_user_timeout=int(STATEMENT_TIMEOUT_S * 1000),
                                         options=f"-c statement_timeout={int(STATEMENT_TIMEOUT_S * 1000)}")
        except psycopg.Error as exc:
            raise ConnectionError(self.describe(exc)) from None  # never chained: the URL may be in its arguments

    def describe(self, exc: BaseException) -> str:
        """An error's first line, short, without the URL's password."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:ERROR_CHARS] + ("..." if len(text) > ERROR_CHARS else "")

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.postgres else text

    def execute(self, text: str, params=()):
        return self._conn.execute(self.sql(text), params)

    def executemany(self, text: str, rows) -> None:
        if self.postgres:
            with self._conn.cursor() as cursor:
                cursor.executemany(self.sql(text), rows)
        else:
            self._conn.executemany(text, rows)

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = False):
        """One transaction; ``exclusive``: also one at a time across processes (a migration)."""
        if self.postgres:
            with self._conn.transaction():
                if exclusive:
                    self.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
                yield
            return
        self._conn.execute("BEGIN IMMEDIATE")  # the write lock at once: never upgraded halfway (no deadlock)
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def has_table(self, name: str) -> bool:
        if self.postgres:
            return self.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None
        return self.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def stream(self, text: str, params=()) -> Iterator[tuple[list[str], tuple]]:
        """Rows of a query as (column names, row), fetched a few thousand at a time (a million rows never in memory)."""
        if self.postgres:
            with self._conn.transaction(), self._conn.cursor(name="mrad_history_rows") as cursor:
                cursor.itersize = STREAM_ROWS
                cursor.execute(self.sql(text), params)
                names = [c.name for c in cursor.description]
                for row in cursor:
                    yield names, row
            return
        cursor = self._conn.execute(text, params)
        names = [c[0] for c in cursor.description]
        cursor.arraysize = STREAM_ROWS
        while batch := cursor.fetchmany():
            for row in batch:
                yield names, row

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


def _password(url: str) -> str | None:
    from urllib.parse import unquote, urlsplit

    password = urlsplit(url).password
    return unquote(password) if password else None


@dataclass(frozen=True)
class Query:
    """Which rows: a time range (ms since 1970 UTC, ``end_ms`` excluded), and exact matches; None: any."""

    start_ms: int | None = None
    end_ms: int | None = None
    station: str | None = None
    recipe: str | None = None
    source: str | None = None
    decision: str | None = None  # one of DECISIONS
    part_id: str | None = None
    limit: int | None = None

    def where(self, start_ms: int | None = None, end_ms: int | None = None) -> tuple[str, list]:
        """The WHERE clause (on ``r``, mrad_results) and its parameters; ``start_ms``/``end_ms`` narrow the range."""
        clauses, params = ["1 = 1"], []
        starts = [v for v in (self.start_ms, start_ms) if v is not None]
        ends = [v for v in (self.end_ms, end_ms) if v is not None]
        if starts:
            clauses.append("r.at_ms >= ?")
            params.append(max(starts))
        if ends:
            clauses.append("r.at_ms < ?")
            params.append(min(ends))
        for name in ("station", "recipe", "source", "part_id"):
            value = getattr(self, name)
            if value is not None:
                clauses.append(f"r.{name} = ?")
                params.append(value)
        if self.decision in ("anomalous", "normal"):
            clauses.append("r.decision = ?")
            params.append(self.decision)
        elif self.decision in ("error", "dropped"):
            clauses.append(f"r.{self.decision} IS NOT NULL")
        elif self.decision == "late":
            clauses.append("r.late = 1")
        elif self.decision is not None:
            raise MradError(f"--decision: expected one of {', '.join(DECISIONS)}, got {self.decision!r}")
        return " AND ".join(clauses), params


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:8]


def frame_key(run: str, source: str, frame: int) -> str:
    """A frame's key in the history, unique across runs: the run, a digest of the source, the frame's number."""
    return f"{run}-{source_digest(source)}-{frame}"


def at_ms(timestamp) -> int:
    """A record's ISO 8601 timestamp as milliseconds since 1970 UTC (now, when it is missing or unreadable)."""
    try:
        moment = datetime.fromisoformat(timestamp)
        if moment.tzinfo is None:
            moment = moment.astimezone()  # a naive time is the machine's local time
    except (TypeError, ValueError):
        moment = datetime.now(timezone.utc)
    return round(moment.timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms // 1000, timezone.utc).replace(microsecond=(ms % 1000) * 1000).isoformat(
        timespec="milliseconds")


def _number(value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value)


def row_of(record: dict, station: str, run: str, key: str | None = None) -> dict:
    """The row of a frame record (scored, error, dropped or late); ``key``: its frame_key, when already known."""
    scored_by = record.get("scored_by") or {}
    camera = record.get("camera") or {}
    source, frame = str(record.get("source", "")), int(record.get("frame", 0))
    part = record.get("part_id")
    return {
        "frame_key": key or frame_key(run, source, frame), "run": run, "at_ms": at_ms(record.get("timestamp")),
        "station": station, "source": source, "frame": frame, "camera_frame": _number(camera.get("frame_id"), int),
        "part_id": None if part is None else str(part), "recipe": record.get("recipe"),
        "bundle": scored_by.get("bundle"), "enrollment": _number(scored_by.get("enrollment"), int),
        "calibration": scored_by.get("calibration"), "threshold": _number(scored_by.get("threshold"), float),
        "threshold_stale": int(bool(record.get("threshold_stale"))), "score": _number(record.get("score"), float),
        "decision": record.get("decision"),
        "latency_ms": _number(record.get("latency_ms"), float) if "score" in record else None,
        "late": int(bool(record.get("late"))), "age_ms": _number(record.get("age_ms"), float),
        "dropped": record.get("dropped"), "error": record.get("error"), "picture": None, "heatmap": None}


def event_row(record: dict, station: str, run: str, number: int) -> dict:
    return {"event_key": f"{run}-e{number}", "run": run, "at_ms": at_ms(record.get("timestamp")), "station": station,
            "event": str(record["event"]), "record": json.dumps(record)}


def verdict_row(frame_key: str, verdict: str, operator: str, at: datetime | str | None = None) -> dict:
    """A verdict checked: ``verdict`` good or defect, ``operator`` a name, ``at`` a time (default: now)."""
    if verdict not in VERDICTS:
        raise MradError(f"a verdict is one of {', '.join(VERDICTS)}, not {str(verdict)[:40]!r}")
    if not isinstance(operator, str) or not operator.strip() or len(operator) > OPERATOR_CHARS \
            or not operator.isprintable():
        raise MradError(f"an operator is named by 1 to {OPERATOR_CHARS} printable characters")
    if not isinstance(frame_key, str) or not re.fullmatch(r"[0-9a-f]+-[0-9a-f]{8}-[0-9]+", frame_key):
        raise MradError(f"{str(frame_key)[:80]!r} is not a frame's key in the history (RUN-SOURCE-FRAME)")
    if at is None:
        at = datetime.now(timezone.utc)
    moment = at_ms(at.isoformat() if isinstance(at, datetime) else at)
    return {"frame_key": frame_key, "verdict": verdict, "operator": operator, "at_ms": moment}


class HistoryStore:
    """A history database opened (created and upgraded when ``create``); see the module's docstring."""

    def __init__(self, target, create: bool = True, timeout_s: float = CONNECT_TIMEOUT_S):
        self.db = Database(target, create, timeout_s)
        try:
            if not create and migrations.version(self.db) == 0:  # reading never makes a history
                raise MradError(f"--history {self.db.shown}: no history there; mrad-run --history makes one")
            migrations.upgrade(self.db)
        except self.db.away as exc:  # the server went away meanwhile: worth trying again
            self.db.close()
            raise ConnectionError(self.db.describe(exc)) from None
        except self.db.refused as exc:
            self.db.close()
            raise MradError(f"--history {self.db.shown}: {self.db.describe(exc)}") from None
        except BaseException:
            self.db.close()
            raise

    @property
    def shown(self) -> str:
        return self.db.shown

    # -- writing ------------------------------------------------------------------------------------------

    def write(self, rows=(), events=(), verdicts=(), gone=()) -> None:
        """In one transaction: result rows and event rows (each once, whatever is tried again), verdicts (the
        latest wins), and the frame keys whose pictures were deleted (their rows stay, without the file names)."""
        columns = ", ".join(_STORED)
        with self.db.transaction():
            if rows:
                self.db.executemany(f"INSERT INTO mrad_results ({columns}) VALUES ({', '.join('?' * len(_STORED))}) "
                                    "ON CONFLICT (frame_key) DO NOTHING", [tuple(r[c] for c in _STORED) for r in rows])
            if events:
                self.db.executemany(f"INSERT INTO mrad_events ({', '.join(_EVENT)}) VALUES (?, ?, ?, ?, ?, ?) "
                                    "ON CONFLICT (event_key) DO NOTHING", [tuple(e[c] for c in _EVENT) for e in events])
            if verdicts:
                self.db.executemany(
                    "INSERT INTO mrad_verdicts (frame_key, verdict, operator, at_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (frame_key) DO UPDATE SET verdict = excluded.verdict, operator = excluded.operator, "
                    "at_ms = excluded.at_ms",
                    [(v["frame_key"], v["verdict"], v["operator"], v["at_ms"]) for v in verdicts])
            if gone:
                self.db.executemany("UPDATE mrad_results SET picture = NULL, heatmap = NULL WHERE frame_key = ?",
                                    [(key,) for key in gone])

    def record_verdict(self, frame_key: str, verdict: str, operator: str, at: datetime | str | None = None) -> bool:
        """The operator's verdict on a frame (good or defect), replacing any earlier one; True when the frame's row
        is there (a verdict on a row still on its way is kept and joins it when it arrives)."""
        row = verdict_row(frame_key, verdict, operator, at)
        self.write(verdicts=[row])
        return self.db.execute("SELECT 1 FROM mrad_results WHERE frame_key = ?", (frame_key,)).fetchone() is not None

    # -- reading ------------------------------------------------------------------------------------------

    def rows(self, query: Query = Query()) -> Iterator[dict]:
        """The rows ``query`` selects, oldest first, with the operator's verdict; keys as ``COLUMNS``."""
        where, params = query.where()
        text = (f"SELECT r.*, v.verdict AS verdict, v.operator AS verdict_by, v.at_ms AS verdict_at_ms "
                f"FROM mrad_results r LEFT JOIN mrad_verdicts v ON v.frame_key = r.frame_key WHERE {where} "
                "ORDER BY r.at_ms, r.id")
        if query.limit is not None:
            text += f" LIMIT {int(query.limit)}"
        for names, values in self.db.stream(text, params):
            raw = dict(zip(names, values))
            row = {"time": iso(raw["at_ms"]), "verdict_at": iso(raw["verdict_at_ms"])}
            for name in COLUMNS:
                if name not in row:
                    row[name] = raw[name]
            for name in _BOOLEAN:
                row[name] = bool(row[name])
            yield {name: row[name] for name in COLUMNS}

    def span(self, query: Query = Query()) -> tuple[int | None, int | None]:
        """The times (ms) of the first and the last row ``query`` selects; (None, None) when none."""
        where, params = query.where()
        first, last = self.db.execute(f"SELECT MIN(r.at_ms), MAX(r.at_ms) FROM mrad_results r WHERE {where}",
                                      params).fetchone()
        return (None, None) if first is None else (int(first), int(last))

    def counts(self, query: Query, start_ms: int, end_ms: int) -> dict:
        """What a yield report counts over [start_ms, end_ms): see :func:`~mrad.runtime.history.report.bucket`."""
        where, params = query.where(start_ms, end_ms)

        def count(condition: str) -> str:
            return f"COALESCE(SUM(CASE WHEN {condition} THEN 1 ELSE 0 END), 0)"

        anomalous, loose = "r.decision = 'anomalous'", "r.decision IS NOT NULL AND r.part_id IS NULL"
        names = ("frames", "decided", "anomalous", "errors", "dropped", "late", "loose", "loose_failed")
        values = self.db.execute(
            f"SELECT COUNT(*), {count('r.decision IS NOT NULL')}, {count(anomalous)}, {count('r.error IS NOT NULL')}, "
            f"{count('r.dropped IS NOT NULL')}, {count('r.late = 1')}, {count(loose)}, "
            f"{count(anomalous + ' AND r.part_id IS NULL')} FROM mrad_results r WHERE {where}", params).fetchone()
        found = dict(zip(names, (int(v) for v in values)))
        # parts with an id: the first and the last inspection of each, in the range, from one grouping: a row's
        # time doubled plus 1 when anomalous sorts by time, and its last bit is the decision (inspections of one
        # part within the same millisecond: normal first)
        parts, first_failed, last_failed = (int(v) for v in self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(first - first / 2 * 2), 0), COALESCE(SUM(last - last / 2 * 2), 0) FROM ("
            f"SELECT MIN({TIMED_DECISION}) AS first, MAX({TIMED_DECISION}) AS last FROM mrad_results r "
            f"WHERE r.part_id IS NOT NULL AND r.decision IS NOT NULL AND {where} GROUP BY r.part_id) inspected",
            params).fetchone())
        found.update(parts=found["loose"] + parts, first_failed=found["loose_failed"] + first_failed,
                     last_failed=found["loose_failed"] + last_failed)
        false_call, miss = f"{anomalous} AND v.verdict = 'good'", "r.decision = 'normal' AND v.verdict = 'defect'"
        reviewed, false_calls, misses = (int(v) for v in self.db.execute(
            f"SELECT COUNT(*), {count(false_call)}, {count(miss)} "
            f"FROM mrad_verdicts v JOIN mrad_results r ON r.frame_key = v.frame_key WHERE {where}", params).fetchone())
        found.update(reviewed=reviewed, false_calls=false_calls, misses=misses)
        return found

    def score_histogram(self, query: Query, start_ms: int, end_ms: int) -> dict[int, int]:
        """Scored rows over [start_ms, end_ms) counted per bin of 1 / SCORE_BINS (scores outside [0, 1] in the
        end bins)."""
        where, params = query.where(start_ms, end_ms)
        scaled = f"r.score * {SCORE_BINS}"
        cell = f"CAST(FLOOR({scaled}) AS BIGINT)" if self.db.postgres else f"CAST({scaled} AS INTEGER)"
        histogram: dict[int, int] = {}
        for cell_, n in self.db.execute(f"SELECT {cell} AS cell, COUNT(*) FROM mrad_results r WHERE r.score IS NOT "
                                        f"NULL AND {where} GROUP BY cell", params).fetchall():
            cell_ = min(max(int(cell_), 0), SCORE_BINS - 1)
            histogram[cell_] = histogram.get(cell_, 0) + int(n)
        return histogram

    def close(self) -> None:
        self.db.close()


def open_store(target, create: bool = True) -> HistoryStore:
    """The history at ``target`` (a SQLite file's path, or a postgresql:// URL), created and upgraded when
    ``create``; MradError when it cannot be reached."""
    try:
        return HistoryStore(target, create)
    except ConnectionError as exc:
        raise MradError(f"--history {shown(target)} cannot be reached: {exc}") from None

