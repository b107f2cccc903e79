"""Where the line engine's records go: the sink contract, JSON lines, a window on screen, and the plant.

The plant's sinks (MQTT, OPC UA, webhooks) are built for a line that keeps
inspecting whatever the plant's systems do: ``write`` only queues or stores
(it never waits for the network), a thread of the sink's own delivers, and
what cannot be delivered is counted. A sink reports its link going down or
coming back as one event record per change (never one per message), through
``events``; ``close`` delivers what is pending within a bounded time and
returns the counts the run's summary shows. Their client libraries are the
optional ``protocols`` extra (webhooks need none): imported only when a sink
that needs them is opened.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import fields
from typing import BinaryIO, Callable, TextIO

import numpy as np

from ..errors import MradError
from .records import event_record
from .settings import LineSettings

WINDOW_NAME = "mrad-run"
Events = Callable[[dict], None]


class Sink:
    """What the engine calls on every sink; subclasses override ``write`` and, when they hold anything, ``close``.

    ``picture`` is the heatmap overlay when ``needs_picture``, else None.
    When ``needs_frame`` is true, ``frame`` (the image as read, HxWx3 uint8
    RGB) and ``anomaly_map`` (float32 at the image's size) come too, as
    references (keeping them costs the engine nothing). ``close(timeout)`` is
    called once when the run ends, before the summary: deliver what is held
    within ``timeout`` seconds and release it; the counts it returns go into
    the summary under ``name``, and those named in ``engine.LOST`` count as
    outputs not written.
    """

    name = "sink"
    needs_picture = False
    needs_frame = False

    def write(self, record: dict, picture: np.ndarray | None = None, frame: np.ndarray | None = None,
              anomaly_map: np.ndarray | None = None) -> None:
        raise NotImplementedError

    def close(self, timeout: float) -> dict:
        return {}


class JsonLines(Sink):
    """One JSON object per line, each written whole by one system call and flushed at once.

    A SIGKILL therefore leaves complete lines only; a full disk makes the
    write fail (the engine reports it) rather than leave half a line behind.
    """

    name = "records"

    def __init__(self, stream: TextIO | BinaryIO):
        self.stream = stream
        try:
            self._fd = stream.fileno()
            stream.flush()
        except (AttributeError, OSError, ValueError):  # an in-memory stream (tests, notebooks)
            self._fd = None

    def write(self, record: dict, picture: np.ndarray | None = None, frame=None, anomaly_map=None) -> None:
        line = json.dumps(record) + "\n"
        if self._fd is None:
            self.stream.write(line if isinstance(self.stream, io.TextIOBase) else line.encode())
            self.stream.flush()
            return
        data = memoryview(line.encode())
        while data:
            written = os.write(self._fd, data)
            data = data[written:]


class Window(Sink):
    """Each scored frame with its heatmap and score in an OpenCV window."""

    name = "window"
    needs_picture = True

    def __init__(self):
        import cv2

        self.cv2 = cv2
        try:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise MradError("--display needs a screen and an OpenCV built with GUI support: install opencv-python "
                            "in place of opencv-python-headless, or drop --display") from exc

    def write(self, record: dict, picture: np.ndarray | None = None, frame=None, anomaly_map=None) -> None:
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

class Link:
    """The state of a sink's link to its far end, reported as one event record per change.

    Only a sink's own thread calls it, holding none of the sink's locks: the
    event goes to every sink (this one too) through the engine's lock.
    """

    def __init__(self, name: str, events: Events):
        self.name, self.events = name, events
        self.up: bool | None = None  # None: not known yet (a first connection is still being tried)
        self.outages = 0
        self._down_since = 0.0

    def lost(self, error: str) -> None:
        if self.up is not False:
            self.up, self._down_since = False, time.monotonic()
            self.outages += 1
            self.events(event_record("sink_lost", sink=self.name, error=error))

    def back(self) -> None:
        if self.up is False:
            self.events(event_record("sink_back", sink=self.name,
                                     away_s=round(time.monotonic() - self._down_since, 3)))
        self.up = True

    def dropping(self, bound: int) -> None:
        self.events(event_record("sink_dropping", sink=self.name, bound=bound,
                                 error=f"more than {bound} records waiting: the oldest are dropped and counted"))


def open_sinks(settings: LineSettings, events: Events = lambda record: None, commands=None) -> list:
    """The sinks ``settings`` asks for, each started; if one cannot start, those already started are closed.

    ``commands``: the station that MQTT's command topic changes over (None: no command topic).
    """
    sinks = []
    try:
        if settings.mqtt:
            from .mqtt import MqttSink

            sinks += [MqttSink(target, settings.mqtt_qos, settings.mqtt_buffer, settings.mqtt_buffer_size, events,
                               commands=commands) for target in settings.mqtt]
        if settings.opcua:
            from .opcua import OpcUaSink

            sinks.append(OpcUaSink(settings.opcua, settings.station))
        if settings.webhook:
            from .webhook import WebhookSink

            sinks += [WebhookSink(url, settings.webhook_on, events) for url in settings.webhook]
        if any(getattr(settings, f.name) != f.default for f in fields(settings) if f.name.startswith("history")):
            from ..history.sink import open_history  # which refuses history settings without --history

            sinks.append(open_history(settings, events))
    except BaseException:
        for sink in sinks:
            sink.close(0)
        raise
    return sinks
