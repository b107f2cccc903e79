"""Sending mrad-run's records to the line: MQTT, OPC UA and webhooks.

Every sink here is built for a line that keeps inspecting whatever the
plant's systems do: ``write`` only queues or stores (it never waits for the
network), a thread of the sink's own delivers, and what cannot be delivered
is counted. A sink reports its link going down or coming back as one event
record per change (never one per message), through ``events``; ``close``
delivers what is pending within a bounded time and returns the counts the
run's summary shows.

The client libraries are the optional ``protocols`` extra (webhooks need none):
they are imported only when a sink that needs them is opened.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable

from ..errors import MradError
from ..records import event_record
from .config import LineSettings, line_settings

__all__ = ["LineSettings", "line_settings", "open_sinks"]

Events = Callable[[dict], None]


def need(module: str):
    """Import a client library of the ``protocols`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MradError(f"{module.split('.')[0]} is not installed; it comes with the 'protocols' extra (MQTT, OPC UA, "
                        f"--config on Python 3.10): pip install \"mrad-edge[protocols]\" (or [line], which adds "
                        "GenICam cameras)") from exc


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


def open_sinks(settings: LineSettings, events: Events = lambda record: None) -> list:
    """The sinks ``settings`` asks for, each started; if one cannot start, those already started are closed."""
    sinks = []
    try:
        if settings.mqtt:
            from .mqtt import MqttSink

            sinks += [MqttSink(target, settings.mqtt_qos, settings.mqtt_buffer, settings.mqtt_buffer_size, events)
                      for target in settings.mqtt]
        if settings.opcua:
            from .opcua import OpcUaSink

            sinks.append(OpcUaSink(settings.opcua, settings.station))
        if settings.webhook:
            from .webhook import WebhookSink

            sinks += [WebhookSink(url, settings.webhook_on, events) for url in settings.webhook]
    except BaseException:
        for sink in sinks:
            sink.close(0)
        raise
    return sinks
