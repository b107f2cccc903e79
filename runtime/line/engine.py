"""The line engine: frames -> batches -> Detector -> records -> sinks.

``mrad-run``, tests and any server drive the same :class:`LineEngine`. Every
frame a source yields becomes exactly one record (a result, an error, a
dropped or a late frame); camera gaps and the closing summary are event
records, all made by :mod:`~mrad.runtime.line.records`.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from .. import defaults
from ..core.detector import Detector
from ..formats.station import RecipeConfig
from .policy import DecisionPolicy
from .station import Recipe, Station
from ..errors import MradError, SourceError
from ..files import atomic_file
from ..core.overlay import overlay
from .sinks import Sink
from .records import dropped_record, event_record, frame_record, late_record
from ..core.result import Result
from .sources import Frame


LOST = ("dropped", "failed", "undelivered")
PER_SOURCE = ("frames", "errors", "dropped", "late", "anomalous")  # what the summary counts for each source


class Stop:
    """A stop request: the engine finishes the batch in hand, then stops."""

    def __init__(self):
        self._event = threading.Event()
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as a stop is requested."""
        return self._event.wait(seconds)

    def __bool__(self) -> bool:
        return self._event.is_set()

    def on_signals(self, signals=(signal.SIGINT, signal.SIGTERM)) -> "Stop":
        """Request a stop on these signals (main thread only), named after the signal."""
        for sig in signals:
            signal.signal(sig, lambda signum, _frame: self.request(signal.Signals(signum).name))
        return self


class RunStats:
    """Counts and latencies of a run, for the closing summary; with ``sources`` (their names), also per source."""

    def __init__(self, sources: list[str] | None = None):
        self.started = time.perf_counter()
        self.ended: float | None = None  # scoring over (closing sinks is not counted in fps)
        self.latencies: list[float] = []
        self.errors = 0
        self.anomalous = 0
        self.output_errors = 0  # records or maps that could not be written
        self.first_output_error: str | None = None
        self.dropped = 0  # frames read but not scored (--when-behind drop-oldest, or a stop with frames queued)
        self.late = 0  # frames decided past their deadline, scored or not
        self.late_unscored = 0  # of those, the ones past it before scoring began
        self.sources: list[str] | None = None
        self.per_source: list[dict[str, int]] = []
        self.failed: dict[int, str] = {}  # source position -> why it failed for good
        self.per_recipe: dict[str, dict[str, int]] = {}  # scored frames and anomalous ones per recipe
        if sources is not None:
            self.count_sources(sources)

    def count_sources(self, sources: list[str]) -> None:
        """Count per source too, the sources named in the order of ``Frame.stream``."""
        self.sources, self.per_source = list(sources), [dict.fromkeys(PER_SOURCE, 0) for _ in sources]

    def output_failed(self, message: str, count: int = 1) -> None:
        self.output_errors += count
        self.first_output_error = self.first_output_error or message

    def add(self, record: dict, stream: int = 0) -> None:
        if self.per_source:
            counts = self.per_source[stream]
            counts["frames"] += 1
            if "dropped" in record:
                counts["dropped"] += 1
            elif "error" in record:
                counts["errors"] += 1
            else:  # scored, or late unscored: both say "late" when past the deadline
                counts["late"] += record.get("late", False)
                counts["anomalous"] += record.get("decision") == "anomalous"
        if "dropped" in record:
            self.dropped += 1
        elif "error" in record:
            self.errors += 1
        elif "score" not in record:  # a late record: past its deadline, not scored
            self.late += 1
            self.late_unscored += 1
        else:
            self.latencies.append(record["latency_ms"])
            self.anomalous += record.get("decision") == "anomalous"
            self.late += record.get("late", False)
            if "recipe" in record:
                counts = self.per_recipe.setdefault(record["recipe"], dict.fromkeys(("frames", "anomalous"), 0))
                counts["frames"] += 1
                counts["anomalous"] += record.get("decision") == "anomalous"

    def summary(self, threshold_origin: str, stopped_by: str | None) -> dict:
        """The closing summary; with records of several recipes, their counts per recipe too."""
        elapsed = (self.ended or time.perf_counter()) - self.started
        frames = len(self.latencies) + self.errors + self.dropped + self.late_unscored
        summary = {"frames": frames, "errors": self.errors, "seconds": round(elapsed, 3),
                   "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0, "threshold": threshold_origin,
                   "anomalous": self.anomalous, "stopped_by": stopped_by, "output_errors": self.output_errors,
                   "dropped": self.dropped, "late": self.late, "late_unscored": self.late_unscored}
        if self.first_output_error:
            summary["first_output_error"] = self.first_output_error
        if self.latencies:
            p50, p95 = np.percentile(self.latencies, [50, 95])
            summary.update(latency_p50_ms=round(float(p50), 2), latency_p95_ms=round(float(p95), 2))
        if len(self.per_recipe) > 1 or (self.per_recipe and "default" not in self.per_recipe):
            summary["recipes"] = {name: dict(counts) for name, counts in self.per_recipe.items()}
        if self.sources is not None:
            summary["sources"] = {name: {**counts, **({"failed": self.failed[k]} if k in self.failed else {})}
                                  for k, (name, counts) in enumerate(zip(self.sources, self.per_source))}
        return summary


