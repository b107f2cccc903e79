"""The JSON records of a run, made here and nowhere else: one per frame, and events.

A frame record holds source, frame, timestamp (and "camera", the camera's own
frame id and timestamp, when it stamps them) and one of: the score (with the
decision of its recipe's policy when a threshold is known, the recipe and
what scored it ("scored_by": bundle digest, enrollment version, calibration
id, threshold; "threshold_stale" when that threshold was measured with another
enrollment; "plant": the recipe's names for the plant), and the latency; with
a per-part memory, "objects" (box and score of each part) and
"object_count_ok"; "late" when the decision came past the deadline), the error that kept the frame from being scored,
"dropped" (read but never scored), or "late" without a score (past its
deadline before scoring began, so not scored). Event records (a camera opened,
lost or reopened, the closing summary) carry "event".
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.result import Result
    from .sources import Frame


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def frame_record(frame: Frame, result: Result | None = None, latency_ms: float | None = None,
                 late_age_ms: float | None = None) -> dict:
    """The JSON record of one frame: its result, or the error that kept it from being scored.

    ``late_age_ms``: the frame's age when decided, given when that was past its deadline.
    """
    record = _identity(frame)
    if frame.error is not None or result is None:
        return {**record, "error": frame.error or "not scored"}
    record["score"] = round(result.score, 6)
    if result.decision is not None:
        record["decision"] = result.decision
    if result.objects is not None:
        record["objects"] = [o.to_dict() for o in result.objects]
        record["object_count_ok"] = result.object_count_ok
    if result.recipe is not None:
        record["recipe"] = result.recipe
        scored_by = result.scored_by or {}
        record["scored_by"] = {k: v for k, v in scored_by.items() if k not in ("threshold_stale", "plant")}
        if scored_by.get("threshold_stale"):
            record["threshold_stale"] = True
        if scored_by.get("plant"):
            record["plant"] = scored_by["plant"]
    record["latency_ms"] = latency_ms
    if late_age_ms is not None:
        record.update(late=True, age_ms=round(late_age_ms, 2))
    if result.evidence is not None:
        record["evidence"] = result.evidence
    return record


def dropped_record(frame: Frame, why: str) -> dict:
    """A frame read but never scored (scoring was behind, or the run stopped)."""
    return {**_identity(frame), "dropped": why}


def late_record(frame: Frame, age_ms: float) -> dict:
    """A frame already past its deadline when scoring would have begun: not scored."""
    return {**_identity(frame), "late": True, "age_ms": round(age_ms, 2)}


def _identity(frame: Frame) -> dict:
    record = {"source": frame.source, "frame": frame.index, "timestamp": frame.timestamp}
    if frame.camera is not None:
        record["camera"] = frame.camera
    return record


def event_record(event: str, **fields) -> dict:
    return {"event": event, "timestamp": now(), **fields}
