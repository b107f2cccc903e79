"""Where frames come from: image files, folders, globs, video files and cameras.

Every source yields :class:`Frame` objects, one per frame it read, in order.
A frame that cannot be decoded is still yielded, with ``error`` set, so the
caller writes one record per frame and the line keeps running. A camera that
stops delivering is reopened with exponential backoff; the gap is reported
through ``events`` (:class:`Reconnecting`, which GenICam cameras in
:mod:`~mrad.runtime.line.genicam` share).
"""

from __future__ import annotations

import glob
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .. import defaults
from ..errors import ImageError, MradError, SourceError
from ..core.preprocess import Prepared, load_rgb
from .records import event_record, now

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg"}


@dataclass
class Frame:
    source: str
    index: int
    timestamp: str
    image: np.ndarray | None = None  # HxWx3 uint8 RGB
    error: str | None = None
    prepared: Prepared | None = None  # the encoder's input, made ahead in the read-ahead thread
    camera: dict | None = None  # what the camera itself stamped on the frame (a GenICam frame id and timestamp)
    read_at: float | None = None  # when the engine got the frame, on its clock: deadlines count from here
    stream: int = 0  # which of the run's sources read it (several are read at once), in the order given


MASK_FOLDER = "ground_truth"  # the MVTec AD layout's masks: walked past inside a folder given, never scored as parts


