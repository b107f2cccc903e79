"""MQTT: each frame's JSON record to a broker that may come and go (paho-mqtt).

Topics, under the URL's TOPIC:

- ``TOPIC``: one message per frame, its JSON record (scored, error or dropped);
- ``TOPIC/last``: the latest scored frame's record, retained, so a subscriber
  arriving later (a PLC after a restart) has the last verdict at once;
- ``TOPIC/events``: event records (a camera lost or back, a sink lost or back);
- ``TOPIC/status``: ``online`` or ``offline``, retained; ``offline`` is also
  the broker's last will, sent when mrad-run dies without closing;
- ``TOPIC/command`` (subscribed, when the run has a station): a changeover,
  ``{"recipe": "part-b"}`` or the bare name, at most ``MAX_COMMAND_BYTES``;
  the change is a ``recipe_changed`` event, a refused one ``recipe_refused``.

``write`` only queues. A thread hands queued messages to paho while the
broker is connected, at most ``MAX_INFLIGHT`` unacknowledged; paho reconnects
with backoff and resends what was unacknowledged when a link dropped. QoS 1
(the default) is at least once: a message in flight when the link drops may
arrive twice; QoS 2 is exactly once while the process lives. The queue is
bounded: when it is full its oldest message is dropped and counted. With a
buffer folder the queue is a SQLite file that outlasts the process: what the
broker had not acknowledged at the end is sent by the next run given the same
folder and URL (at least once: it may arrive twice).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from pathlib import Path

from .. import defaults
from ..errors import MradError
from .settings import need
from .records import event_record
from .outbox import InMemory, Outbox
from .sinks import Events, Link, Sink
from .spool import Spool
from .settings import MqttTarget

mqtt = need("paho.mqtt.client")

MAX_INFLIGHT = 50  # enough to keep a LAN link busy, few enough to resend after a drop
RECONNECT_S = (0.5, 30.0)  # paho's backoff between connection attempts: first, longest
KEEPALIVE_S = 30  # a broker gone without closing the connection is noticed within 1.5 times this
MAX_COMMAND_BYTES = 1024  # a recipe's name fits many times over; a larger command is refused unread
STOP_WAIT_S = 1.5  # paho's thread looks for a stop at least once a second while it waits to reconnect


class MqttSink(Sink):
    """Publishes every record to ``target`` (see the module's docstring); ``close`` returns its counts."""

    needs_picture = False

    def __init__(self, target: MqttTarget, qos: int = defaults.MQTT_QOS, buffer_dir: Path | None = None,
                 buffer_size: int = defaults.MQTT_BUFFER_SIZE,
                 events: Events = lambda record: None, reconnect_s: tuple[float, float] = RECONNECT_S,
                 commands=None):
        self.name, self.qos, self.buffer_size = target.url, qos, buffer_size
        self.topics = {name: f"{target.topic}/{name}" for name in ("last", "events", "status", "command")}
        self.commands, self.events = commands, events
        self.topics["frames"] = target.topic
        spool_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{target.host}_{target.port}_{target.topic}")
        try:
            store = Spool(Path(buffer_dir) / f"mqtt-{spool_name}.sqlite", "MQTT buffer") if buffer_dir else InMemory()
        except (OSError, sqlite3.Error) as exc:
            raise MradError(f"--mqtt-buffer {buffer_dir} cannot be used: {exc}") from exc
        self._queue = Outbox(buffer_size, store)  # guarded by _changed
        self.delivered = self.failed = 0
        self._link = Link(self.name, events)
        self._changed = threading.Condition()  # guards everything below; never held while calling paho or events
        self._connected, self._error, self._closing, self._closed = False, None, False, False
        self._inflight: dict[int, object] = {}  # paho message id -> queue key (None: a retained last or status)
        self._early: dict[int, bool] = {}  # acknowledged before publish() returned the id: id -> accepted
        self._last: bytes | None = None
        self._last_due = self._status_due = self._drop_due = False

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"mrad-run-{uuid.uuid4().hex[:12]}",
                             clean_session=True)
        if target.tls:
            client.tls_set()
        if target.username:
            client.username_pw_set(target.username, target.password)
        client.will_set(self.topics["status"], b"offline", qos, retain=True)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.reconnect_delay_set(*reconnect_s)
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_connect_fail, client.on_publish = self._on_connect_fail, self._on_publish
        client.on_message = self._on_message
        client.connect_async(target.host, target.port, KEEPALIVE_S)
        client.loop_start()  # paho's network thread: connects, reconnects with backoff, resends
        self._client = client
        self._worker = threading.Thread(target=self._work, name="mrad-mqtt", daemon=True)
        self._worker.start()

    def write(self, record: dict, picture=None, frame=None, anomaly_map=None) -> None:
        payload = json.dumps(record).encode()
        with self._changed:
            if self._closing:
                return
            if self._queue.put((self.topics["events" if "event" in record else "frames"], payload)):
                self._drop_due = True  # one event per outage, not one per message
            if "score" in record:
                self._last, self._last_due = payload, True
            self._changed.notify_all()

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    def pending(self) -> int:
        """Messages not yet acknowledged by the broker."""
        with self._changed:
            return len(self._queue) + sum(key is not None for key in self._inflight.values())

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the broker to acknowledge everything queued; True if it did."""
        with self._changed:
            return self._changed.wait_for(lambda: not (len(self._queue) or self._inflight or (
                self._connected and self._last_due)), timeout)

    def close(self, timeout: float) -> dict:
        """Deliver what is queued within ``timeout`` seconds, say "offline", disconnect; the counts for the summary.

        What is left is "undelivered" (lost), or "kept" in the buffer folder for the next run.
        """
        self.flush(timeout)
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            connected = self._connected
        self._worker.join(STOP_WAIT_S)
        if connected:
            info = self._client.publish(self.topics["status"], b"offline", self.qos, retain=True)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                info.wait_for_publish(min(timeout, 1.0))
        self._client.disconnect()
        # loop_stop waits for paho's thread without a bound (it may be inside a connection attempt): bound it here
        stopping = threading.Thread(target=self._client.loop_stop, daemon=True)
        stopping.start()
        stopping.join(STOP_WAIT_S)
        with self._changed:  # paho's thread may outlive the bounded wait: what it reports now is not counted
            left = len(self._queue) + sum(key is not None for key in self._inflight.values())
            self._queue.close()
            self._closed = True
        counts = {"delivered": self.delivered, "dropped": self.dropped, "failed": self.failed,
                  "outages": self._link.outages}
        counts["kept" if isinstance(self._queue.store, Spool) else "undelivered"] = left
        return counts

    # paho's callbacks, in its network thread: record the change, wake the worker, nothing else.

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if self.commands is not None and not reason.is_failure:
            client.subscribe(self.topics["command"], qos=1)  # again at every connection: the session is clean
        with self._changed:
            self._connected = not reason.is_failure
            self._error = None if self._connected else f"the broker refused the connection: {reason}"
            self._status_due = self._connected
            self._changed.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        """A command: the recipe to change over to (JSON ``{"recipe": NAME}`` or the bare name)."""
        if self.commands is None or message.topic != self.topics["command"]:
            return
        by = f"mqtt {self.topics['command']}"
        try:
            if len(message.payload) > MAX_COMMAND_BYTES:
                raise MradError(f"a command is at most {MAX_COMMAND_BYTES} bytes")
            text = message.payload.decode("utf-8")
            try:
                body = json.loads(text)
            except ValueError:
                body = {"recipe": text.strip()}
            name = body.get("recipe") if isinstance(body, dict) else body
            if not isinstance(name, str):
                raise MradError('a command is {"recipe": NAME}')
            self.commands.activate(name, by=by)
        except (MradError, UnicodeDecodeError) as exc:
            self.events(event_record("recipe_refused", by=by, error=str(exc)))

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        with self._changed:
            self._connected, self._error = False, f"connection lost ({reason})"
            self._changed.notify_all()

    def _on_connect_fail(self, client, userdata) -> None:
        with self._changed:
            self._connected, self._error = False, "the broker cannot be reached"
            self._changed.notify_all()

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        with self._changed:
            if mid in self._inflight:
                self._finish(self._inflight.pop(mid), not reason.is_failure)
            else:
                self._early[mid] = not reason.is_failure
            self._changed.notify_all()

    def _finish(self, key, accepted: bool) -> None:
        if key is None or self._closed:
            return
        self._queue.store.done(key)
        if accepted:
            self.delivered += 1
        else:
            self.failed += 1

    def _due(self) -> bool:
        if self._closing or self._drop_due:
            return True
        if not self._connected:
            return self._error is not None and self._link.up is not False
        room = len(self._inflight) < MAX_INFLIGHT
        return self._link.up is not True or self._status_due or (room and (len(self._queue) > 0 or self._last_due))

    def _work(self) -> None:
        """Report link changes and hand queued messages to paho, outside the lock (paho calls back under its own)."""
        while True:
            with self._changed:
                self._changed.wait_for(self._due)
                if self._closing:
                    return
                connected, error, drop_due = self._connected, self._error, self._drop_due
                self._drop_due = False
                batch, last, status = [], None, False
                if connected:
                    if self._link.up is not True:
                        self._queue.delivered()  # the link is back: a new outage reports its drops again
                    batch = self._queue.take(MAX_INFLIGHT - len(self._inflight))
                    last, self._last_due = (self._last if self._last_due else None), False
                    status, self._status_due = self._status_due, False
            if connected:
                self._link.back()
            elif error is not None:
                self._link.lost(error)
            if drop_due:
                self._link.dropping(self.buffer_size)
            if status:
                self._publish(self.topics["status"], b"online", None, retain=True)
            for key, (topic, payload) in batch:
                self._publish(topic, payload, key)
            if last is not None:
                self._publish(self.topics["last"], last, None, retain=True)

    def _publish(self, topic: str, payload: bytes, key, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, self.qos, retain)
        # QoS 1 and 2: a message published as the link drops is kept by paho and sent again on reconnection
        kept = info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos > 0)
        with self._changed:
            if not kept:
                self._finish(key, False)
            elif info.mid in self._early:
                self._finish(key, self._early.pop(info.mid))
            else:
                self._inflight[info.mid] = key
            self._changed.notify_all()
