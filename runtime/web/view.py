"""What the operator's page shows, kept in the server: latest frames, scores, counters, the review queue.

The inspection thread hands every record to :meth:`LineView.write`. It only
counts and keeps references (the frame and its anomaly map, never a copy,
never a picture), under one lock, and puts a short message in each connected
browser's :class:`Mailbox`: a bounded queue that drops its oldest message
when a browser does not keep up, and counts it. Nothing in ``write`` waits
for a browser. Pictures (the heatmap overlay, JPEG) are made only when a
browser asks for one, in the server's thread.

All state lives here, not in the browser: a reload, or a second browser,
sees the same page.

Each source is shown under the name the user gave it (``mrad-run --name``,
else the path, URL or device id as typed): :class:`SourceNames` tells from a
record's ``source`` (a file's path, a camera's spec) which of the run's
sources read it, so that a folder of sub-folders is one tile, not one per
sub-folder.
"""

from __future__ import annotations

import collections
import fnmatch
import io
import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from ..core.overlay import overlay
from ..line.outbox import Outbox
from ..line.sources import IMAGE_SUFFIXES
from .redact import text as shown

HISTORY = 300  # scores kept for the plot
LATENCIES = 200  # latencies kept for p50 / p95
RATE_WINDOW_S = 5.0  # frames/s is counted over this many seconds
REVIEW_SIZE = 16  # frames held for the operator's verdict
REVIEW_EVERY_S = 1.0  # at most one flagged frame a second per source joins the review queue
BORDERLINE = 0.1  # a score within this share of the threshold below it is borderline
NO_THRESHOLD_QUANTILE = 0.9  # without a threshold, the top tenth of recent scores is flagged as borderline
MAILBOX = 256  # scores waiting for one browser at most (over a second at 200 frames/s); then the oldest is dropped
MAX_SOURCES = 16  # sources shown; the one seen longest ago makes room
NAMES_CACHED = 4096  # record sources already told apart (each file of a folder once); then forgotten, all at once
EVENTS = 20  # recent event records shown
JPEG_QUALITY = 85
PICTURES = ("overlay", "image")
HEALTH = {"camera_lost": "lost", "camera_reopened": "ok", "source_failed": "failed"}  # a source's health after these


@dataclass
class Held:
    """A scored frame the page can show (a source's latest, or one in the review queue)."""

    id: int
    record: dict
    image: np.ndarray  # HxWx3 uint8 RGB, as read
    anomaly_map: np.ndarray  # float32 HxW
    name: str  # the source's name on the page (its tile's label)
    flag: str | None = None  # "anomalous" or "borderline" for a frame in the review queue
    verdict: dict | None = None  # what the operator said, and what it changed
    _jpeg: dict[str, bytes] = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        record = self.record
        return {"id": self.id, "name": self.name, "source": record["source"], "frame": record["frame"],
                "recipe": record.get("recipe"), "timestamp": record["timestamp"], "score": record["score"],
                "decision": record.get("decision"), "flag": self.flag, "verdict": self.verdict}

    def jpeg(self, show: str) -> bytes:
        """The frame as JPEG: ``overlay`` (with its heatmap) or ``image`` (as read); made once, on first request."""
        if show not in self._jpeg:
            pixels = overlay(self.image, self.anomaly_map) if show == "overlay" else self.image
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
            self._jpeg[show] = out.getvalue()
        return self._jpeg[show]


class Mailbox(Outbox):
    """Messages waiting for one browser: at most ``size``; a full mailbox drops its oldest and counts it."""

    def __init__(self, size: int = MAILBOX):
        super().__init__(size)

    @property
    def messages(self) -> list[dict]:
        return list(self.store)


@dataclass
class SourceView:
    key: str
    label: str = ""  # its name as the page shows it (no credentials, no long path: see :mod:`.redact`)
    latest: int | None = None  # the Held id of its latest scored frame
    last_record: dict | None = None  # its latest frame record of any kind
    health: str = "ok"  # "ok", "lost" between camera_lost and camera_reopened, or "failed" (lost for good)
    frames: int = 0  # its records of any kind
    seen: float = 0.0
    last_review: float = float("-inf")

    def __post_init__(self):
        self.label = self.label or shown(self.key)


def source_key(source: str) -> str:
    """A source the run did not name (none were given): a camera, a stream or a video file; image files by folder."""
    path = Path(source)
    return str(path.parent) if path.suffix.lower() in IMAGE_SUFFIXES else source


