"""Yield reports from the history: per shift or per day, as rows, a table and a PNG chart (drawn with Pillow).

What a report counts in each period (rows of the query only):

- ``frames``: records (scored, error, dropped, late);
- ``parts``: parts decided: rows with the same ``part_id`` are one part
  (inspected again), a row without one is a part of its own;
- ``defect_rate``: parts decided anomalous at their last inspection / parts;
- ``first_pass_yield``: parts decided normal at their first inspection / parts;
- ``reviewed``, ``false_calls`` (decided anomalous, the operator said good),
  ``misses`` (decided normal, the operator said defect);
- ``score_p50``, ``score_p90``, ``score_p99``: quantiles of the scores, from a
  histogram of ``SCORE_BINS`` bins (exact to half a bin), the same SQL on
  SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import MradError
from .store import SCORE_BINS, HistoryStore, Query, iso

PERIODS = ("day", "shift")
SHIFTS = (time(6), time(14), time(22))  # shift starts: each shift runs to the next one's start
QUANTILES = (0.5, 0.9, 0.99)
MAX_PERIODS = 5000  # periods in one report at most (14 years of days, 4 of three shifts)
COLUMNS = ("period", "start", "end", "frames", "parts", "anomalous", "defect_rate", "first_pass_yield", "errors",
           "dropped", "late", "reviewed", "false_calls", "misses") + tuple(f"score_p{round(q * 100)}" for q in QUANTILES)
# The chart: its size, and a bar's width in pixels at least and at most.
CHART_HEIGHT, CHART_MARGIN, BAR_PX = 420, 56, (2, 48)
CHART_MAX_WIDTH = 4000


@dataclass(frozen=True)
class Period:
    label: str
    start: datetime
    end: datetime

    @property
    def start_ms(self) -> int:
        return round(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return round(self.end.timestamp() * 1000)


def periods(start_ms: int, end_ms: int, per: str, zone: tzinfo | None, shifts: tuple[time, ...] = SHIFTS) -> list[Period]:
    """The days (from midnight) or shifts that overlap [start_ms, end_ms), in ``zone`` (None: this machine's local
    time, its daylight saving time included)."""
    if per not in PERIODS:
        raise MradError(f"--report: expected one of {', '.join(PERIODS)}, got {per!r}")
    starts = (time(0),) if per == "day" else tuple(sorted(set(shifts)))
    if not starts:
        raise MradError("--shifts: give at least one shift's start (HH:MM)")
    first = datetime.fromtimestamp(start_ms / 1000, zone).date() - timedelta(days=1)
    last = datetime.fromtimestamp(end_ms / 1000, zone).date() + timedelta(days=1)
    if (last - first).days * len(starts) > MAX_PERIODS + 2 * len(starts):
        raise MradError(f"the report would have more than {MAX_PERIODS} periods: narrow --from/--to, or report "
                        "per day")
    moments = [(day, at, _at(day, at, zone)) for day in _days(first, last) for at in starts]
    found = []
    for (day, at, begin), (_, _, end) in zip(moments, moments[1:]):
        if end.timestamp() * 1000 > start_ms and begin.timestamp() * 1000 < end_ms:
            label = day.isoformat() if per == "day" else f"{day.isoformat()} {at.strftime('%H:%M')}"
            found.append(Period(label, begin, end))
    return found


def _days(first: date, last: date):
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def _at(day: date, at: time, zone: tzinfo | None) -> datetime:
    moment = datetime.combine(day, at)
    return moment.replace(tzinfo=zone) if zone is not None else moment.astimezone()


def report(store: HistoryStore, query: Query, per: str, zone: tzinfo | None = None,
           shifts: tuple[time, ...] = SHIFTS) -> list[dict]:
    """One row per day or shift of ``query``'s range (its rows' range when open), keys as ``COLUMNS``."""
    start_ms, end_ms = query.start_ms, query.end_ms
    if start_ms is None or end_ms is None:
        first, last = store.span(query)
        if first is None:
            return []
        start_ms = first if start_ms is None else start_ms
        end_ms = last + 1 if end_ms is None else end_ms
    rows = []
    for period in periods(start_ms, end_ms, per, zone, shifts):
        counts = store.counts(query, period.start_ms, period.end_ms)
        if not counts["frames"]:
            continue
        parts = counts["parts"]
        row = {"period": period.label, "start": iso(period.start_ms), "end": iso(period.end_ms),
               "frames": counts["frames"], "parts": parts, "anomalous": counts["anomalous"],
               "defect_rate": round(counts["last_failed"] / parts, 6) if parts else None,
               "first_pass_yield": round((parts - counts["first_failed"]) / parts, 6) if parts else None,
               **{k: counts[k] for k in ("errors", "dropped", "late", "reviewed", "false_calls", "misses")}}
        row.update(zip(COLUMNS[-len(QUANTILES):], quantiles(store.score_histogram(query, period.start_ms,
                                                                                   period.end_ms))))
        rows.append(row)
    return rows


def quantiles(histogram: dict[int, int], qs: tuple[float, ...] = QUANTILES) -> list[float | None]:
    """The ``qs`` quantiles of the scores counted in ``histogram`` (bin -> count): the centre of the bin holding
    the smallest score with at least that share of the scores at or below it."""
    total = sum(histogram.values())
    if not total:
        return [None] * len(qs)
    found, seen, cells = [], 0, sorted(histogram.items())
    wanted = iter(qs)
    q = next(wanted)
    for cell, n in cells:
        seen += n
        while q is not None and seen >= q * total:
            found.append(round((cell + 0.5) / SCORE_BINS, 6))
            q = next(wanted, None)
    return found


def table(rows: list[dict]) -> str:
    """The report for people: one line per period, rates in percent."""
    heads = ("period", "frames", "parts", "defects %", "FPY %", "false calls", "misses", "reviewed", "errors",
             "p50", "p90", "p99")
    lines = []
    for row in rows:
        lines.append((row["period"], str(row["frames"]), str(row["parts"]), _percent(row["defect_rate"]),
                      _percent(row["first_pass_yield"]), str(row["false_calls"]), str(row["misses"]),
                      str(row["reviewed"]), str(row["errors"]),
                      *(f"{row[c]:.4f}" if row[c] is not None else "-" for c in COLUMNS[-len(QUANTILES):])))
    widths = [max(len(h), *(len(line[k]) for line in lines)) if lines else len(h) for k, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) if k == 0 else h.rjust(w) for k, (h, w) in enumerate(zip(heads, widths)))]
    out += ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join(out)


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}"


def chart(rows: list[dict], path: Path, title: str) -> None:
    """A PNG: per period, a bar of the parts (the defective share in red), and the first-pass yield as a line on
    the right-hand axis (0 to 100 %); false calls and misses written above their bars."""
    from ..files import atomic_file

    count = max(len(rows), 1)
    bar = min(max((CHART_MAX_WIDTH - 2 * CHART_MARGIN) // count - 2, BAR_PX[0]), BAR_PX[1])
    width = min(CHART_MAX_WIDTH, max(640, 2 * CHART_MARGIN + count * (bar + 2)))
    image = Image.new("RGB", (width, CHART_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = CHART_MARGIN, width - CHART_MARGIN, 40, CHART_HEIGHT - 60
    draw.text((left, 10), title, fill="black", font=font)
    draw.rectangle((left, top, right, bottom), outline="#888888")
    most = max((row["parts"] for row in rows), default=0) or 1
    draw.text((4, top), str(most), fill="#555555", font=font)
    draw.text((4, bottom - 10), "0", fill="#555555", font=font)
    draw.text((right + 4, top), "100%", fill="#1f5fbf", font=font)
    draw.text((right + 4, bottom - 10), "0%", fill="#1f5fbf", font=font)
    step = (right - left) / count
    points = []
    for k, row in enumerate(rows):
        x = left + k * step + (step - bar) / 2
        height = (bottom - top) * row["parts"] / most
        draw.rectangle((x, bottom - height, x + bar, bottom), fill="#b8c4d6")
        failed = (row["defect_rate"] or 0) * height
        if failed:
            draw.rectangle((x, bottom - failed, x + bar, bottom), fill="#d04a3a")
        if row["first_pass_yield"] is not None:
            points.append((x + bar / 2, bottom - (bottom - top) * row["first_pass_yield"]))
        if row["false_calls"] or row["misses"]:
            draw.text((x, max(top + 2, bottom - height - 12)), f"{row['false_calls']}/{row['misses']}",
                      fill="#7a3d00", font=font)
        if count <= 40 or k % max(1, count // 20) == 0:  # labels that still fit side by side
            draw.text((x, bottom + 4 + 12 * (k % 2)), row["period"][5:], fill="black", font=font)
    if len(points) > 1:
        draw.line(points, fill="#1f5fbf", width=2)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill="#1f5fbf")
    draw.text((left, CHART_HEIGHT - 24), "bars: parts (red: defective); line: first-pass yield; "
              "a/b: false calls/misses (operator verdicts)", fill="#555555", font=font)
    with atomic_file(Path(path)) as f:
        image.save(f, format="PNG")
