"""mrad-history: query the line's history, export it (CSV, JSON lines), and report the yield per shift or day."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from datetime import datetime, time, timezone, tzinfo
from pathlib import Path
from typing import Iterator, TextIO

import click

from ..errors import MradError
from ..files import atomic_file
from ..history.report import PERIODS, SHIFTS, chart, report, table
from ..history.report import COLUMNS as REPORT_COLUMNS
from ..history.store import COLUMNS, DECISIONS, Query, open_store, shown
from .common import command

MAX_LAST_DAYS = 36_500  # --last at most, in days
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

EXAMPLES = """
\b
Examples:
  # the anomalous frames of part-a in the last 8 hours, as JSON lines
  mrad-history --history line3.sqlite --last 8h --recipe part-a --decision anomalous
\b
  # a day's rows to a CSV file for a spreadsheet; the same as JSON lines
  mrad-history --history line3.sqlite --from 2025-05-20 --to 2025-05-21 --csv may20.csv
  mrad-history --history line3.sqlite --from 2025-05-20 --to 2025-05-21 --jsonl may20.jsonl
\b
  # the yield per shift (06:00, 14:00, 22:00) of the last week, a table and a chart
  mrad-history --history postgresql://mes.plant/line3 --last 7d --report shift --chart week.png
\b
Rows hold: time, station, run, frame_key, source, frame, camera_frame, part_id, recipe, bundle, enrollment,
calibration, threshold, threshold_stale, score, decision, latency_ms, late, age_ms, dropped, error, picture and
heatmap (files in the pictures folder; empty once deleted), and the operator's verdict (verdict, verdict_by,
verdict_at). Times are ISO 8601 in UTC; --from and --to take local times unless they carry an offset (or Z).
In the CSV an empty cell is a missing value (null in JSON) and true/false are the booleans.
\b
A report counts per period: frames, parts (rows of one part_id are one part; a row without one is a part), the
defect rate (parts anomalous at their last inspection), the first-pass yield (parts normal at their first),
false calls and misses (from the operator's verdicts) and score quantiles (p50, p90, p99). With --report,
--csv and --jsonl write the report's rows.
\b
A PostgreSQL password is best kept out of the URL (the process list shows it): PGPASSWORD or ~/.pgpass.
"""


@command("mrad-history", epilog=EXAMPLES)
@click.option("--history", "target", required=True, envvar="MRAD_HISTORY", show_envvar=True, metavar="PATH|URL",
              help="The history: a SQLite file written by mrad-run --history, or postgresql://[USER@]HOST[:PORT]/DB.")
@click.option("--from", "start", metavar="WHEN", help="From this time on: 2025-05-20, '2025-05-20 06:00', or ISO 8601 "
                                                      "with an offset.")
@click.option("--to", "end", metavar="WHEN", help="Up to this time (excluded); same forms as --from.")
@click.option("--last", metavar="DURATION", help="The last DURATION up to now (30m, 8h, 7d, 2w); instead of --from.")
@click.option("--station", help="Only this station's rows.")
@click.option("--recipe", help="Only this recipe's rows.")
@click.option("--source", help="Only this source's rows (as records name it).")
@click.option("--decision", type=click.Choice(DECISIONS),
              help="Only rows decided anomalous or normal, or error, dropped or late records.")
@click.option("--part-id", help="Only this part's rows.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many rows (the oldest first).")
@click.option("--csv", "csv_file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              help="Write CSV here ('-': stdout), one header line and a line per row.")
@click.option("--jsonl", "jsonl_file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              help="Write JSON lines here ('-': stdout) [default: stdout, when --csv is not given].")
@click.option("--report", "per", type=click.Choice(PERIODS),
              help="Instead of rows, the yield per day or per shift, as a table on stdout.")
@click.option("--shifts", default=",".join(t.strftime("%H:%M") for t in SHIFTS), show_default=True, metavar="HH:MM,...",
              help="With --report shift: when each shift starts; each runs until the next one starts.")
@click.option("--timezone", "zone_name", metavar="NAME",
              help="Days and shifts in this time zone (Europe/Berlin, UTC) [default: this machine's local time].")
@click.option("--chart", type=click.Path(path_type=Path, dir_okay=False),
              help="With --report: also a PNG chart of parts, defects and first-pass yield per period.")
def main(target, start, end, last, station, recipe, source, decision, part_id, limit, csv_file, jsonl_file, per,
         shifts, zone_name, chart: Path | None):
    """Query the line's history, export it, and report the yield per shift or day."""
    if chart is not None and per is None:
        raise MradError("--chart draws a report: add --report day or --report shift")
    if limit is not None and per is not None:
        raise MradError("--limit is for rows; a report counts every row of its range")
    zone = time_zone(zone_name)
    if last is not None and start is not None:
        raise MradError("--last and --from both say where the range starts: give one")
    start_ms = moment(start, "--from", zone) if start else None
    end_ms = moment(end, "--to", zone) if end else None
    if last is not None:
        start_ms = (end_ms or now_ms()) - round(duration(last) * 1000)
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise MradError("--to must be later than --from")
    query = Query(start_ms, end_ms, station, recipe, source, decision, part_id, limit)
    starts = shift_starts(shifts)
    store = open_store(target, create=False)
    try:
        if per is not None:
            rows = report(store, query, per, zone, starts)
            columns = REPORT_COLUMNS
            if chart is not None:
                what = ", ".join(f"{k} {v}" for k, v in (("station", station), ("recipe", recipe),
                                                          ("source", source)) if v)
                chart_of(rows, chart, f"{shown(target)}{': ' + what if what else ''}, per {per}")
            if csv_file is None and jsonl_file is None:
                click.echo(table(rows) if rows else "no rows in that range")
        else:
            rows, columns = store.rows(query), COLUMNS
            if csv_file is None and jsonl_file is None:
                jsonl_file = Path("-")
        export(rows, columns, csv_file, jsonl_file)
    finally:
        store.close()


def chart_of(rows: list[dict], path: Path, title: str) -> None:
    try:
        chart(rows, path, title)
    except OSError as exc:
        raise MradError(f"--chart {path} cannot be written: {exc}") from exc


def export(rows, columns: tuple[str, ...], csv_file: Path | None, jsonl_file: Path | None) -> None:
    """The rows to CSV and/or JSON lines, files or stdout; a file is written whole or not at all."""
    if str(csv_file) == str(jsonl_file) == "-":
        raise MradError("--csv - and --jsonl -: only one of them can go to stdout")
    try:
        with _output(csv_file) as csv_out, _output(jsonl_file) as jsonl_out:
            writer = csv.writer(csv_out, lineterminator="\n") if csv_out else None
            if writer:
                writer.writerow(columns)
            for row in rows:
                if writer:
                    writer.writerow([cell(row[c]) for c in columns])
                if jsonl_out:
                    jsonl_out.write(json.dumps({c: row[c] for c in columns}) + "\n")
    except OSError as exc:
        raise MradError(f"the export cannot be written: {exc}") from exc


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO | None]:
    """A text stream for ``path`` ('-': stdout; a file: written under a temporary name, swapped in at the end)."""
    if path is None:
        yield None
    elif str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
    else:
        with atomic_file(path) as binary:
            text = io.TextIOWrapper(binary, encoding="utf-8", newline="")
            yield text
            text.flush()
            text.detach()  # the file is atomic_file's to close and swap in


