"""Where the line engine's records go: JSON lines, a window on screen."""

from __future__ import annotations

import io
import json
import os
from typing import BinaryIO, TextIO

import numpy as np

from .errors import MradError

WINDOW_NAME = "mrad-run"


class JsonLines:
    """One JSON object per line, each written whole by one system call and flushed at once.

    A SIGKILL therefore leaves complete lines only; a full disk makes the
    write fail (the engine reports it) rather than leave half a line behind.
    """

    needs_picture = False

    def __init__(self, stream: TextIO | BinaryIO):
        self.stream = stream
        try:
            self._fd = stream.fileno()
            stream.flush()
        except (AttributeError, OSError, ValueError):  # an in-memory stream (tests, notebooks)
            self._fd = None

    def write(self, record: dict, picture: np.ndarray | None = None) -> None:
        line = json.dumps(record) + "\n"
        if self._fd is None:
            self.stream.write(line if isinstance(self.stream, io.TextIOBase) else line.encode())
            self.stream.flush()
            return
        data = memoryview(line.encode())
        while data:
            written = os.write(self._fd, data)
            data = data[written:]


class Window:
    """Each scored frame with its heatmap and score in an OpenCV window."""

    needs_picture = True

    def __init__(self):
        import cv2

        self.cv2 = cv2
        try:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise MradError("--display needs a screen and an OpenCV built with GUI support: install opencv-python "
                            "in place of opencv-python-headless, or drop --display") from exc

    def write(self, record: dict, picture: np.ndarray | None = None) -> None:
        if picture is None:
            return
        cv2 = self.cv2
        bgr = np.ascontiguousarray(picture[..., ::-1])
        label = f"{record.get('score', 0):.4f} {record.get('decision', '')}"
        scale = max(bgr.shape[1] / 800, 0.3)  # legible on a 640-pixel frame, not covering a 112-pixel one
        cv2.putText(bgr, label, (4, int(4 + 25 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, round(2 * scale)))
        cv2.imshow(WINDOW_NAME, bgr)
        cv2.waitKey(1)
