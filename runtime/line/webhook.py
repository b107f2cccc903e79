"""Webhooks: an HTTP POST of a frame's JSON record, from a thread, so scoring never waits (standard library only).

Anomalous frames only (the default) or every frame. A POST that fails for a
reason that may pass (no connection, a timeout, HTTP 408, 429 or 5xx) is tried
again after 0.5 s, 1 s, 2 s, ... (``retries`` times); any other HTTP error is
the receiver refusing the record, not tried again; so is a redirect (3xx),
which is never followed: a record goes to the URL given and nowhere else. Records
wait in a bounded queue, in order: when it is full the oldest is dropped and
counted. The URL's secrets (user, password, query values) are never shown.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

from .outbox import Outbox
from .settings import shown_url
from .sinks import Events, Link, Sink

RETRIES = 5
BACKOFF_S = 0.5  # the first wait before trying again; doubled each time
TIMEOUT_S = 5.0  # for one POST
QUEUE_SIZE = 1000
RETRY_STATUS = {408, 429}  # and every 5xx
ANSWER_BYTES = 64 * 1024  # of the receiver's answer, read and dropped


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx becomes an HTTPError: refused, not followed


_OPENER = urllib.request.build_opener(_NoRedirects)


class WebhookSink(Sink):
    """POSTs frame records to ``url`` (``on``: "anomalous" or "all"); ``close`` returns its counts."""

    needs_picture = False

    def __init__(self, url: str, on: str = "anomalous", events: Events = lambda record: None, retries: int = RETRIES,
                 backoff_s: float = BACKOFF_S, timeout_s: float = TIMEOUT_S, queue_size: int = QUEUE_SIZE):
        self.url, self.on = url, on
        self.name = f"webhook {shown_url(url)}"
        self.retries, self.backoff_s, self.timeout_s, self.queue_size = retries, backoff_s, timeout_s, queue_size
        self.delivered = self.failed = 0
        self._link = Link(self.name, events)
        self._outbox = Outbox(queue_size)  # guarded by _changed
        self._busy = False  # a record is being posted (it has left the queue)
        self._closing = self._drop_due = False
        self._changed = threading.Condition()
        self._stop = threading.Event()  # ends a wait between tries at once
        self._worker = threading.Thread(target=self._work, name="mrad-webhook", daemon=True)
        self._worker.start()

    def write(self, record: dict, picture=None, frame=None, anomaly_map=None) -> None:
        if "event" in record or (self.on == "anomalous" and record.get("decision") != "anomalous"):
            return
        body = json.dumps(record).encode()
        with self._changed:
            if self._closing:
                return
            if self._outbox.put(body):  # one event per outage, not one per record
                self._drop_due = True
            self._changed.notify_all()

    @property
    def dropped(self) -> int:
        return self._outbox.dropped

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued record to be posted (or given up); True if they were."""
        with self._changed:
            return self._changed.wait_for(lambda: not len(self._outbox) and not self._busy, timeout)

    def close(self, timeout: float) -> dict:
        """Post what is queued within ``timeout`` seconds, then stop; the counts for the summary."""
        self.flush(timeout)
        with self._changed:
            self._closing = True
            undelivered = self._outbox.clear()
            self._changed.notify_all()
        self._stop.set()
        self._worker.join(self.timeout_s)  # a POST under way ends within its own timeout
        with self._changed:
            undelivered += self._busy  # still under way: its outcome is not known
        return {"delivered": self.delivered, "dropped": self.dropped, "failed": self.failed,
                "undelivered": undelivered, "outages": self._link.outages}

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: len(self._outbox) or self._closing or self._drop_due)
                if self._closing:
                    return
                drop_due, self._drop_due = self._drop_due, False
                taken = self._outbox.take(1)
                body = taken[0][1] if taken else None
                self._busy = body is not None
            if drop_due:
                self._link.dropping(self.queue_size)
            if body is None:
                continue
            delivered = self._deliver(body)
            with self._changed:
                self._busy = False
                if delivered:
                    self.delivered += 1
                    self._outbox.delivered()
                else:
                    self.failed += 1
                self._changed.notify_all()

    def _deliver(self, body: bytes) -> bool:
        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            error, again = self._post(body)
            if error is None:
                self._link.back()
                return True
            if not again or attempt == self.retries or self._stop.wait(wait):
                break
            wait *= 2
        self._link.lost(error)
        return False

    def _post(self, body: bytes) -> tuple[str | None, bool]:
        """One POST: (None, _) when accepted, else (why, whether trying again may help)."""
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "mrad-run"})
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                response.read(ANSWER_BYTES)
            return None, False
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} {exc.reason}", exc.code in RETRY_STATUS or exc.code >= 500
        except urllib.error.URLError as exc:
            return str(exc.reason), True
        except (OSError, http.client.HTTPException) as exc:  # a timeout or a connection reset mid-response
            return f"{type(exc).__name__}: {exc}", True