class SourceNames:
    """Which of the run's sources a record came from, by the record's ``source``; the answer is that source's name.

    ``given``: each source's name -> what it reads, as the user typed it (files, folders, globs; a camera's
    spec). A record's ``source`` is a camera's spec, or the path of a file read from one of those inputs: the
    file itself, one under a folder given, or one a glob matched (or under a folder it matched); the deepest
    match wins. An event about a source may name it by its name. What matches nothing (or when nothing was
    given) is shown as :func:`source_key` says.
    """

    def __init__(self, given: Mapping[str, Sequence[str]] | None = None):
        given = dict(given or {})
        self.names = list(given)
        self._exact = {name: name for name in given}
        self._patterns: list[tuple[str, str]] = []  # (spec as a path, name), in the order given
        for name, specs in given.items():
            for spec in specs:
                self._exact.setdefault(spec, name)
                self._patterns.append((str(Path(spec)), name))
        self._found: dict[str, str] = {}

    def __call__(self, source: str) -> str:
        if len(self.names) == 1:  # one source: every record is its
            return self.names[0]
        name = self._exact.get(source) or self._found.get(source)
        if name is None:
            name = self._match(source) or source_key(source)
            if len(self._found) >= NAMES_CACHED:
                self._found.clear()
            self._found[source] = name
        return name

    def _match(self, source: str) -> str | None:
        path = Path(source)
        for place in map(str, (path, *path.parents)):
            for pattern, name in self._patterns:
                if place == pattern or fnmatch.fnmatchcase(place, pattern):
                    return name
        return None