def expand_inputs(inputs: Iterable[str], what: str = "--input",
                  notice: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield image and video paths: files as given, folders walked in sorted order, globs expanded into either.

    ``what`` names the option in errors. Inside a folder given, ``ground_truth`` folders (the MVTec AD layout's
    masks) are passed over, and ``notice`` (when given) is told so once; a ``ground_truth`` folder given itself is
    walked (mrad-enroll --masks).
    """
    told = False
    for item in inputs:
        if Path(item).exists():
            matches = [item]
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise MradError(f"{what} {item!r} matches no file")
        else:
            raise MradError(f"{what} {item} does not exist")
        for match in map(Path, matches):
            if match.is_dir():
                found = sorted(p for p in match.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
                kept = [p for p in found if MASK_FOLDER not in p.relative_to(match).parts[:-1]]
                if len(kept) < len(found) and notice is not None and not told:
                    told = True
                    notice(f"{match}: its {MASK_FOLDER} folders hold masks (the MVTec AD layout): "
                           f"{len(found) - len(kept)} of their images are not read as parts")
                yield from kept
            else:
                yield match


def file_frames(inputs: Iterable[str], max_pixels: int = defaults.MAX_IMAGE_PIXELS, loop: bool = False,
                notice: Callable[[str], None] | None = None) -> Iterator[Frame]:
    """Frames of image files and video files; numbering runs on across files.

    The inputs are expanded at once, so a missing path fails before any frame.
    Images of more than ``max_pixels`` pixels become error frames. ``loop``:
    read them all again from the start when they end, numbering on (a
    recording standing in for a line); it ends only if a pass yields nothing.
    """
    paths = list(expand_inputs(inputs, notice=notice))
    return _looping(paths, max_pixels) if loop else _frames_of(paths, max_pixels)


def _looping(paths: list[Path], max_pixels: int) -> Iterator[Frame]:
    index = 0
    while True:
        start = index
        for frame in _frames_of(paths, max_pixels, start):
            index = frame.index + 1
            yield frame
        if index == start:
            return


def _frames_of(paths: list[Path], max_pixels: int, index: int = 0) -> Iterator[Frame]:
    for path in paths:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            for frame in video_frames(path, index):
                index = frame.index + 1
                yield frame
            continue
        try:
            yield Frame(str(path), index, now(), image=np.asarray(load_rgb(path, max_pixels)))
        except ImageError as exc:
            yield Frame(str(path), index, now(), error=str(exc))
        index += 1


def video_frames(path: Path, start_index: int = 0) -> Iterator[Frame]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        yield Frame(str(path), start_index, now(), error=f"video could not be opened: {path}")
        return
    try:
        index = start_index
        while True:
            ok, bgr = capture.read()
            if not ok:
                return
            yield Frame(str(path), index, now(), image=np.ascontiguousarray(bgr[..., ::-1]))
            index += 1
    finally:
        capture.release()


def _sleep(seconds: float, stop=None) -> bool:
    """Wait between reconnection attempts; True when a stop was requested meanwhile (it ends the wait)."""
    if stop is not None:
        return stop.wait(seconds)
    time.sleep(seconds)
    return False


def _open_capture(spec: str):
    import cv2

    return cv2.VideoCapture(int(spec) if spec.isdigit() else spec)


class Reconnecting:
    """What live sources share: a lost camera reopened with exponential backoff, the gap reported as events.

    ``reconnect_timeout``: seconds a lost camera may stay lost before the
    source gives up with :class:`SourceError`. ``events`` receives
    ``{"event": "camera_lost" | "camera_reopened", ...}`` records. ``stop``
    (an :class:`~mrad.runtime.line.engine.Stop`) ends the waits between reconnection
    attempts at once.
    """

    def __init__(self, spec: str, reconnect_timeout: float = defaults.RECONNECT_TIMEOUT_S, events: Callable[[dict], None] = lambda e: None,
                 sleep: Callable[..., bool] | None = None, first_backoff: float = 0.5, max_backoff: float = 8.0,
                 stop=None):
        self.spec = spec
        self.stop = stop
        self.reconnect_timeout = reconnect_timeout
        self.events = events
        self.sleep = sleep or _sleep  # (seconds, stop) -> True when a stop ended the wait
        self.first_backoff, self.max_backoff = first_backoff, max_backoff
        self._opened = None  # what open() got: a handle for frames() to read, or the SourceError it raised

    def open(self) -> None:
        """Open the source now, before a run starts, so that one that cannot be opened is said first.

        Raises :class:`SourceError`; ``frames()`` then reads the handle opened here (or raises the same
        error). Without it, ``frames()`` opens the source itself.
        """
        if self._opened is None:
            try:
                self._opened = self._first_open()
            except SourceError as exc:
                self._opened = exc
        if isinstance(self._opened, SourceError):
            raise self._opened

    def _take_opened(self):
        """The handle open() got (once), else a new one."""
        self.open()
        handle, self._opened = self._opened, None
        return handle

    def _first_open(self):
        """A handle reading the source; SourceError when it cannot be opened."""
        raise NotImplementedError

    def _reopen(self, try_open: Callable[[], object | None]):
        """Retry ``try_open`` (a handle, or None while the camera is away) until it succeeds; None on a stop."""
        self.events(event_record("camera_lost", source=self.spec))
        waited, backoff = 0.0, self.first_backoff
        while waited < self.reconnect_timeout:
            pause = min(backoff, self.reconnect_timeout - waited)
            if self.sleep(pause, self.stop) or (self.stop is not None and self.stop):
                return None
            waited += pause
            backoff = min(backoff * 2, self.max_backoff)
            handle = try_open()
            if handle is not None:
                self.events(event_record("camera_reopened", source=self.spec, waited_s=round(waited, 3)))
                return handle
        raise SourceError(f"camera {self.spec!r} lost and not back after {waited:.1f} s of retries")


class Camera(Reconnecting):
    """A live source (OpenCV index, URL, GStreamer pipeline, or a video file standing in).

    Reconnects as :class:`Reconnecting` says. A video file given as a camera ends at its last frame.
    """

    def __init__(self, spec: str, reconnect_timeout: float = defaults.RECONNECT_TIMEOUT_S, events: Callable[[dict], None] = lambda e: None,
                 open_capture: Callable[[str], object] | None = None, sleep: Callable[..., bool] | None = None,
                 first_backoff: float = 0.5, max_backoff: float = 8.0, stop=None):
        super().__init__(spec, reconnect_timeout, events, sleep, first_backoff, max_backoff, stop)
        self.is_file = Path(spec).is_file()
        self.open_capture = open_capture or _open_capture

    def frames(self, start: int = 0) -> Iterator[Frame]:
        """The frames, numbered from ``start``; a video file first skips its frames before ``start``.

        ``start`` lets a reader that was restarted mid-stream go on where it was: a recording from
        the frame it had reached, a live camera from its next frame, the numbering unbroken.
        """
        capture = self._take_opened()
        index = start
        try:
            for _ in range(start if self.is_file else 0):
                if not capture.grab():  # moves on without decoding
                    break
            while True:
                ok, bgr = capture.read()
                if ok and bgr is not None:
                    yield Frame(self.spec, index, now(), image=np.ascontiguousarray(bgr[..., ::-1]))
                    index += 1
                    continue
                capture.release()
                if self.is_file:  # a recording ends; only a live camera is waited for
                    return
                capture = self._reopen(self._try_open)
                if capture is None:  # a stop was requested while waiting
                    return
        finally:
            if capture is not None:
                capture.release()  # releasing twice is harmless in OpenCV

    def _first_open(self):
        capture = self.open_capture(self.spec)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"camera {self.spec!r} could not be opened; check the index, URL or pipeline")
        return capture

    def _try_open(self):
        capture = self.open_capture(self.spec)
        if capture.isOpened():
            return capture
        capture.release()
        return None