def summary_line(summary: dict) -> str:
    """The summary for people, one line."""
    text = f"{summary['frames']} frames, {summary['errors']} errors, {summary['fps']:.1f} frames/s"
    if summary.get("dropped"):
        text += f", {summary['dropped']} dropped unscored"
    if summary.get("late"):
        text += f", {summary['late']} past the deadline ({summary['late_unscored']} of them unscored)"
    if "latency_p50_ms" in summary:
        text += f", latency p50 {summary['latency_p50_ms']:.1f} ms, p95 {summary['latency_p95_ms']:.1f} ms"
    if len(summary.get("sources", ())) > 1:
        text += "; " + ", ".join(f"{name}: {counts['frames']}" + (" (failed)" if "failed" in counts else "")
                                 for name, counts in summary["sources"].items())
    text += f"; threshold: {summary['threshold']}"
    if summary["stopped_by"]:
        text += f"; stopped by {summary['stopped_by']}"
    if summary.get("output_errors"):
        text += f"; {summary['output_errors']} outputs could not be written (first: {summary['first_output_error']})"
    for name, counts in summary.get("sinks", {}).items():
        text += f"; {name}: " + (", ".join(f"{n} {what}" for what, n in counts.items() if n) or "nothing to send")
    return text


def hand_out(sinks: Iterable[Sink], stats: RunStats, record: dict, picture: np.ndarray | None = None,
             frame: np.ndarray | None = None, anomaly_map: np.ndarray | None = None) -> None:
    """Give a record to every sink; a sink that cannot write (disk full, read-only) is counted, not fatal.

    The caller holds whatever lock keeps records of several threads apart.
    """
    for sink in sinks:
        try:
            if sink.needs_frame:
                sink.write(record, picture, frame, anomaly_map)
            else:
                sink.write(record, picture)
        except Exception as exc:  # noqa: BLE001 - a failing sink (full disk, library error) never stops inspection
            stats.output_failed(f"{type(sink).__name__}: {exc}")


def close_sinks(sinks: Iterable[Sink], stats: RunStats, timeout: float) -> dict[str, dict]:
    """Close every sink that can be closed, within ``timeout`` seconds for all; their counts by name.

    What a sink lost (``LOST``) is counted in ``stats`` as outputs not written.
    """
    deadline = time.monotonic() + timeout
    counts = {}
    for sink in sinks:
        if type(sink).close is Sink.close:  # holds nothing to deliver
            continue
        name = sink.name
        try:
            counts[name] = sink.close(max(0.0, deadline - time.monotonic())) or {}
        except Exception as exc:  # noqa: BLE001 - as in hand_out: counted, never fatal
            stats.output_failed(f"{name}: {exc}")
            continue
        lost = sum(counts[name].get(what, 0) for what in LOST)
        if lost:
            stats.output_failed(f"{name}: {lost} records not delivered", lost)
    return counts


