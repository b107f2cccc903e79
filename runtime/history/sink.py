"""The history sink: every record of mrad-run into the history database, written from a thread of its own.

``write`` only queues (the record, and the frame when its picture is kept):
inspection never waits for the database. The writer thread turns records
into rows, saves the pictures the policy keeps, and commits a batch at a
time. When the database is away (PostgreSQL restarted, a SQLite file's disk
full) the rows wait in a bounded buffer, on disk for PostgreSQL
(``--history-buffer``: what is left at the end is written by the next run
given the same folder), and are written in order when it is back; past the
bound the oldest are dropped and counted ("sink_dropping", once per
outage). Every write is idempotent: a batch tried again after a lost
connection is written once.
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import MradError
from ..line.outbox import InMemory, Outbox
from ..line.records import event_record
from ..line.sinks import Events, Link, Sink
from ..line.spool import Spool
from . import (BATCH_ROWS, BUFFER_SIZE, GOOD_EVERY, INTAKE_SIZE, KEEP_BYTES, KEEP_DAYS, PICTURES_WAITING, RETRY_S,
               default_buffer)
from .pictures import Pictures
from .store import HistoryStore, event_row, is_url, row_of, shown, source_digest, verdict_row

GATHER_S = 0.2  # the writer gathers records this long before a transaction: one commit per batch, not per frame
JOIN_S = 2.0  # closing waits this long for the writer's last statement
SOURCES_CACHED = 1024  # sources whose digest (part of a frame's key) is remembered


class HistorySink(Sink):
    """Writes every record to the history at ``target`` (a SQLite path or a postgresql:// URL) as station
    ``station``; ``pictures``: the policy and folder for pictures (None: rows only). ``close`` returns its counts."""

    needs_picture = False

    def __init__(self, target, station: str = "line", pictures: Pictures | None = None, buffer_dir: Path | None = None,
                 buffer_size: int = BUFFER_SIZE, events: Events = lambda record: None,
                 retry_s: tuple[float, float] = RETRY_S, intake_size: int = INTAKE_SIZE):
        self.target, self.station, self.pictures = target, station, pictures
        self.name = f"history {shown(target)}"
        self.needs_frame = pictures is not None
        self.run = uuid.uuid4().hex[:12]  # this run's rows: frame keys are unique across runs
        self.buffer_size, self.intake_size, self.retry_s = buffer_size, intake_size, retry_s
        self.delivered = self.failed = self.intake_dropped = self.pictures_skipped = 0
        self.events = events
        self._link = Link(self.name, events)
        self._changed = threading.Condition()  # guards the intake and the flags below
        self._intake: collections.deque = collections.deque()  # (kind, record or verdict, number)
        self._frames: collections.OrderedDict = collections.OrderedDict()  # number -> (frame, map), bounded
        self._numbers = itertools.count()
        self._closing = self._flushing = self._busy = self._drop_due = self._dropping = False
        self._digests: dict[str, str] = {}
        self._event_count = 0
        self._pictures_failing = False
        # the writer thread's alone from here on
        self._store: HistoryStore | None = None
        self._next_try, self._backoff = 0.0, retry_s[0]
        self._in_hand: list = []  # (key, item) taken from the buffer and not yet committed
        if is_url(target) or buffer_dir:  # a SQLite file's rows wait in memory unless told: its disk is the buffer's
            store = self._spool(Path(buffer_dir) if buffer_dir else default_buffer(), target)
        else:
            store = InMemory()
        self._buffer = Outbox(buffer_size, store)  # the writer thread's; others only read its length
        if not is_url(target):  # a file is opened now: a wrong path is one error line before the run starts
            try:
                self._store = HistoryStore(target)
            except ConnectionError as exc:
                self._buffer.close()
                raise MradError(f"--history {target} cannot be used: {exc}") from None
            except BaseException:
                self._buffer.close()
                raise
        self._worker = threading.Thread(target=self._work, name="mrad-history", daemon=True)
        self._worker.start()

    def _spool(self, folder: Path, target) -> Spool:
        where = urlsplit(target) if is_url(target) else None
        label = f"{where.hostname}_{where.port or 5432}_{where.path.strip('/')}" if where else Path(target).name
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"history-{self.station}-{label}")
        try:
            return Spool(folder / f"{name}.sqlite", "history buffer")
        except (OSError, sqlite3.Error) as exc:  # a folder that cannot be made, another run holding it, a bad file
            raise MradError(f"--history-buffer {folder} cannot be used: {exc}") from exc

    # -- the inspection thread (and the page): queue, never wait --------------------------------------------

    def write(self, record: dict, picture=None, frame=None, anomaly_map=None) -> None:
        keep = frame is not None and self.pictures is not None and self.pictures.wants(record)
        with self._changed:
            if self._closing:
                return
            number = next(self._numbers)
            if len(self._intake) >= self.intake_size:
                self._intake.popleft()
                self.intake_dropped += 1
                self._drop_due = not self._dropping  # one event per outage, not one per record
                self._dropping = True
            self._intake.append(("record", record, number))
            if keep:
                if len(self._frames) >= PICTURES_WAITING:  # the writer is behind: the oldest frame goes unkept
                    self._frames.popitem(last=False)
                    self.pictures_skipped += 1
                self._frames[number] = (frame, anomaly_map)
            self._changed.notify_all()

    def record_verdict(self, key: str, verdict: str, operator: str, at=None) -> None:
        """The operator's verdict (good or defect) on the frame ``key``, written by the writer thread: it waits
        with the rows when the database is away. MradError at once for a malformed one."""
        row = verdict_row(key, verdict, operator, at)
        with self._changed:
            if self._closing:
                raise MradError("the history is closed: the verdict was not recorded")
            self._intake.append(("verdict", row, None))
            self._changed.notify_all()

    def key(self, record: dict) -> str:
        """The history's key of a frame record of this run (what :meth:`record_verdict` takes)."""
        source = str(record.get("source", ""))
        digest = self._digests.get(source)
        if digest is None:
            if len(self._digests) >= SOURCES_CACHED:  # image files are each a source: the cache stays small
                self._digests.clear()
            digest = self._digests.setdefault(source, source_digest(source))
        return f"{self.run}-{digest}-{int(record.get('frame', 0))}"

    def pending(self) -> int:
        """Rows and events not yet written to the database."""
        with self._changed:
            return len(self._intake) + len(self._buffer) + len(self._in_hand) + self._busy

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for everything queued to be written; True if it was."""
        with self._changed:
            self._flushing = True
            self._changed.notify_all()
            try:
                return self._changed.wait_for(self._written, timeout)
            finally:
                self._flushing = False

    def close(self, timeout: float) -> dict:
        """Write what is queued within ``timeout`` seconds, then stop; the counts for the summary.

        What is left is "kept" in the on-disk buffer for the next run, or "undelivered" (lost).
        """
        self.flush(timeout)
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._worker.join(JOIN_S)
        left = 0
        if self._worker.is_alive():  # stuck in a statement: what it holds is not touched from here
            with self._changed:
                left = len(self._intake) + len(self._buffer) + len(self._in_hand)
        else:
            with self._changed:
                rest = list(self._intake)
                self._intake.clear()
            self._put(self._convert([(kind, payload, None) for kind, payload, _ in rest]))
            left = len(self._buffer) + len(self._in_hand)
            self._buffer.close()
            if self._store is not None:
                self._store.close()
        if self.pictures is not None:
            self.pictures.close()
        counts = {"delivered": self.delivered, "dropped": self.intake_dropped + self._buffer.dropped,
                  "failed": self.failed, "outages": self._link.outages}
        counts["kept" if isinstance(self._buffer.store, Spool) else "undelivered"] = left
        if self.pictures is not None:
            counts.update(self.pictures.counts(), pictures_skipped=self.pictures_skipped)
        return counts

    def _written(self) -> bool:
        return not (self._intake or self._busy or len(self._buffer) or self._in_hand)

    # -- the writer thread ----------------------------------------------------------------------------------

    def _work(self) -> None:
        if self._store is None:
            self._connect()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._intake or self._closing or self._retry_due(),
                                       self._until_retry())
                if not (self._closing or self._flushing):  # gather a batch: one commit for many frames
                    self._changed.wait_for(lambda: len(self._intake) >= BATCH_ROWS or self._closing
                                           or self._flushing, GATHER_S)
                if self._closing:
                    return
                taken = [self._intake.popleft() for _ in range(min(BATCH_ROWS, len(self._intake)))]
                taken = [(kind, payload, self._frames.pop(number, None)) for kind, payload, number in taken]
                drop_due, self._drop_due = self._drop_due, False
                self._busy = True
            try:
                if drop_due:
                    self._link.dropping(self.intake_size)
                self._deliver(self._convert(taken))
            finally:
                with self._changed:
                    self._busy = False
                    if not self._intake:
                        self._dropping = False  # caught up: a new backlog reports its drops again
                    self._changed.notify_all()

    def _retry_due(self) -> bool:
        """Rows wait, and the database is there, or may be back by now."""
        return bool(len(self._buffer) or self._in_hand) and (self._store is not None
                                                             or time.monotonic() >= self._next_try)

    def _until_retry(self) -> float | None:
        if self._store is None and (len(self._buffer) or self._in_hand):
            return max(0.0, self._next_try - time.monotonic())
        return None

    def _convert(self, taken: list) -> list[tuple[str, object]]:
        """Records into what the database takes: ("row", row), ("event", row), ("verdict", row), ("gone", key)."""
        ops: list[tuple[str, object]] = []
        for kind, payload, held in taken:
            if kind == "verdict":
                ops.append(("verdict", payload))
                continue
            if "event" in payload:
                self._event_count += 1
                ops.append(("event", event_row(payload, self.station, self.run, self._event_count)))
                continue
            row = row_of(payload, self.station, self.run, self.key(payload))
            gone = self._keep_picture(row, held) if held is not None else []
            ops.append(("row", row))
            ops += [("gone", key) for key in gone]
        if self.pictures is not None:
            ops += [("gone", key) for key in self.pictures.expire()]  # the age bound, as time passes
        return ops

    def _keep_picture(self, row: dict, held: tuple) -> list[str]:
        failed = self.pictures.failed
        row["picture"], row["heatmap"], gone = self.pictures.keep(row["frame_key"], row["at_ms"], *held)
        if self.pictures.failed > failed and not self._pictures_failing:
            self.events(event_record("pictures_failed", sink=self.name, error=f"pictures cannot be written to "
                                     f"{self.pictures.folder}: their rows are written without them"))
        self._pictures_failing = self.pictures.failed > failed
        if row["frame_key"] in gone:  # larger than the whole byte bound: deleted at once
            row["picture"] = row["heatmap"] = None
            gone = [key for key in gone if key != row["frame_key"]]
        return gone

    def _deliver(self, ops: list) -> None:
        """Write ``ops`` after whatever waits; into the buffer, in order, while the database is away."""
        if self._in_hand or len(self._buffer):
            self._put(ops)
            ops = []
        if self._store is None and time.monotonic() >= self._next_try:
            self._connect()
        if self._store is None:
            self._put(ops)
            return
        while self._in_hand or len(self._buffer):
            if not self._in_hand:
                self._in_hand = self._buffer.take(BATCH_ROWS)
            if not self._commit([(kind, json.loads(payload)) for _, (kind, payload) in self._in_hand]):
                self._put(ops)
                return
            keys = [key for key, _ in self._in_hand]
            if isinstance(self._buffer.store, Spool):
                self._buffer.store.done_many(keys)
            self._buffer.delivered()
            self._in_hand = []
            with self._changed:
                if self._closing:
                    self._put(ops)
                    return
        if ops and not self._commit(ops):
            self._put(ops)

    def _put(self, ops: list) -> None:
        for kind, payload in ops:
            if self._buffer.put((kind, json.dumps(payload).encode())):
                self._link.dropping(self.buffer_size)

    def _commit(self, ops: list) -> bool:
        """Write ``ops`` in one transaction; False when the database is away (they are not written)."""
        grouped: dict[str, list] = {"row": [], "event": [], "verdict": [], "gone": []}
        for kind, payload in ops:
            grouped[kind].append(payload)
        db = self._store.db
        try:
            self._store.write(grouped["row"], grouped["event"], grouped["verdict"], grouped["gone"])
        except db.away as exc:
            self._lost(db.describe(exc))
            return False
        except db.refused:  # one the database refuses (it never will take it): each alone, the rest written
            if len(ops) == 1:
                self.failed += 1
                return True
            return all(self._commit([op]) for op in ops)  # away halfway: all again later (each write is idempotent)
        self.delivered += len(grouped["row"]) + len(grouped["event"])
        self._link.back()
        self._backoff = self.retry_s[0]
        return True

    def _connect(self) -> None:
        try:
            self._store = HistoryStore(self.target)
        except (ConnectionError, MradError) as exc:
            self._lost(str(exc))
            return
        self._link.back()

    def _lost(self, error: str) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.retry_s[1])
        self._link.lost(error)


def open_history(settings, events: Events = lambda record: None) -> HistorySink:
    """The history sink mrad-run's settings (:class:`~mrad.runtime.line.settings.LineSettings`) ask for."""
    if not settings.history:
        raise MradError("--history-pictures, --history-buffer and the other --history-* settings are for the "
                        "history: add --history PATH_OR_URL")
    if settings.history_pictures is None and (settings.history_good_every != GOOD_EVERY or
                                              settings.history_keep_days != KEEP_DAYS or
                                              settings.history_keep_bytes != KEEP_BYTES):
        raise MradError("--history-good-every, --history-keep-days and --history-keep-bytes are for pictures: "
                        "add --history-pictures DIR")
    pictures = (Pictures(settings.history_pictures, settings.history_good_every, settings.history_keep_days,
                         settings.history_keep_bytes) if settings.history_pictures is not None else None)
    try:
        return HistorySink(settings.history, settings.station, pictures, settings.history_buffer,
                           settings.history_buffer_size, events)
    except BaseException:
        if pictures is not None:
            pictures.close()
        raise
