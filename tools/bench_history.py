"""What the line's history costs: per frame while inspecting, and a yield report over a million rows.

    python -m mrad.tools.bench_history --bundle bundles/tiny [--records 5000] [--rows 1000000]

For SQLite (a file in a temporary folder) and PostgreSQL (a throwaway server
of Debian's package on loopback, or ``--postgres URL``), prints:

- ``write``: the time the inspection thread spends handing a record to the
  history sink, per record (what scoring waits for);
- ``CPU``: this process's CPU time per record until every row is committed
  (the writer thread's work: it competes with inspection for the cores);
- with ``--bundle``, both as a share of the bundle's frame time (one frame
  scored at a time on the CPU, measured just before);
- the time to load ``--rows`` rows (the writer's own batched inserts), and a
  yield report over all of them, per day and per shift.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import numpy as np

from ..runtime.history.report import report
from ..runtime.history.sink import HistorySink
from ..runtime.history.store import Query, open_store
from ..runtime.line.records import now

LOAD_BATCH = 10_000  # rows per transaction while loading the million
WARM_FRAMES = 5
TIMED_FRAMES = 50
DAYS = 7  # the million rows span a week


def frame_ms(bundle: Path) -> float:
    from ..runtime import Detector

    detector = Detector(bundle, provider="cpu")
    side = detector.manifest.preprocess.image_size
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    for _ in range(WARM_FRAMES):
        detector.predict(image)
    start = time.perf_counter()
    for _ in range(TIMED_FRAMES):
        detector.predict(image)
    return (time.perf_counter() - start) / TIMED_FRAMES * 1000


def frame_records(n: int) -> list[dict]:
    return [{"source": "rtsp://10.0.0.5/stream", "frame": i, "timestamp": now(), "score": 0.4321,
             "decision": "anomalous" if i % 50 == 0 else "normal", "recipe": "part-a",
             "scored_by": {"bundle": "sha256:5f1c0123456789ab", "enrollment": 3, "calibration": "9a0e41c2b7d1",
                           "threshold": 0.47}, "latency_ms": 80.1} for i in range(n)]


def per_record(name: str, target, batch: list[dict], frame: float | None) -> None:
    sink = HistorySink(target, "bench")
    sink.flush(10)
    cpu, start = time.process_time(), time.perf_counter()
    for record in batch:
        sink.write(record)
    written = time.perf_counter()
    ok = sink.flush(300)
    cpu = time.process_time() - cpu
    sink.close(10)
    n = len(batch)
    write_us, cpu_us = (written - start) / n * 1e6, cpu / n * 1e6
    share = (f" ({write_us / 10 / frame:.3f} % / {cpu_us / 10 / frame:.3f} % of a {frame:.1f} ms frame)"
             if frame else "")
    click.echo(f"{name:12s} write {write_us:6.1f} us/record, CPU {cpu_us:6.1f} us/record{share}"
               f"{'' if ok else ' (NOT ALL WRITTEN)'}")


def rows(n: int, start: datetime):
    step = DAYS * 86400 * 1000 / n
    rng = np.random.default_rng(1)
    for first in range(0, n, LOAD_BATCH):
        scores = rng.random(min(LOAD_BATCH, n - first))
        yield [{"frame_key": f"bench00-00000000-{first + k}", "run": "bench00",
                "at_ms": round(start.timestamp() * 1000 + (first + k) * step), "station": "bench",
                "source": "cam1", "frame": first + k, "camera_frame": None,
                "part_id": f"P{(first + k) // 2}" if (first + k) % 10 < 2 else None, "recipe": "part-a",
                "bundle": "sha256:5f1c", "enrollment": 3, "calibration": None, "threshold": 0.9,
                "threshold_stale": 0, "score": float(s), "decision": "anomalous" if s > 0.9 else "normal",
                "latency_ms": 12.0, "late": 0, "age_ms": None, "dropped": None, "error": None, "picture": None,
                "heatmap": None} for k, s in enumerate(scores)]


def yield_query(name: str, target, n: int) -> None:
    store = open_store(target)
    start = datetime(2025, 5, 19, tzinfo=timezone.utc)
    tic = time.perf_counter()
    for batch in rows(n, start):
        store.write(rows=batch)
    loaded = time.perf_counter() - tic
    query = Query(start_ms=round(start.timestamp() * 1000),
                  end_ms=round((start + timedelta(days=DAYS)).timestamp() * 1000))
    timings = []
    for per in ("day", "shift"):
        tic = time.perf_counter()
        found = report(store, query, per, timezone.utc)
        timings.append((per, time.perf_counter() - tic, len(found), sum(r["frames"] for r in found)))
    store.close()
    click.echo(f"{name:12s} load {n:,} rows {loaded:6.1f} s ({n / loaded:,.0f} rows/s); " + "; ".join(
        f"report per {per} {seconds:5.2f} s ({periods} periods, {frames:,} rows)"
        for per, seconds, periods, frames in timings))


@click.command()
@click.option("--bundle", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="A bundle whose frame time (CPU, one frame at a time) the per-record cost is set against.")
@click.option("--records", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--rows", "row_count", default=1_000_000, show_default=True, type=click.IntRange(min=1))
@click.option("--postgres", metavar="URL", help="A PostgreSQL database to use [default: a throwaway server].")
def main(bundle: Path | None, records: int, row_count: int, postgres: str | None) -> None:
    """Per-frame cost of the history, and a yield report over a million rows, on SQLite and PostgreSQL."""
    from .postgres import WHY_NOT, Postgres

    frame = frame_ms(bundle) if bundle else None
    if frame:
        click.echo(f"frame time ({bundle.name}, CPU, batch 1): {frame:.2f} ms")
    folder = Path(tempfile.mkdtemp(prefix="bench-history-"))
    server = None
    try:
        if postgres is None:
            server = Postgres.find()
            if server is None:
                click.echo(f"PostgreSQL skipped: {WHY_NOT}")
            else:
                server.start()
                postgres = server.create_database("bench")
        batch = frame_records(records)
        per_record("SQLite", folder / "per-record.sqlite", batch, frame)
        if postgres:
            per_record("PostgreSQL", postgres, batch, frame)
        yield_query("SQLite", folder / "million.sqlite", row_count)
        if postgres:
            yield_query("PostgreSQL", postgres, row_count)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
