"""Pictures kept beside the history by a policy: every anomalous frame with its heatmap, one good frame in N,
bounded by age and by bytes.

A picture is ``DAY/KEY.jpg`` (the frame as read) and ``DAY/KEY.heatmap.jpg``
(the heatmap over it) in the pictures folder, DAY the frame's UTC date and KEY
its row's ``frame_key``. Past ``keep_days`` or ``keep_bytes`` the oldest are
deleted first, and their rows stay (without the file names). A picture that
cannot be written (a full disk) is counted and its row written without it:
nothing here ever stops inspection. One run per folder (a lock in it): the
byte count is this process's own.
"""

from __future__ import annotations

import collections
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.overlay import overlay
from ..errors import MradError
from ..files import OutputBusy, lock_folder
from . import GOOD_EVERY, KEEP_BYTES, KEEP_DAYS

QUALITY = 90  # JPEG quality of pictures and heatmaps: a defect stays legible at a tenth of a PNG's bytes
SUFFIX, HEATMAP_SUFFIX = ".jpg", ".heatmap.jpg"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


class Pictures:
    """The pictures folder and its policy; ``wants`` is asked on the inspection thread, the rest on the writer's."""

    def __init__(self, folder: Path, good_every: int = GOOD_EVERY, keep_days: float = KEEP_DAYS,
                 keep_bytes: int = KEEP_BYTES, clock=time.time):
        self.folder = Path(folder)
        self.good_every, self.keep_s, self.keep_bytes, self.clock = good_every, keep_days * 86400, keep_bytes, clock
        try:
            self._lock = lock_folder(self.folder)
        except OutputBusy as exc:
            raise MradError(f"--history-pictures: {exc}") from exc
        except OSError as exc:
            raise MradError(f"--history-pictures {self.folder} cannot be used: {exc}") from exc
        self._good = 0  # good frames seen, for one in good_every
        self.kept = self.deleted = self.failed = 0
        self.bytes = 0
        self._entries: collections.deque = collections.deque()  # (written at, key, paths, bytes), oldest first
        self._scan()

    def wants(self, record: dict) -> bool:
        """Whether this scored record's frame is kept: anomalous, or one good frame in ``good_every``."""
        if record.get("decision") == "anomalous":
            return True
        if "score" not in record or not self.good_every:
            return False
        self._good += 1
        return (self._good - 1) % self.good_every == 0

    def keep(self, key: str, at_ms: int, frame: np.ndarray, anomaly_map: np.ndarray | None
             ) -> tuple[str | None, str | None, list[str]]:
        """Save a frame and its heatmap: their names in the folder (None: not written), and the keys of the
        pictures deleted to stay within the bounds."""
        day = datetime.fromtimestamp(at_ms / 1000, timezone.utc).strftime("%Y-%m-%d")
        names, paths, size = [], [], 0
        try:
            (self.folder / day).mkdir(exist_ok=True)
            for suffix, image in ((SUFFIX, frame), (HEATMAP_SUFFIX, anomaly_map)):
                if suffix == HEATMAP_SUFFIX:
                    if anomaly_map is None or anomaly_map.shape != frame.shape[:2]:
                        names.append(None)
                        continue
                    image = overlay(frame, anomaly_map)
                path = self.folder / day / f"{key}{suffix}"
                size += _save(image, path)
                names.append(f"{day}/{key}{suffix}")
                paths.append(path)
        except OSError:  # a full or read-only disk: this picture is lost, inspection goes on
            for path in paths:
                _remove(path)
            self.failed += 1
            return None, None, self.expire()
        self.kept += 1
        self.bytes += size
        self._entries.append((self.clock(), key, paths, size))
        return names[0], names[1], self.expire()

    def expire(self) -> list[str]:
        """Delete the oldest pictures past the age or over the bytes; their keys."""
        gone, oldest = [], self.clock() - self.keep_s
        while self._entries and (self.bytes > self.keep_bytes or self._entries[0][0] < oldest):
            _, key, paths, size = self._entries.popleft()
            for path in paths:
                _remove(path)
            self.bytes -= size
            self.deleted += 1
            gone.append(key)
            if paths and not any(paths[0].parent.iterdir()):
                _remove(paths[0].parent)
        return gone

    def counts(self) -> dict:
        return {"pictures_kept": self.kept, "pictures_deleted": self.deleted, "pictures_failed": self.failed}

    def close(self) -> None:
        self._lock.close()

    def _scan(self) -> None:
        """The pictures already in the folder (an earlier run's), oldest first; half-written ones removed."""
        found: dict[str, list] = {}
        for day in sorted(p for p in self.folder.iterdir() if p.is_dir() and _DAY.fullmatch(p.name)):
            for entry in os.scandir(day):
                if entry.name.endswith(".tmp"):
                    _remove(Path(entry.path))
                    continue
                if not entry.is_file():
                    continue
                info = entry.stat()
                key = entry.name.split(".", 1)[0]
                at, paths, size = found.get(key, (0.0, [], 0))
                found[key] = (max(at, info.st_mtime), paths + [Path(entry.path)], size + info.st_size)
        for key, (at, paths, size) in sorted(found.items(), key=lambda item: item[1][0]):
            self._entries.append((at, key, paths, size))
            self.bytes += size


def _save(image: np.ndarray, path: Path) -> int:
    """Write a JPEG under a temporary name, then rename it: never half a picture under a picture's name."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(image).save(temporary, format="JPEG", quality=QUALITY)
        os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise
    return path.stat().st_size


def _remove(path: Path) -> None:
    try:
        path.rmdir() if path.is_dir() else path.unlink()
    except OSError:
        pass  # already gone, or not empty: it goes with the next one