class LineView:
    """The line as the page shows it; the sink side (``write``) is called by the inspection thread only.

    The threshold that decided each frame comes with its record (its recipe's
    policy, owned by the station): the view keeps none of its own. ``sources``:
    the run's sources by name, as :class:`SourceNames` takes them; each has its
    tile from the start, in the order given.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sources: Mapping[str, Sequence[str]] | None = None):
        self.clock = clock
        self.name_of = SourceNames(sources)
        self.counts = {"frames": 0, "anomalous": 0, "errors": 0, "dropped": 0, "late": 0}
        self.recipes: dict[str, dict[str, int]] = {}  # scored frames and anomalous ones, per recipe
        self.finished: dict | None = None  # the run's summary, once it has ended
        self.held: dict[int, Held] = {}
        self.sources: dict[str, SourceView] = {}
        self.review: collections.deque[int] = collections.deque()
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENTS)
        self._scores: collections.deque[list] = collections.deque(maxlen=HISTORY)
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCIES)
        self._times: collections.deque[float] = collections.deque()
        self._mailboxes: set[Mailbox] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        for name in self.name_of.names[:MAX_SOURCES]:  # a source not heard from yet is shown too: it is expected
            self.sources[name] = SourceView(name, seen=clock())

    # -- the inspection thread's side ----------------------------------------------------------

    def write(self, record: dict, picture=None, frame: np.ndarray | None = None,
              anomaly_map: np.ndarray | None = None) -> None:
        now = self.clock()
        with self._lock:
            message = self._event(record) if "event" in record else self._frame(record, frame, anomaly_map, now)
            for mailbox in self._mailboxes:
                mailbox.put(message)

    def _event(self, record: dict) -> dict:
        kind = record["event"]
        if kind == "summary":
            self.finished = record
        elif kind in HEALTH and "source" in record:
            self._source(record["source"], self.clock()).health = HEALTH[kind]
        self.events.append(record)
        return {"event": kind}

    def _frame(self, record: dict, frame: np.ndarray | None, anomaly_map: np.ndarray | None, now: float) -> dict:
        self.counts["frames"] += 1
        self._times.append(now)
        while self._times and self._times[0] < now - RATE_WINDOW_S:
            self._times.popleft()
        view = self._source(record["source"], now)
        view.last_record = record
        view.frames += 1
        if "score" not in record:
            what = "errors" if "error" in record else "dropped" if "dropped" in record else "late"
            self.counts[what] += 1
            return {"source": view.label, "frame": record["frame"], "unscored": what}
        score, decision = record["score"], record.get("decision")
        self.counts["anomalous"] += decision == "anomalous"
        self.counts["late"] += record.get("late", False)
        if "recipe" in record and (record["recipe"] in self.recipes or len(self.recipes) < MAX_SOURCES * 4):
            counts = self.recipes.setdefault(record["recipe"], {"frames": 0, "anomalous": 0})
            counts["frames"] += 1
            counts["anomalous"] += decision == "anomalous"
        self._latencies.append(record["latency_ms"])
        flag = self._flag(score, decision, (record.get("scored_by") or {}).get("threshold"))
        self._scores.append([record["frame"], score, decision])
        message = {"source": view.label, "frame": record["frame"], "score": score, "decision": decision}
        if frame is None or anomaly_map is None:
            return message
        held = Held(next(self._ids), record, frame, anomaly_map, view.key)
        self.held[held.id] = held
        previous, view.latest = view.latest, held.id
        if previous is not None:
            self._release(previous, keep=False)
        if flag and now - view.last_review >= REVIEW_EVERY_S:
            view.last_review = now
            held.flag = flag
            self.review.append(held.id)
            if len(self.review) > REVIEW_SIZE:
                self._release(self.review.popleft(), keep=False)
        message["id"] = held.id
        return message

    def _flag(self, score: float, decision: str | None, threshold: float | None) -> str | None:
        """Why a frame deserves a look: "anomalous", "borderline" (just under the threshold), or None."""
        if decision == "anomalous":
            return "anomalous"
        if threshold is not None:
            return "borderline" if score >= threshold * (1 - BORDERLINE) else None
        if len(self._scores) < 10:
            return None
        recent = np.fromiter((s for _, s, _ in self._scores), np.float64, len(self._scores))
        return "borderline" if score >= np.quantile(recent, NO_THRESHOLD_QUANTILE) else None

    def _release(self, held_id: int, keep: bool) -> None:
        """Forget a held frame unless it is still shown somewhere (the review queue or a source's latest)."""
        if keep or held_id in self.review or any(v.latest == held_id for v in self.sources.values()):
            return
        self.held.pop(held_id, None)

    def _source(self, source: str, now: float) -> SourceView:
        key = self.name_of(source)
        view = self.sources.get(key)
        if view is None:
            if len(self.sources) >= MAX_SOURCES:
                oldest = min(self.sources.values(), key=lambda v: v.seen)
                del self.sources[oldest.key]
                if oldest.latest is not None:
                    self._release(oldest.latest, keep=False)
            view = self.sources[key] = SourceView(key)
        view.seen = now
        return view

    # -- the server's side ---------------------------------------------------------------------

    def subscribe(self, size: int = MAILBOX) -> Mailbox:
        mailbox = Mailbox(size)
        with self._lock:
            self._mailboxes.add(mailbox)
        return mailbox

    def unsubscribe(self, mailbox: Mailbox) -> None:
        with self._lock:
            self._mailboxes.discard(mailbox)

    def take(self, mailbox: Mailbox) -> list[dict]:
        """The messages waiting in ``mailbox``, oldest first; it is emptied."""
        with self._lock:
            messages = [message for _, message in mailbox.take(len(mailbox))]
        return messages

    def get(self, held_id: int) -> Held | None:
        with self._lock:
            return self.held.get(held_id)

    def latest(self, label: str) -> Held | None:
        """A source's latest scored frame now (at hundreds of frames/s, a frame named in a push is long gone);
        the source by its label on the page (its name, or its key)."""
        with self._lock:
            view = self.sources.get(label) or next((v for v in self.sources.values() if v.label == label), None)
            return self.held.get(view.latest) if view is not None and view.latest is not None else None

    def snapshot(self, history: bool = True) -> dict:
        """Everything the page shows, JSON-ready; ``history``: with the scores for the plot."""
        now = self.clock()
        with self._lock:
            window = min(RATE_WINDOW_S, now - self._times[0]) if len(self._times) > 1 else 0.0
            latencies = np.asarray(self._latencies, np.float64)
            state = {
                "counts": dict(self.counts), "recipes": {k: dict(v) for k, v in self.recipes.items()},
                "fps": round((len(self._times) - 1) / window, 2) if window > 0 else 0.0,
                "running": self.finished is None,
                "sources": [{"key": v.label, "health": v.health, "frames": v.frames,
                             "latest": self.held[v.latest].summary() if v.latest in self.held else None,
                             "last": v.last_record} for v in self.sources.values()],
                "review": [self.held[i].summary() for i in reversed(self.review)],
                "events": list(self.events),
                "clients": len(self._mailboxes),
            }
            if len(latencies):
                p50, p95 = np.percentile(latencies, [50, 95])
                state.update(latency_p50_ms=round(float(p50), 2), latency_p95_ms=round(float(p95), 2))
            if history:
                state["scores"] = [list(s) for s in self._scores]
        return state

    def judged(self, held_id: int, verdict: dict) -> None:
        """Record the operator's verdict on a held frame (shown with it from now on)."""
        with self._lock:
            if held_id in self.held:
                self.held[held_id].verdict = verdict
