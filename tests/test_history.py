"""The line's history: every record into SQLite or a real PostgreSQL, pictures kept by a policy, mrad-history.

PostgreSQL is Debian's package, started here in a temporary folder on a free
loopback port (tools/postgres.py) and stopped at the end; without it those
tests skip and say why. Waits are bounded and end on the awaited condition.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import uuid
from datetime import datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mrad.runtime import Detector, MradError
from mrad.runtime.commands import history as history_cli
from mrad.runtime.commands import run as run_cli
from mrad.runtime.history import migrations
from mrad.runtime.history.pictures import Pictures
from mrad.runtime.history.report import chart, periods, quantiles, report, table
from mrad.runtime.history.sink import HistorySink
from mrad.runtime.history.store import COLUMNS, SCORE_BINS, HistoryStore, Query, iso, open_store
from mrad.runtime.line.engine import LineEngine
from mrad.runtime.line.records import now
from mrad.runtime.line.settings import line_settings
from mrad.runtime.line.sinks import Sink
from mrad.runtime.line.sources import Frame
from mrad.tools.postgres import PASSWORD, WHY_NOT, Postgres

from conftest import eventually

FRAMES = 500
FAST_RETRY = (0.05, 0.2)  # the history's backoff while PostgreSQL is away: the restart test waits for it


@pytest.fixture(scope="module")
def postgres():
    server = Postgres.find()
    if server is None:
        pytest.skip(WHY_NOT)
    try:
        server.start()
        yield server
    finally:
        server.close()  # stopped (killed if need be) and removed, whatever the tests did


@pytest.fixture
def database(postgres):
    return postgres.create_database(f"t{uuid.uuid4().hex[:12]}")


class Collected(Sink):
    def __init__(self):
        self.records = []

    def write(self, record, picture=None):
        self.records.append(record)


def record(frame, score=0.5, decision="normal", **fields):
    return {"source": "cam1", "frame": frame, "timestamp": now(), "score": score, "decision": decision,
            "recipe": "part-a", "scored_by": {"bundle": "sha256:0123456789abcdef", "enrollment": 3,
                                              "calibration": "9a0e41c2b7d1", "threshold": 0.47},
            "latency_ms": 12.5, **fields}


def written(target) -> list[dict]:
    store = open_store(target, create=False)
    try:
        return list(store.rows())
    finally:
        store.close()


def next_event(events: queue.Queue, kind: str) -> dict:
    while True:
        event = events.get(timeout=20)
        if event["event"] == kind:
            return event


# -- point 1: every result into a store, off the inspection thread ---------------------------------------------


def test_a_postgres_restart_mid_run_loses_no_row(tf_bundle, target_images, postgres, database, tmp_path, capfd):
    images = [np.asarray(Image.open(p).convert("RGB")) for p in target_images]

    def frames():
        for i in range(FRAMES):
            if i == FRAMES // 2:
                postgres.stop()  # clients are disconnected at once
            if i == FRAMES // 2 + FRAMES // 10:
                postgres.start()
            yield Frame("cam1", i, now(), image=images[i % len(images)])

    collected = Collected()
    history = HistorySink(database, "cam1", buffer_dir=tmp_path / "buffer", retry_s=FAST_RETRY,
                          events=lambda event: engine.event(event))
    engine = LineEngine(Detector(tf_bundle, provider="cpu"), [collected, history], threshold=0.5, close_timeout=60)
    try:
        summary = engine.run(frames())
    finally:
        if not postgres.running():
            postgres.start()
    assert history.name == f"history postgresql://127.0.0.1:{postgres.port}/{database.rsplit('/', 1)[1]}"
    counts = summary["sinks"][history.name]
    assert counts["dropped"] == counts["failed"] == counts["kept"] == 0 and counts["outages"] == 1, counts
    rows = written(database)
    scored = {r["frame"]: r for r in collected.records if "score" in r}
    assert sorted(r["frame"] for r in rows) == list(range(FRAMES)), "every frame once, none lost"
    assert all(r["score"] == scored[r["frame"]]["score"] and r["decision"] == scored[r["frame"]]["decision"]
               for r in rows)
    first = rows[0]
    assert first["station"] == "cam1" and first["recipe"] == "default" and first["threshold"] == 0.5
    assert first["bundle"].startswith("sha256:") and first["latency_ms"] > 0
    said = [r["event"] for r in collected.records if "event" in r]
    assert "sink_lost" in said and "sink_back" in said
    store = open_store(database, create=False)
    stored = [event for (event,) in store.db.execute("SELECT event FROM mrad_events ORDER BY at_ms").fetchall()]
    store.close()
    assert "sink_lost" in stored  # the outage's own event waited in the buffer too
    out, err = capfd.readouterr()
    assert PASSWORD not in json.dumps(collected.records) + json.dumps(summary) + out + err


SCORE_FOREVER = "import sys; from mrad.runtime.commands.run import main; sys.argv[0] = 'mrad-run'; main()"


def test_sigkill_leaves_the_sqlite_file_consistent(tf_bundle, synth_data, tmp_path):
    parts = synth_data[1] / "checker" / "test"
    db, out, log = tmp_path / "line.sqlite", tmp_path / "records.jsonl", tmp_path / "stderr.txt"
    with log.open("wb") as errors:  # the child has its own copy of the file
        process = subprocess.Popen(
            [sys.executable, "-c", SCORE_FOREVER, "--bundle", str(tf_bundle), "--input", str(parts), "--loop",
             "--provider", "cpu", "--threshold", "0.5", "--out", str(out), "--history", str(db),
             "--history-pictures", str(tmp_path / "pictures"), "--history-good-every", "3"],
            stdout=subprocess.DEVNULL, stderr=errors)
    try:
        def rows_so_far() -> int:
            assert process.poll() is None, log.read_text()
            try:
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
                    return connection.execute("SELECT COUNT(*) FROM mrad_results").fetchone()[0]
            except sqlite3.Error:  # not made yet
                return 0

        assert eventually(lambda: rows_so_far() >= 60, seconds=120, pause=0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    with contextlib.closing(sqlite3.connect(db)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    records = {r["frame"]: r for r in map(json.loads, out.read_text().splitlines()) if "event" not in r}
    rows = written(db)
    assert len(rows) >= 60 and sorted(r["frame"] for r in rows) == list(range(len(rows))), "a prefix of the frames"
    assert all(r["score"] == records[r["frame"]]["score"] and r["source"] == records[r["frame"]]["source"]
               for r in rows), "every row is its record, whole"
    kept = [r for r in rows if r["picture"]]
    assert kept and all((tmp_path / "pictures" / r["picture"]).is_file() for r in kept)


def test_rows_wait_on_disk_for_postgres_and_the_oldest_past_the_bound_are_counted(postgres, database, tmp_path):
    postgres.stop()
    try:
        events = queue.Queue()
        sink = HistorySink(database, "cam1", buffer_dir=tmp_path / "buffer", buffer_size=5, events=events.put,
                           retry_s=FAST_RETRY)
        lost = next_event(events, "sink_lost")
        for i in range(8):  # 8 into a bound of 5: the 3 oldest are dropped
            sink.write(record(i))
        assert next_event(events, "sink_dropping")["bound"] == 5
        with pytest.raises(MradError, match="being written by another process"):
            HistorySink(database, "cam1", buffer_dir=tmp_path / "buffer")  # one run per buffer
        assert sink.close(timeout=0) == {"delivered": 0, "dropped": 3, "failed": 0, "outages": 1, "kept": 5}
    finally:
        postgres.start()
    assert lost["sink"] == f"history postgresql://127.0.0.1:{postgres.port}/{database.rsplit('/', 1)[1]}"
    assert PASSWORD not in json.dumps(lost)
    next_run = HistorySink(database, "cam1", buffer_dir=tmp_path / "buffer")
    assert next_run.close(timeout=20)["delivered"] == 5
    assert [r["frame"] for r in written(database)] == [3, 4, 5, 6, 7]


def test_every_kind_of_record_is_a_row(tmp_path):
    sink = HistorySink(tmp_path / "h.sqlite", "cam1")
    sink.write(record(0, 0.9, "anomalous", part_id="P-17", camera={"frame_id": 4711, "timestamp_ns": 1}))
    sink.write(record(1, 0.2, "normal", late=True, age_ms=250.5, threshold_stale=True))
    sink.write({"source": "cam1", "frame": 2, "timestamp": now(), "error": "image could not be decoded: x.png"})
    sink.write({"source": "cam1", "frame": 3, "timestamp": now(), "dropped": "scoring was behind"})
    sink.write({"source": "cam1", "frame": 4, "timestamp": now(), "late": True, "age_ms": 900.0})
    sink.write({"event": "camera_lost", "timestamp": now(), "source": "cam1"})
    assert sink.close(10) == {"delivered": 6, "dropped": 0, "failed": 0, "outages": 0, "undelivered": 0}
    rows = written(tmp_path / "h.sqlite")
    assert [list(r) for r in rows] == [list(COLUMNS)] * 5
    anomalous, late, error, dropped, unscored = rows
    assert (anomalous["part_id"], anomalous["camera_frame"], anomalous["enrollment"], anomalous["calibration"]) == \
        ("P-17", 4711, 3, "9a0e41c2b7d1")
    assert late["late"] is True and late["age_ms"] == 250.5 and late["threshold_stale"] is True
    assert error["error"].startswith("image could not") and error["score"] is None and error["latency_ms"] is None
    assert dropped["dropped"] == "scoring was behind" and unscored["late"] is True and unscored["score"] is None
    store = open_store(tmp_path / "h.sqlite")
    assert [r["frame"] for r in store.rows(Query(decision="late"))] == [1, 4]
    assert [r["frame"] for r in store.rows(Query(part_id="P-17"))] == [0]
    store.close()


def test_writing_never_waits_for_the_database(tmp_path):
    """A database that holds its write lock for long: write() still only queues; the rows follow once it is free."""
    db = tmp_path / "h.sqlite"
    HistoryStore(db).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the file
    sink = HistorySink(db, "cam1")
    started = datetime.now()
    for i in range(2000):
        sink.write(record(i))
    assert datetime.now() - started < timedelta(seconds=2)  # 2,000 records queued while the file is locked
    holder.execute("ROLLBACK")
    holder.close()
    assert sink.close(30)["delivered"] == 2000


# -- point 2: pictures ------------------------------------------------------------------------------------------


def frames_of(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != ".lock")


def test_retention_keeps_the_byte_bound_oldest_first_and_the_rows_stay(tmp_path):
    frames = frames_of(40)
    one = len(Image.fromarray(frames[0]).tobytes())  # a bound of a few pictures: JPEGs are smaller than raw
    bound = 2 * one
    pictures = Pictures(tmp_path / "pictures", good_every=0, keep_bytes=bound)
    sink = HistorySink(tmp_path / "h.sqlite", "cam1", pictures)
    for i, frame in enumerate(frames):
        sink.write(record(i, 0.9, "anomalous"), frame=frame, anomaly_map=np.full(frame.shape[:2], i, np.float32))
        if i % 10 == 9:
            assert sink.flush(20)
            assert folder_bytes(tmp_path / "pictures") <= bound
    counts = sink.close(10)
    rows = written(tmp_path / "h.sqlite")
    assert len(rows) == 40, "a row stays when its picture goes"
    kept = [r["frame"] for r in rows if r["picture"]]
    assert kept and kept == list(range(40 - len(kept), 40)), "the oldest went first"
    assert all((tmp_path / "pictures" / r["picture"]).is_file() and (tmp_path / "pictures" / r["heatmap"]).is_file()
               for r in rows if r["picture"])
    on_disk = {p.name.split(".")[0] for p in (tmp_path / "pictures").rglob("*.jpg")}
    assert on_disk == {r["frame_key"] for r in rows if r["picture"]}
    assert counts["pictures_kept"] == 40 and counts["pictures_deleted"] == 40 - len(kept)
    assert folder_bytes(tmp_path / "pictures") <= bound


def test_pictures_policy_anomalous_all_good_one_in_n_and_by_age(tmp_path):
    clock = [1_000_000.0]
    pictures = Pictures(tmp_path / "pictures", good_every=3, keep_days=1, clock=lambda: clock[0])
    wanted = [pictures.wants(record(i, decision="anomalous" if i in (1, 2) else "normal")) for i in range(8)]
    assert wanted == [True, True, True, False, False, True, False, False]  # good frames 0, 3, 6 -> 1st and 4th ...
    assert not pictures.wants({"source": "cam1", "frame": 9, "error": "unreadable"})
    frame = frames_of(1)[0]
    assert pictures.keep("aaaa-0000aaaa-1", 0, frame, None)[2] == []
    clock[0] += 86400 + 1
    name, _, gone = pictures.keep("aaaa-0000aaaa-2", 0, frame, None)
    assert gone == ["aaaa-0000aaaa-1"] and (tmp_path / "pictures" / name).is_file()
    pictures.close()
    again = Pictures(tmp_path / "pictures", keep_bytes=0)  # a later run counts what is there, and keeps the bound
    assert again.expire() == ["aaaa-0000aaaa-2"] and folder_bytes(tmp_path / "pictures") == 0
    again.close()


def test_a_full_disk_never_stops_inspection(tmp_path, monkeypatch):
    from mrad.runtime.history import pictures as pictures_module

    def full(image, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pictures_module, "_save", full)
    events = queue.Queue()
    sink = HistorySink(tmp_path / "h.sqlite", "cam1", Pictures(tmp_path / "pictures"), events=events.put)
    for i, frame in enumerate(frames_of(5)):
        sink.write(record(i, 0.9, "anomalous"), frame=frame, anomaly_map=None)
    counts = sink.close(10)
    assert counts["pictures_failed"] == 5 and counts["delivered"] == 5
    assert next_event(events, "pictures_failed")["sink"] == f"history {tmp_path / 'h.sqlite'}"
    assert events.empty(), "one event for the outage, not one per picture"
    assert [r["picture"] for r in written(tmp_path / "h.sqlite")] == [None] * 5


# -- point 3: mrad-history ----------------------------------------------------------------------------------------


def filled(target, tmp_path) -> list[dict]:
    """A history with every kind of row, part ids, awkward text, and an operator's verdict."""
    sink = HistorySink(target, "cam1")
    sink.write(record(0, 0.91, "anomalous", part_id="P-1"))
    sink.write(record(1, 0.12, "normal", part_id="P-1"))  # P-1 again: passed the second time
    sink.write(record(2, 0.33, "normal", part_id="P-2"))
    sink.write({**record(3, 0.8, "anomalous"), "source": 'rtsp://cam,"2"/ü'})
    sink.write({"source": "cam1", "frame": 4, "timestamp": now(), "error": 'line one, "quoted"\nline two'})
    sink.write(record(5, 0.4, "normal", late=True, age_ms=250.0))
    assert sink.flush(20)
    key = sink.key(record(0))
    sink.record_verdict(key, "good", "anna")  # a false call
    sink.record_verdict(sink.key(record(2)), "defect", "ben", at="2025-05-20T10:00:00+00:00")  # a miss
    sink.close(20)
    return written(target)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_csv_export_equals_the_json_lines(backend, tmp_path, request):
    target = str(tmp_path / "h.sqlite") if backend == "sqlite" else request.getfixturevalue("database")
    rows = filled(target, tmp_path)
    result = CliRunner().invoke(history_cli.main, ["--history", target, "--csv", str(tmp_path / "rows.csv"),
                                                   "--jsonl", str(tmp_path / "rows.jsonl")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    with open(tmp_path / "rows.csv", newline="", encoding="utf-8") as f:
        table_rows = list(csv.DictReader(f))
    assert lines == rows and len(lines) == 6

    def as_csv(value):
        return "" if value is None else ("true" if value else "false") if isinstance(value, bool) else \
            value if isinstance(value, str) else json.dumps(value)

    assert table_rows == [{k: as_csv(v) for k, v in line.items()} for line in lines]
    assert lines[0]["verdict"] == "good" and lines[0]["verdict_by"] == "anna"
    assert lines[2]["verdict_at"] == "2025-05-20T10:00:00.000+00:00"
    stdout = CliRunner().invoke(history_cli.main, ["--history", target, "--decision", "anomalous"])
    assert [json.loads(line)["frame"] for line in stdout.stdout.splitlines()] == [0, 3]
    assert PASSWORD not in result.output + stdout.output


def test_an_operator_verdict_appears_in_the_row(tmp_path):
    db = tmp_path / "h.sqlite"
    rows = filled(db, tmp_path)
    store = open_store(db)
    assert store.record_verdict(rows[3]["frame_key"], "defect", "carla", datetime(2025, 5, 21, 8, tzinfo=timezone.utc))
    assert store.record_verdict(rows[0]["frame_key"], "defect", "dave")  # changed its mind: the latest wins
    assert not store.record_verdict(rows[0]["frame_key"].rsplit("-", 1)[0] + "-999", "good", "erin")  # not (yet) there
    with pytest.raises(MradError, match="good, defect"):
        store.record_verdict(rows[0]["frame_key"], "maybe", "erin")
    with pytest.raises(MradError, match="operator"):
        store.record_verdict(rows[0]["frame_key"], "good", "")
    after = {r["frame"]: r for r in store.rows()}
    store.close()
    assert (after[3]["verdict"], after[3]["verdict_by"], after[3]["verdict_at"]) == \
        ("defect", "carla", "2025-05-21T08:00:00.000+00:00")
    assert (after[0]["verdict"], after[0]["verdict_by"]) == ("defect", "dave")
    assert after[1]["verdict"] is None


def test_the_yield_report_counts_parts_verdicts_and_quantiles(tmp_path):
    db = tmp_path / "h.sqlite"
    store = open_store(db)
    day = datetime(2025, 5, 20, tzinfo=timezone.utc)
    scores = np.random.default_rng(7).random(1000)
    rows = []
    for i, score in enumerate(scores):
        at = day + timedelta(hours=5, minutes=i)  # 05:00 to 21:39: the night shift, then the early and the late one
        decision = "anomalous" if score > 0.9 else "normal"
        rows.append({**_row(i, at, float(score), decision), "part_id": f"P{i // 2}" if i < 100 else None})
    store.write(rows=rows)
    store.record_verdict(rows[0]["frame_key"], "good", "anna")
    query = Query(start_ms=_ms(day), end_ms=_ms(day + timedelta(days=1)))
    [whole] = report(store, query, "day", timezone.utc)
    decided = np.array([r["decision"] == "anomalous" for r in rows])
    parts = [decided[k:k + 2] for k in range(0, 100, 2)] + [decided[k:k + 1] for k in range(100, 1000)]
    assert whole["frames"] == 1000 and whole["parts"] == len(parts) == 950
    assert whole["first_pass_yield"] == round(sum(not p[0] for p in parts) / 950, 6)
    assert whole["defect_rate"] == round(sum(bool(p[-1]) for p in parts) / 950, 6)
    assert whole["false_calls"] == int(rows[0]["decision"] == "anomalous") and whole["reviewed"] == 1
    for q, name in ((0.5, "score_p50"), (0.9, "score_p90"), (0.99, "score_p99")):
        assert abs(whole[name] - np.quantile(scores, q, method="inverted_cdf")) <= 1 / SCORE_BINS
    shifts = report(store, query, "shift", timezone.utc, (time(6), time(14), time(22)))
    assert [s["period"] for s in shifts] == ["2025-05-19 22:00", "2025-05-20 06:00", "2025-05-20 14:00"]
    assert [s["frames"] for s in shifts] == [60, 480, 460]
    store.close()
    assert "2025-05-20 06:00" in table(shifts)
    chart(shifts, tmp_path / "yield.png", "line 3, per shift")
    with Image.open(tmp_path / "yield.png") as image:
        assert image.format == "PNG" and image.width >= 640
    assert quantiles({}) == [None, None, None]


def test_days_follow_daylight_saving_time(tmp_path):
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2025, 3, 29, 12, tzinfo=berlin)
    found = periods(_ms(start), _ms(start + timedelta(days=2)), "day", berlin)
    assert [p.label for p in found] == ["2025-03-29", "2025-03-30", "2025-03-31"]
    assert found[1].end_ms - found[1].start_ms == 23 * 3600 * 1000  # the day the clocks went forward


def test_sqlite_and_postgres_hold_the_same_rows_and_reports(database, tmp_path):
    day = datetime(2025, 5, 20, tzinfo=timezone.utc)
    rows = [_row(i, day + timedelta(minutes=7 * i), (i * 37 % 101) / 100, "anomalous" if i % 9 == 0 else "normal")
            for i in range(300)]
    answers = []
    for target in (tmp_path / "h.sqlite", database):
        store = open_store(target)
        store.write(rows=rows)
        store.record_verdict(rows[9]["frame_key"], "good", "anna", "2025-05-20T12:00:00Z")
        answers.append((list(store.rows()), report(store, Query(), "shift", timezone.utc)))
        store.close()
    assert answers[0] == answers[1]


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _row(i: int, at: datetime, score: float, decision: str) -> dict:
    return {"frame_key": f"abc123-0000abcd-{i}", "run": "abc123", "at_ms": _ms(at), "station": "cam1",
            "source": "cam1", "frame": i, "camera_frame": None, "part_id": None, "recipe": "part-a",
            "bundle": "sha256:0123", "enrollment": 1, "calibration": None, "threshold": 0.9, "threshold_stale": 0,
            "score": score, "decision": decision, "latency_ms": 10.0, "late": 0, "age_ms": None, "dropped": None,
            "error": None, "picture": None, "heatmap": None}


# -- the schema, settings and mistakes ---------------------------------------------------------------------------


def test_migrations_apply_in_order_once_and_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "h.sqlite"
    store = open_store(db)
    assert migrations.version(store.db) == migrations.NEWEST
    later = migrations.MIGRATIONS + (migrations.Migration(
        migrations.NEWEST + 1, "a column", ("ALTER TABLE mrad_results ADD COLUMN shift TEXT",)),)
    assert migrations.upgrade(store.db, later) == migrations.NEWEST
    assert migrations.upgrade(store.db, later) == migrations.NEWEST + 1  # applied once
    store.close()
    with pytest.raises(MradError, match="newer than this mrad-edge knows"):
        open_store(db)


@pytest.mark.parametrize("arguments, message", [
    (["--history", "{tmp}/nothing.sqlite"], "no history there"),
    (["--history", "{db}", "--from", "yesterday"], "--from 'yesterday' is not a time"),
    (["--history", "{db}", "--last", "8 parsecs"], "is not a duration"),
    (["--history", "{db}", "--chart", "{tmp}/c.png"], "--chart draws a report"),
    (["--history", "{db}", "--report", "shift", "--shifts", "6am"], "--shifts"),
    (["--history", "{db}", "--timezone", "Mars/Olympus"], "not a time zone"),
    (["--history", "{tmp}/not-a-db.txt"], "cannot be used"),
    (["--history", f"postgresql://mrad:{PASSWORD}@127.0.0.1:1/history"], "cannot be reached"),
])
def test_a_mistake_is_one_error_line(tmp_path, arguments, message):
    db = tmp_path / "h.sqlite"
    HistoryStore(db).close()
    (tmp_path / "not-a-db.txt").write_text("hello, not a database\n" * 100)
    given = [a.format(tmp=tmp_path, db=db) for a in arguments]
    result = CliRunner().invoke(history_cli.main, given)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        result.stderr
    assert PASSWORD not in result.output


def test_reading_never_makes_a_history(database):
    result = CliRunner().invoke(history_cli.main, ["--history", database, "--report", "day"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --history postgresql://127.0.0.1:")
    assert "no history there" in result.stderr and PASSWORD not in result.output
    import psycopg

    with psycopg.connect(database) as connection:
        assert connection.execute("SELECT to_regclass('mrad_schema')").fetchone() == (None,)


def test_mrad_run_refuses_history_settings_without_a_history(tf_bundle, target_images, tmp_path):
    result = CliRunner().invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(target_images[0]),
                                               "--history-pictures", str(tmp_path / "pictures")])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: --history-pictures, --history-buffer and the other --history-* settings are for the history: add "
        "--history PATH_OR_URL"]


