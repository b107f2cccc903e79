"""Soak test: the real line engine on a long synthetic line with corrupt frames and camera drops.

    python -m mrad.tools.soak --bundle bundles/visa-tf --frames 10000 --corrupt 0.1 --drop-every 500

What it proves. A :class:`~mrad.runtime.line.engine.LineEngine` scoring with a real
:class:`~mrad.runtime.core.detector.Detector` is fed ``--frames`` frames by a
synthetic source. A share ``--corrupt`` of them (chosen with ``--seed``) are
corrupt: truncated PNG files, files of random bytes, empty files, 16-bit grey
arrays, float arrays and empty arrays, each handed to the runtime's own
decoder (:func:`~mrad.runtime.core.preprocess.load_rgb`) and, when it refuses
them, turned into a frame with ``error`` set, as ``runtime/sources.py`` does
with unreadable files. Every ``--drop-every`` frames the camera "drops": the
source sends ``camera_lost`` then ``camera_reopened`` event records through
the engine, as ``Camera`` does (without waiting). Records go both to a
:class:`~mrad.runtime.line.sinks.JsonLines` file (``--out``, else a temporary file
removed at the end) and to an in-memory tally. The run passes when

- every offered frame has exactly one frame record (a score or an error),
- no exception escaped the engine (a crash: its traceback goes to stderr),
- the resident memory grew at most ``--max-rss-growth`` (5 %) from the 10 %
  point of the run (after warm-up: arenas, caches) to the end,

and exits 0; otherwise it says which condition failed and exits 1.

How to read the output (one ``name: value`` per line, on stdout):

    frames offered             frames the source yielded
    corrupt frames injected    of those, corrupt by construction
    camera drops simulated     each gives two event records
    records written            all records, then split: scores, errors, events
                               (scores + errors = frames offered; events = 2 per drop + the summary)
    lines in out file          what the JsonLines sink wrote: the same as records written
    frames unaccounted for     offered frames without exactly one frame record (and records of no offered frame)
    crashes                    exceptions that escaped the engine
    rss MB at start / at 10% / at end, rss growth after warm-up
                               resident memory now (not peak), after the bundle is open
    open fds at start / at end file descriptors, after the bundle is open and before anything is closed
    throughput frames/s        frames offered over the run's wall time

then ``FAILED: ...`` for each condition that failed, and ``soak passed`` or ``soak failed``.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import click
import numpy as np
from PIL import Image

from mrad.runtime.line.sinks import Sink
from mrad.runtime.commands.common import bundle_option, command
from mrad.runtime.core.detector import Detector
from mrad.runtime.line.engine import LineEngine
from mrad.runtime.errors import ImageError, MradError
from mrad.runtime.core.preprocess import load_rgb
from mrad.runtime.line.records import event_record, now
from mrad.runtime.line.sinks import JsonLines
from mrad.runtime.line.sources import Frame

from .bench import synthetic_frames

SOURCE_NAME = "soak"
GOOD_FRAME_POOL = 16  # distinct good frames, cycled: the source itself holds constant memory
WARMUP_SHARE = 0.10  # RSS growth is measured from this share of the frames to the end
DEFAULT_MAX_RSS_GROWTH = 0.05
MAX_GARBAGE_BYTES = 4096
MAX_TALLY = 255  # a frame index's record count saturates here (it only has to be told apart from 1)
MB = 1024 * 1024
EXIT_SOAK_FAILED = 1
CORRUPT_KINDS = ("truncated_png", "random_bytes", "empty_file", "uint16_grey_array", "float_array", "empty_array",
                 "malformed_frame")


def rss_mb() -> float:
    """Resident memory now (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MB


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class MalformedFrame:
    """An image handed to the engine as is, without the source's decoding (a camera SDK's bad buffer)."""

    def __init__(self, image: np.ndarray):
        self.image = image


class SyntheticLine:
    """Good frames from a small pool, corrupt frames through the real decoder, camera drops as events."""

    def __init__(self, frames: int, corrupt: float, drop_every: int, size: tuple[int, int], seed: int, folder: Path):
        self.rng = np.random.default_rng(seed)
        self.count, self.drop_every, self.folder = frames, drop_every, folder
        self.width, self.height = size
        self.corrupt = set(self.rng.choice(frames, size=round(frames * corrupt), replace=False).tolist())
        self.pool = synthetic_frames(GOOD_FRAME_POOL, self.width, self.height, seed)
        self.png = png_bytes(self.pool[0])
        self.offered = self.drops = 0

    def frames(self, events: Callable[[dict], None]) -> Iterator[Frame]:
        for index in range(self.count):
            if self.drop_every and index and index % self.drop_every == 0:
                self.drop(events)
            item = self.corrupt_input() if index in self.corrupt else self.pool[index % len(self.pool)]
            frame = self.decode(item, index)
            self.offered += 1
            yield frame

    def drop(self, events: Callable[[dict], None]) -> None:
        """The two records Camera sends when it loses the camera and gets it back."""
        self.drops += 1
        events(event_record("camera_lost", source=SOURCE_NAME))
        events(event_record("camera_reopened", source=SOURCE_NAME, waited_s=0.0))

    def decode(self, item, index: int) -> Frame:
        """As runtime/sources.py reads a file: the decoded image, or the decoder's refusal as the frame's error.

        A malformed frame (as a camera SDK might deliver) reaches the engine undecoded, for it to refuse.
        """
        if isinstance(item, MalformedFrame):
            return Frame(SOURCE_NAME, index, now(), image=item.image)
        try:
            return Frame(SOURCE_NAME, index, now(), image=np.asarray(load_rgb(item)))
        except ImageError as exc:
            return Frame(SOURCE_NAME, index, now(), error=str(exc))

    def corrupt_input(self):
        """A file path or an array the decoder must refuse; the kind is drawn with the seed."""
        kind = CORRUPT_KINDS[self.rng.integers(len(CORRUPT_KINDS))]
        if kind == "uint16_grey_array":
            return self.rng.integers(0, 2 ** 16, size=(self.height, self.width), dtype=np.uint16)
        if kind == "float_array":
            return self.rng.random((self.height, self.width, 3), dtype=np.float32)
        if kind == "empty_array":
            return np.zeros((0, self.width, 3), dtype=np.uint8)
        if kind == "malformed_frame":
            return MalformedFrame(self.rng.random((self.height, self.width), dtype=np.float32))
        content = {"truncated_png": lambda: self.png[: self.rng.integers(1, len(self.png))],
                   "random_bytes": lambda: self.rng.bytes(int(self.rng.integers(1, MAX_GARBAGE_BYTES))),
                   "empty_file": lambda: b""}[kind]()
        path = self.folder / f"{kind}.png"  # one file per kind, rewritten: the disk does not fill up
        path.write_bytes(content)
        return path


class Tally(Sink):
    """A sink that counts records and how many frame records each offered frame index got."""

    needs_picture = False

    def __init__(self, frames: int):
        self.per_frame = bytearray(frames)
        self.scores = self.errors = self.events = self.strays = self.dropped = 0

    def write(self, record: dict, picture: np.ndarray | None = None) -> None:
        if "event" in record:
            self.events += 1
            return
        self.dropped += "dropped" in record
        self.errors += "error" in record
        self.scores += "error" not in record and "dropped" not in record
        index = record.get("frame")
        if isinstance(index, int) and 0 <= index < len(self.per_frame):
            self.per_frame[index] = min(self.per_frame[index] + 1, MAX_TALLY)
        else:
            self.strays += 1

    @property
    def records(self) -> int:
        return self.scores + self.errors + self.dropped + self.events

    def unaccounted(self, offered: int) -> list[int]:
        """Offered frame indexes without exactly one frame record."""
        return [i for i, n in enumerate(self.per_frame[:offered]) if n != 1]


def at_index(frames: Iterator[Frame], index: int, callback: Callable[[], None]) -> Iterator[Frame]:
    """Pass frames through; call ``callback`` just before the frame of ``index`` is handed on."""
    for frame in frames:
        if frame.index == index:
            callback()
        yield frame


def run_engine(engine: LineEngine, frames: Iterator[Frame]) -> tuple[int, float]:
    """Run to the end; an exception escaping the engine is a crash, counted and its traceback printed."""
    tic = time.perf_counter()
    try:
        engine.run(frames)
        crashes = 0
    except Exception:  # noqa: BLE001 -- any escape is what the soak looks for
        traceback.print_exc()
        crashes = 1
    return crashes, time.perf_counter() - tic


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise MradError(f"--size {text!r} must be WIDTHxHEIGHT, e.g. 160x120") from None
    if width < 1 or height < 1:
        raise MradError(f"--size {text!r} must be at least 1x1")
    return width, height


def report(measured: dict) -> list[str]:
    """The printed lines, then the failed conditions."""
    m = measured  # short, for the format strings
    growth = (m["rss_end"] - m["rss_warm"]) / m["rss_warm"]
    lines = [f"frames offered: {m['offered']}", f"corrupt frames injected: {m['corrupt']}",
             f"camera drops simulated: {m['drops']}", f"records written: {m['records']}", f"scores: {m['scores']}",
             f"errors: {m['errors']}", f"dropped: {m['dropped']}", f"events: {m['events']}", f"lines in out file: {m['out_lines']}",
             f"frames unaccounted for: {len(m['unaccounted']) + m['strays']}", f"crashes: {m['crashes']}",
             f"rss MB at start: {m['rss_start']:.1f}", f"rss MB at 10%: {m['rss_warm']:.1f}",
             f"rss MB at end: {m['rss_end']:.1f}", f"rss growth after warm-up: {growth:+.2%}",
             f"open fds at start: {m['fds_start']}", f"open fds at end: {m['fds_end']}",
             f"throughput frames/s: {m['offered'] / m['seconds']:.1f}"]
    failed = []
    if m["unaccounted"] or m["strays"]:
        failed.append(f"{len(m['unaccounted'])} offered frames without exactly one frame record (first: "
                      f"{m['unaccounted'][:5]}), {m['strays']} records of no offered frame")
    if m["crashes"]:
        failed.append("an exception escaped the engine (traceback on stderr)")
    if growth > m["max_growth"]:
        failed.append(f"RSS grew {growth:.2%} after warm-up, more than {m['max_growth']:.2%}")
    if m["out_lines"] != m["records"]:
        failed.append(f"the out file holds {m['out_lines']} lines for {m['records']} records")
    return lines + [f"FAILED: {reason}" for reason in failed] + ["soak failed" if failed else "soak passed"]


@command("soak")
@bundle_option
@click.option("--frames", default=10000, show_default=True, type=click.IntRange(min=1), help="Frames to offer.")
@click.option("--corrupt", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="Share of corrupt frames.")
@click.option("--drop-every", default=500, show_default=True, type=click.IntRange(min=0),
              help="A camera drop every this many frames (0: none).")
@click.option("--seed", default=0, show_default=True, help="Chooses the corrupt frames, their kinds and the images.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Frames per encoder call.")
@click.option("--size", default="160x120", show_default=True, help="Frame size WIDTHxHEIGHT.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="JSON lines file [default: a temporary file, removed at the end].")
@click.option("--when-behind", type=click.Choice(("queue", "drop-oldest", "off")), default="off", show_default=True,
              help="Read frames ahead in a thread, as mrad-run does (see mrad-run --help); off: one at a time.")
@click.option("--max-rss-growth", default=DEFAULT_MAX_RSS_GROWTH, show_default=True, type=click.FloatRange(min=0),
              help="Largest RSS growth allowed from the 10 % point to the end, as a fraction.")
def main(bundle, frames, corrupt, drop_every, seed, batch, size, out, when_behind, max_rss_growth):
    """Drive the line engine through a long synthetic line; exit 1 on a lost frame, a crash or memory growth."""
    if not Path("/proc/self/statm").exists():
        raise MradError("the soak reads /proc/self (resident memory, open files): it runs on Linux only")
    with tempfile.TemporaryDirectory(prefix="mrad-soak-") as folder:
        lines = soak(bundle, frames, corrupt, drop_every, seed, batch, parse_size(size),
                     out or Path(folder) / "soak.jsonl", Path(folder), max_rss_growth,
                     None if when_behind == "off" else when_behind)
    click.echo("\n".join(lines))
    if lines[-1] != "soak passed":
        sys.exit(EXIT_SOAK_FAILED)


def soak(bundle: Path, frames: int, corrupt: float, drop_every: int, seed: int, batch: int, size: tuple[int, int],
         out: Path, folder: Path, max_growth: float, when_behind: str | None = None) -> list[str]:
    detector = Detector(bundle, provider="cpu")
    line = SyntheticLine(frames, corrupt, drop_every, size, seed, folder)
    tally = Tally(frames)
    measured = {"corrupt": len(line.corrupt), "max_growth": max_growth}
    try:
        stream = open(out, "wb")
    except OSError as exc:
        raise MradError(f"--out cannot be written: {exc}") from exc
    with stream:
        engine = LineEngine(detector, [JsonLines(stream), tally], batch=batch, when_behind=when_behind)
        measured.update(rss_start=rss_mb(), rss_warm=rss_mb(), fds_start=open_fds())
        warm_index = int(frames * WARMUP_SHARE)
        warmed = at_index(line.frames(engine.event), warm_index, lambda: measured.update(rss_warm=rss_mb()))
        measured["crashes"], measured["seconds"] = run_engine(engine, warmed)
        measured.update(rss_end=rss_mb(), fds_end=open_fds())
    measured.update(offered=line.offered, drops=line.drops, records=tally.records, scores=tally.scores,
                    errors=tally.errors, dropped=tally.dropped, events=tally.events, strays=tally.strays,
                    unaccounted=tally.unaccounted(line.offered), out_lines=count_lines(out))
    return report(measured)


if __name__ == "__main__":
    main()
