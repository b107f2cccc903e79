"""Changeover for scripts: a file that holds the active recipe's name, read again when it changes (and on SIGHUP).

    echo part-b > active-recipe.txt      # from the next frame, part-b scores

The file is polled twice a second (one ``stat``); SIGHUP reads it at once.
Only its first line counts, at most :data:`MAX_BYTES`; a name that is no
recipe is reported as a ``recipe_refused`` event and the active recipe stays.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from ..errors import MradError
from ..files import read_small
from .records import event_record

POLL_S = 0.5
MAX_BYTES = 256


class RecipeFile:
    """Watch ``path`` (None: nothing to watch) and activate on ``station`` the recipe it names."""

    def __init__(self, path: Path | None, station, stop=None, events=None, poll_s: float = POLL_S):
        self.path, self.station, self.poll_s = (Path(path) if path else None), station, poll_s
        self.events = events or (lambda record: None)
        self._seen: tuple | None = None
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = None
        if self.path is None:
            return
        self.check()  # a file present at start sets the recipe before the first frame
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, AttributeError):  # no SIGHUP on Windows
                signal.signal(signal.SIGHUP, lambda *_: self._wake.set())
        self._thread = threading.Thread(target=self._watch, name="mrad-recipe-file", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Read the file if it changed since the last look; activate the recipe it names."""
        try:
            stat = self.path.stat()
        except OSError:
            return  # not there (yet): the active recipe stays
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            text = read_small(self.path, "recipe file", MAX_BYTES).decode("utf-8", "replace")
        except MradError as exc:  # a FIFO, a device, a huge file: said once (until the file changes)
            self.events(event_record("recipe_refused", by=f"recipe file {self.path}", error=str(exc)))
            return
        name = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not name:
            return
        try:
            self.station.activate(name, by=f"recipe file {self.path}")
        except MradError as exc:
            self.events(event_record("recipe_refused", recipe=name[:64], by=f"recipe file {self.path}", error=str(exc)))

    def _watch(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if not self._closed.is_set():
                self.check()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
