"""The JSON records of a run, made here and nowhere else: one per frame, and events.

A frame record holds source, frame, timestamp and either the score (with a
decision when a threshold is known, and the latency) or the error that kept
the frame from being scored. Event records (a camera lost or reopened, the
closing summary) carry "event".
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import Result
    from .sources import Frame


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def frame_record(frame: Frame, result: Result | None = None, threshold: float | None = None,
                 latency_ms: float | None = None) -> dict:
    """The JSON record of one frame: its result, or the error that kept it from being scored."""
    record = {"source": frame.source, "frame": frame.index, "timestamp": frame.timestamp}
    if frame.error is not None or result is None:
        return {**record, "error": frame.error or "not scored"}
    record["score"] = round(result.score, 6)
    if threshold is not None:
        record["decision"] = "anomalous" if result.score > threshold else "normal"
    record["latency_ms"] = latency_ms
    if result.evidence is not None:
        record["evidence"] = result.evidence
    return record


def event_record(event: str, **fields) -> dict:
    return {"event": event, "timestamp": now(), **fields}