def cell(value) -> str:
    """A CSV cell: empty for a missing value, true/false for a boolean, else the value as JSON would write it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def now_ms() -> int:
    return round(datetime.now(timezone.utc).timestamp() * 1000)


def time_zone(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    if name.upper() in ("UTC", "Z"):
        return timezone.utc
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise MradError(f"--timezone {name[:64]!r} is not a time zone this machine knows (Europe/Berlin, UTC, ...)") \
            from exc


def moment(text: str, option: str, zone: tzinfo | None) -> int:
    """A time given on the command line, as ms since 1970 UTC; without an offset it is in ``zone`` (None: local)."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise MradError(f"{option} {text[:64]!r} is not a time: give 2025-05-20, '2025-05-20 06:00' or ISO 8601 "
                        "(2025-05-20T06:00:00+02:00)") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone) if zone is not None else parsed.astimezone()
    return round(parsed.timestamp() * 1000)


def duration(text: str) -> float:
    """Seconds of a duration such as 30m, 8h, 7d, 2w (or several: 1d12h)."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise MradError(f"--last {text[:32]!r} is not a duration: give a number and a unit, s, m, h, d or w (8h, 7d)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not 0 < seconds <= MAX_LAST_DAYS * 86400:
        raise MradError(f"--last: a duration from 1 second to {MAX_LAST_DAYS} days")
    return seconds


def shift_starts(text: str) -> tuple[time, ...]:
    try:
        starts = tuple(time.fromisoformat(item.strip()) for item in text.split(",") if item.strip())
    except ValueError as exc:
        raise MradError(f"--shifts {text[:64]!r}: give each shift's start as HH:MM, separated by commas "
                        "(06:00,14:00,22:00)") from exc
    if not starts:
        raise MradError("--shifts: give at least one shift's start (HH:MM)")
    return starts