def test_the_settings_file_and_the_station_file_set_the_history(tmp_path):
    from mrad.runtime.formats.station import parse_station

    config = tmp_path / "line.toml"
    config.write_text('history = "data/line.sqlite"\nhistory-pictures = "data/pictures"\nhistory-keep-bytes = "1.5GB"\n'
                      'history-good-every = 10\n')
    settings = line_settings(config, history_good_every=20)
    assert settings.history == tmp_path / "data" / "line.sqlite"
    assert settings.history_pictures == tmp_path / "data" / "pictures"
    assert (settings.history_keep_bytes, settings.history_good_every) == (1_500_000_000, 20)
    (tmp_path / "bundle").mkdir()
    station = parse_station({"recipes": [{"name": "a", "bundle": "bundle"}],
                             "outputs": {"history": f"postgresql://mrad:{PASSWORD}@db.plant/line3",
                                         "history-buffer": "buffer"}}, tmp_path / "station.toml")
    assert station.outputs["history"].endswith("@db.plant/line3") and station.outputs["history-buffer"] == \
        tmp_path / "buffer"
    with pytest.raises(MradError) as refused:
        line_settings(history=f"postgresql://mrad:{PASSWORD}@db.plant:99999/line3")
    assert PASSWORD not in str(refused.value) and "--history" in str(refused.value)


def test_a_history_written_by_mrad_run_is_read_by_mrad_history(tf_bundle, synth_data, tmp_path):
    parts = synth_data[1] / "checker" / "test"
    db = tmp_path / "line.sqlite"
    result = CliRunner().invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(parts), "--provider", "cpu",
                                               "--threshold", "0.5", "--history", str(db), "--station", "cam7"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    summary = records[-1]
    assert summary["sinks"][f"history {db}"]["delivered"] >= summary["frames"]
    shown = CliRunner().invoke(history_cli.main, ["--history", str(db), "--report", "day"])
    assert shown.exit_code == 0 and str(summary["frames"]) in shown.stdout and "FPY %" in shown.stdout
    exported = CliRunner().invoke(history_cli.main, ["--history", str(db), "--station", "cam7", "--limit", "2"])
    assert [json.loads(line)["frame"] for line in exported.stdout.splitlines()] == [0, 1]
    assert iso(0) == "1970-01-01T00:00:00.000+00:00"