WHEN_BEHIND = ("queue", "drop-oldest")


class _Lane:
    """One source's side of a :class:`ReadAhead`: its thread's frames, waiting in a queue of their own."""

    def __init__(self):
        self.queue: collections.deque[Frame] = collections.deque()
        self.dropped: list[Frame] = []
        self.failure: Exception | None = None
        self.reported = False  # its failure handed to the consumer
        self.done = False

    @property
    def over(self) -> bool:
        """Read to its end (or failed), and every frame handed out."""
        return self.done and not self.queue


class ReadAhead:
    """Sources read each in its own thread, so reading, decoding and ``prepare`` overlap scoring and each other.

    Each source has its own bounded queue of ``size`` frames, and the
    consumer takes from them in turn (round-robin): a fast source fills only
    its own queue and can never starve a slow one. A full queue: its reader
    waits (``drop_oldest`` False), or that source's oldest queued frame is
    taken out and handed to the consumer as dropped. A source that fails for
    good hands its error over after the frames it already gave; the others
    read on.
    """

    def __init__(self, sources: Iterable[Iterator[Frame]], size: int, drop_oldest: bool,
                 prepare: Callable[[Frame], Frame] = lambda frame: frame):
        self.size, self.drop_oldest, self.prepare = size, drop_oldest, prepare
        sources = list(sources)
        self.lanes = [_Lane() for _ in sources]
        self._turn = 0  # the lane asked first for the next frame
        self._closed = False
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(lane, frames), daemon=True,
                                          name="mrad-read-ahead" + (f"-{k}" if len(sources) > 1 else ""))
                         for k, (lane, frames) in enumerate(zip(self.lanes, sources))]
        for thread in self._threads:
            thread.start()

    def _read(self, lane: _Lane, frames: Iterator[Frame]) -> None:
        try:
            for frame in frames:
                frame = self.prepare(frame)
                with self._changed:
                    while len(lane.queue) >= self.size and not self.drop_oldest and not self._closed:
                        self._changed.wait(_WAIT_S)
                    if self._closed:
                        lane.dropped.append(frame)
                        return
                    if len(lane.queue) >= self.size:
                        lane.dropped.append(lane.queue.popleft())
                    lane.queue.append(frame)
                    self._changed.notify_all()
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it: nothing ends silently
            lane.failure = exc
        finally:
            with self._changed:
                lane.done = True
                self._changed.notify_all()

    def frames(self, on_dropped, stopped=lambda: False,
               on_failed: Callable[[int, SourceError], None] | None = None) -> Iterator[Frame]:
        """The queued frames, each source's in order, the sources in turn; dropped ones go to ``on_dropped``.

        Dropped frames are handed over in the consumer's thread as they happen.
        ``stopped`` is checked while waiting for a frame: a stop need not wait
        for a source. A source that failed with a :class:`SourceError` goes
        to ``on_failed`` (its position, the error) and the others go on;
        without ``on_failed``, or for any other exception, the error is raised.
        """
        while True:
            with self._changed:
                while not self._ready() and not stopped():
                    self._changed.wait(_WAIT_S)
                dropped = [frame for lane in self.lanes for frame in lane.dropped]
                for lane in self.lanes:
                    lane.dropped = []
                frame = self._next()
                failed = [(k, lane) for k, lane in enumerate(self.lanes)
                          if lane.over and lane.failure is not None and not lane.reported]
                for _, lane in failed:
                    lane.reported = True
                finished = all(lane.over for lane in self.lanes)
                self._changed.notify_all()
            for old in dropped:
                on_dropped(old)
            if frame is not None:
                yield frame
            for k, lane in failed:
                if on_failed is None or not isinstance(lane.failure, SourceError):
                    raise lane.failure
                on_failed(k, lane.failure)
            if frame is None and (finished or stopped()):
                return

    def _ready(self) -> bool:
        """Something for the consumer: a frame, a dropped frame, a failure to report, or the end of every source."""
        return (any(lane.queue or lane.dropped or (lane.over and lane.failure is not None and not lane.reported)
                    for lane in self.lanes)
                or all(lane.over for lane in self.lanes))

    def _next(self) -> Frame | None:
        """The next lane's oldest frame, round-robin from the lane after the last one served (lock held)."""
        count = len(self.lanes)
        for step in range(count):
            k = (self._turn + step) % count
            if self.lanes[k].queue:
                self._turn = (k + 1) % count
                return self.lanes[k].queue.popleft()
        return None

    def close(self) -> list[Frame]:
        """Stop reading; the frames read but never handed out (their records are still owed), source by source."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        deadline = time.monotonic() + _JOIN_S
        for thread in self._threads:  # a camera blocked in its read cannot be waited for; the threads are daemons
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        left = []
        with self._changed:
            for lane in self.lanes:
                left += sorted(list(lane.dropped) + list(lane.queue), key=lambda f: f.index)
                lane.queue, lane.dropped = collections.deque(), []
        return left


def _input(frame: Frame):
    return frame.prepared if frame.prepared is not None else frame.image


def _key(frame: Frame) -> tuple[int, int]:
    """A frame's identity within a run: its source's position and its number there."""
    return frame.stream, frame.index


# How often waiting threads re-check for a stop, and how long closing waits for the reader.
_WAIT_S = 0.1
_JOIN_S = 2.0


class LineEngine:
    """Scores frames with a station's active recipe and hands one record per frame to every sink.

    ``station``: the :class:`~mrad.runtime.line.station.Station` that scores
    and decides (a changeover applies from the next batch), or a
    :class:`Detector`, made a station of one recipe whose ``threshold`` is
    given (None: scores only).
    ``batch``: frames per encoder call.
    ``save_maps``: a folder for one heatmap overlay PNG per scored frame.
    ``stop``: checked between batches. ``evidence``: records name the memory
    entries that weighed most. ``when_behind``: None reads each frame when
    the previous batch is scored; "queue" reads ahead in a thread, up to
    ``queue_size`` frames, then waits for scoring (nothing dropped);
    "drop-oldest" reads ahead likewise but, when the queue is full, drops its
    oldest frame with a "dropped" record (a live camera stays current).
    Several sources (see :meth:`run`) each have their thread and a queue of
    ``queue_size`` of their own, taken from in turn (:class:`ReadAhead`).
    Frames read ahead but unscored at a stop get "dropped" records too.
    ``deadline_ms``: a frame's decision is due this long after the engine got
    it from the source (``clock``, in seconds, tells the time; waiting in the
    queue and for batch-mates counts). A frame already past it when its batch
    is about to be scored is not scored: it gets a "late" record. A frame
    scored but decided past it keeps its result, marked ``"late": true``.
    ``close_timeout``: seconds, all sinks together, for sinks with a
    ``close`` to deliver what they hold when the run ends.
    """

    def __init__(self, station: Station | Detector, sinks: Iterable[Sink] = (), threshold: float | None = None,
                 batch: int = 1, save_maps: Path | None = None,
                 stop: Stop | None = None, evidence: bool = False, when_behind: str | None = None,
                 queue_size: int | None = None, deadline_ms: float | None = None,
                 clock: Callable[[], float] = time.monotonic, close_timeout: float = defaults.FLUSH_TIMEOUT_S):
        if when_behind not in (None,) + WHEN_BEHIND:
            raise MradError(f"when_behind must be one of {', '.join(WHEN_BEHIND)}, got {when_behind!r}")
        if isinstance(station, Detector):  # a detector alone: decided by ``threshold``, or not at all
            policy = DecisionPolicy(threshold, "--threshold", fixed=True) if threshold is not None else DecisionPolicy()
            station = Station.of(Recipe(RecipeConfig("default", station.path), station, policy=policy))
        self.station = station  # a Station, or any scorer with prepare and predict_batch (a test's double)
        self.sinks = list(sinks)
        self.batch, self.evidence = batch, evidence
        self.save_maps = Path(save_maps) if save_maps else None
        self.stop = stop if stop is not None else Stop()  # a Stop is falsy until requested
        self.stats = RunStats()
        self.failure: str | None = None  # why a source failed for good, if one did
        self.sources: list[str] | None = None  # the names of the sources run reads at once, when named
        self._want_picture = self.save_maps is not None or any(s.needs_picture for s in self.sinks)
        self.when_behind, self.queue_size = when_behind, queue_size or 2 * batch
        self.deadline_ms, self.clock = deadline_ms, clock
        self.close_timeout = close_timeout
        self._sinks_lock = threading.Lock()  # a source reading ahead in its thread reports camera events

    def event(self, record: dict) -> None:
        """Hand an event record (a camera gap, say) to every sink."""
        self._hand_out(record, None)

    def _hand_out(self, record: dict, picture: np.ndarray | None, frame: np.ndarray | None = None,
                  anomaly_map: np.ndarray | None = None) -> None:
        """hand_out under the engine's lock (a source reading ahead reports camera events from its thread)."""
        with self._sinks_lock:
            hand_out(self.sinks, self.stats, record, picture, frame, anomaly_map)

    def run(self, frames: Iterable[Frame] | Mapping[str, Iterable[Frame]]) -> dict:
        """Score every frame until the sources end or fail for good, or a stop is requested; return the summary.

        ``frames``: one source's frames, or several sources by name, read at
        once (each in its own thread, needs ``when_behind``) and scored in
        turn, batches mixing them; the summary then counts frames per source.
        A source that fails for good is reported ("source_failed") and the
        others go on; ``failure`` says why it failed once the run is over.
        """
        if self.save_maps:
            self.save_maps.mkdir(parents=True, exist_ok=True)
        self.sources = list(frames) if isinstance(frames, Mapping) else None
        streams = list(frames.values()) if self.sources is not None else [frames]
        if self.sources is not None:
            self.stats.count_sources(self.sources)
        if len(streams) > 1 and not self.when_behind:
            raise MradError("several sources are read at once, each in its own thread: they need a read-ahead "
                            f"(when_behind one of {', '.join(WHEN_BEHIND)})")
        stamped = [self._stamped(iter(source), k) for k, source in enumerate(streams)]
        reader = (ReadAhead(stamped, self.queue_size, self.when_behind == "drop-oldest", self._prepare)
                  if self.when_behind else None)
        # a changeover during the run is an event on every sink; after it, the sinks are closed
        unsubscribe = self.station.on_change(self.event) if isinstance(self.station, Station) else (lambda: None)
        try:
            for chunk in self._batches(reader.frames(self._dropped, lambda: bool(self.stop), self._failed)
                                       if reader else stamped[0]):
                self._score(chunk)
        except SourceError as exc:  # the one source, read without a read-ahead
            self._failed(0, exc)
        finally:
            unsubscribe()
            if reader:
                for frame in reader.close():
                    self._dropped(frame, "the run stopped before it was scored")
            self.stats.ended = time.perf_counter()
            self.failure = "; ".join(self.stats.failed.values()) or None
            counts = self._close_sinks()
        origin = self.station.recipe().policy.origin if isinstance(self.station, Station) else "none"
        summary = self.stats.summary(origin, self.stop.reason)
        if self.deadline_ms is not None:
            summary["deadline_ms"] = self.deadline_ms
        if counts:
            summary["sinks"] = counts
        self.event(event_record("summary", **summary))
        return summary

    def _close_sinks(self) -> dict[str, dict]:
        # the engine's lock is not held: a sink's thread may still report an event while it delivers
        return close_sinks(self.sinks, self.stats, self.close_timeout)

    def _prepare(self, frame: Frame) -> Frame:
        """Preprocess in the reader's thread, so that the scoring thread only encodes and scores."""
        if frame.error is not None:
            return frame
        try:
            return replace(frame, prepared=self.station.prepare(frame.image))
        except MradError as exc:
            return replace(frame, error=str(exc))

    def _stamped(self, frames: Iterator[Frame], stream: int) -> Iterator[Frame]:
        """A source's frames, each stamped when it was read (in its reader's thread when reading ahead)."""
        for frame in frames:
            frame.read_at, frame.stream = self.clock(), stream
            yield frame

    def _failed(self, stream: int, exc: SourceError) -> None:
        """A source lost for good among several: reported at once, the others read on."""
        self.stats.failed[stream] = str(exc)
        where = {"source": self.sources[stream]} if self.sources else {}
        self.event(event_record("source_failed", **where, error=str(exc)))

    def _dropped(self, frame: Frame, why: str = "scoring was behind (--when-behind drop-oldest)") -> None:
        record = dropped_record(frame, why)
        self.stats.add(record, frame.stream)
        self._hand_out(record, None)

    def _batches(self, frames: Iterator[Frame]) -> Iterator[list[Frame]]:
        """Group frames; a source that fails for good first hands over the frames it already gave."""
        batch: list[Frame] = []
        while not self.stop:
            try:
                batch.append(next(frames))
            except StopIteration:
                break
            except SourceError:
                if batch:
                    yield batch
                raise
            if len(batch) == self.batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def _score(self, chunk: list[Frame]) -> None:
        chunk = self._in_time(chunk)
        tic = time.perf_counter()
        chunk, results = self._predict([f for f in chunk if f.error is None], chunk)
        latency = round((time.perf_counter() - tic) * 1000, 2)
        decided = self.clock()
        for frame in chunk:
            result = results.get(_key(frame)) if frame.error is None else None
            record = frame_record(frame, result, latency, self._lateness(frame, decided))
            picture = overlay(frame.image, result.anomaly_map) if result is not None and self._want_picture else None
            if picture is not None and self.save_maps:
                try:
                    record["map"] = str(self._save_map(frame, picture))
                except OSError as exc:
                    record["map_error"] = f"heatmap could not be written: {exc}"
                    self.stats.output_failed(record["map_error"])
            self.stats.add(record, frame.stream)
            if result is not None:
                self._hand_out(record, picture, frame.image, result.anomaly_map)
            else:
                self._hand_out(record, picture)

    def _lateness(self, frame: Frame, at: float) -> float | None:
        """The frame's age at ``at`` in ms when that is past the deadline; None when in time (or no deadline)."""
        if self.deadline_ms is None or frame.error is not None:
            return None
        age = (at - frame.read_at) * 1000
        return age if age > self.deadline_ms else None

    def _in_time(self, chunk: list[Frame]) -> list[Frame]:
        """The frames still within their deadline; the others get their late record here, unscored.

        Each source's frames are read in order, so its late ones are its oldest in the batch and its records
        stay in order.
        """
        started = self.clock()
        kept = []
        for frame in chunk:
            age = self._lateness(frame, started)
            if age is None:
                kept.append(frame)
                continue
            record = late_record(frame, age)
            self.stats.add(record, frame.stream)
            self._hand_out(record, None)
        return kept

    def _predict(self, readable: list[Frame], chunk: list[Frame]) -> tuple[list[Frame], dict[tuple, Result]]:
        """Results by :func:`_key`; a batch that fails is scored frame by frame, so one bad frame fails alone.

        A frame that cannot be scored comes back with its ``error`` set.
        """
        if not readable:
            return chunk, {}
        scored, failed = {}, {}
        try:
            results = self.station.predict_batch([_input(f) for f in readable], evidence=self.evidence)
            scored = {_key(f): r for f, r in zip(readable, results)}
        except MradError as exc:
            if len(readable) == 1:
                failed[_key(readable[0])] = str(exc)
            else:
                for frame in readable:
                    try:
                        scored[_key(frame)] = self.station.predict_batch([_input(frame)], evidence=self.evidence)[0]
                    except MradError as one:
                        failed[_key(frame)] = str(one)
        return [replace(f, error=failed[_key(f)]) if _key(f) in failed else f for f in chunk], scored

    def _save_map(self, frame: Frame, picture: np.ndarray) -> Path:
        # several sources: each its own prefix (two cameras' URLs may end alike)
        prefix = f"{frame.stream}-" if self.sources and len(self.sources) > 1 else ""
        path = self.save_maps / f"{prefix}{frame.index:06d}_{Path(frame.source).stem or 'frame'}.png"
        with atomic_file(path) as f:
            Image.fromarray(picture).save(f, format="PNG")
        return path
