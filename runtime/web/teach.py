"""What the operator changes from the page: enroll a frame, undo, the threshold; each change audited.

Every change runs in a worker thread of the server, one at a time (one lock),
while inspection goes on: :meth:`Detector.enroll` adds to the live target
memory under its own lock, so a batch being scored sees all of an enrollment
or none of it, and the next batch uses it. An undo is the enrollment's
rollback; the detector then scores with the version before.

Frames enrolled from the page are kept as PNG files under ``<data>/parts``
and enrolled under that file name, so that a recalibration (which scores the
enrolled good parts that are files: these, and those enrolled with
mrad-enroll) still finds them after a restart. Each good part is scored with
its own entries held out of the memory: a part scored against itself scores
near nothing, and the threshold would sit too low.

The audit log, ``<data>/audit.jsonl``, gets one JSON line per change: time,
operator, action and what changed (enrollment versions, scores before and
after, threshold before and after). It is only ever appended to.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .. import calibration
from ..detector import Detector
from ..enrollment import LABELS, TargetMemory
from ..errors import MradError
from ..records import now
from .view import Held, LineView

AUDIT_NAME = "audit.jsonl"
PARTS_FOLDER = "parts"
AUDIT_SHOWN = 20  # entries of the audit log the page shows
OPERATOR_CHARS = 64


class NotHeld(MradError):
    """The frame asked for is no longer held (the review queue moved on)."""


class AuditLog:
    """An append-only JSON lines file; its last entries are kept for the page (read back at start)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tail: collections.deque[dict] = collections.deque(maxlen=AUDIT_SHOWN)
        self.appended = 0  # entries written by this run: a browser's stream is pushed a change when it grows
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        self.tail.append(json.loads(line))
                    except ValueError:  # a line cut by a crash: skipped here, kept in the file
                        continue

    def append(self, operator: str, action: str, **what) -> dict:
        entry = {"time": now(), "operator": operator, "action": action, **what}
        data = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)  # one write of one whole line: a crash leaves complete lines only
            os.fsync(fd)
        finally:
            os.close(fd)
        self.tail.append(entry)
        self.appended += 1
        return entry


def checked_operator(operator) -> str:
    name = str(operator or "").strip()
    if not name or len(name) > OPERATOR_CHARS or not name.isprintable():
        raise MradError(f"say who you are: an operator name of 1 to {OPERATOR_CHARS} printable characters")
    return name


def region_mask(region: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """A drawn rectangle ``[x0, y0, x1, y1]`` (fractions of the width and height) as an HxW uint8 mask."""
    try:
        x0, y0, x1, y1 = (float(v) for v in region)
    except (TypeError, ValueError) as exc:
        raise MradError("region must be [x0, y0, x1, y1], fractions of the image's width and height") from exc
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise MradError(f"region {[x0, y0, x1, y1]} is not a rectangle inside the image (fractions in [0, 1])")
    height, width = shape
    mask = np.zeros((height, width), np.uint8)
    left, top = min(int(x0 * width), width - 1), min(int(y0 * height), height - 1)
    mask[top:max(top + 1, math.ceil(y1 * height)), left:max(left + 1, math.ceil(x1 * width))] = 255
    return mask


def held_out_scores(detector: Detector, parts: Sequence[str]) -> list[float]:
    """Each enrolled part scored against the live enrollment without its own entries (augmented copies too)."""
    live = detector.target_memory
    sources, levels = live.snapshot()
    largest = max((len(keys) for keys, _ in levels.values()), default=0)
    settings = dataclasses.replace(live.settings, exact_below=largest + 1)  # exact search: no index built per part
    scores = []
    for part in parts:
        own = np.flatnonzero([source.name == part for source in sources])
        kept = {}
        for name, (keys, owners) in levels.items():
            others = ~np.isin(owners, own)
            kept[name] = (keys[others], owners[others])
        trial = TargetMemory.restored(settings, live.grid, live.image_dim, live.token_dim, sources, kept)
        scores.append(detector.predict_batch([part], target=trial)[0].score)
    return scores


class Teacher:
    """The page's changes to the live detector and threshold.

    ``on_threshold(value, origin)`` applies a new threshold to the running
    line; ``threshold_origin`` says where the current one came from (a
    calibration file's path, "--threshold", or "none: ...");
    ``calibration_path``: where a recalibration is written (and what
    mrad-run reads at its next start).
    """

    def __init__(self, detector: Detector, view: LineView, data: Path, calibration_path: Path,
                 threshold_origin: str, on_threshold: Callable[[float, str], None]):
        self.detector, self.view = detector, view
        self.audit = AuditLog(Path(data) / AUDIT_NAME)
        self.parts = Path(data) / PARTS_FOLDER
        self.calibration_path = Path(calibration_path)
        self.on_threshold = on_threshold
        self.threshold_origin = threshold_origin
        # The enrollment version the threshold was measured with (a calibration's), or "by hand".
        measured = threshold_origin not in ("--threshold",) and view.threshold is not None
        self._measured_with: int | None | str = detector.enrollment_version if measured else "by hand"
        self._made_by: dict[int, int] = {}  # enrollment version -> the held frame it enrolled
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------

    def _version(self) -> int | None:
        return self.detector.enrollment.version if self.detector.enrollment is not None else None

    def state(self) -> dict:
        target = self.detector.target
        images = {label: 0 for label in LABELS}
        for source in (target.sources if target is not None else ()):
            images[source.label] += not source.augment
        stale = self._measured_with != "by hand" and self._measured_with != self.detector.enrollment_version
        return {
            "enrollment": {"version": self._version(), "can_enroll": target is not None,
                           "good": images["normal"], "defects": images["defect"]},
            "threshold": {"value": self.view.threshold, "origin": self.threshold_origin,
                          "stale": bool(stale and self.view.threshold is not None),
                          "calibration": str(self.calibration_path)},
            "audit": list(self.audit.tail)[::-1],
        }

    # -- changing --------------------------------------------------------------------------------

    def enroll(self, held_id: int, label: str, operator: str, region: Sequence[float] | None = None) -> dict:
        """Enroll a held frame as ``label`` ("normal": a false alarm; "defect", with an optional drawn region)."""
        operator = checked_operator(operator)
        if label not in LABELS:
            raise MradError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        if region is not None and label != "defect":
            raise MradError("a region marks where a defect is: only for label defect")
        held = self._held(held_id)
        mask = region_mask(region, held.image.shape[:2]) if region is not None else None
        with self._lock:
            before = self._version()
            part, mask_file = self._keep(held, label, mask)
            manifest = self.detector.enroll([held.image], label, masks=[mask_file] if mask_file else None,
                                            names=[str(part)])
            score = self.detector.predict(held.image).score
            verdict = {"label": label, "operator": operator, "score_before": held.record["score"],
                       "score_after": round(score, 6), "version": manifest.version}
            self._made_by[manifest.version] = held.id
            self.view.judged(held.id, verdict)
            self.audit.append(operator, "enroll", label=label, source=held.record["source"],
                              frame=held.record["frame"], part=str(part), mask=str(mask_file) if mask_file else None,
                              region=list(region) if region is not None else None, version_before=before,
                              version=manifest.version, score_before=held.record["score"],
                              score_after=verdict["score_after"], counts=manifest.counts())
        return verdict

    def undo(self, operator: str) -> dict:
        """Roll the enrollment back to the version before the current one."""
        operator = checked_operator(operator)
        with self._lock:
            before = self._version()
            if before is None:
                raise MradError("nothing to undo: nothing is enrolled")
            manifest = self.detector.rollback_enrollment()
            after = self._version()
            held_id = self._made_by.pop(before, None)
            held = self.view.get(held_id) if held_id is not None else None
            if held is not None and held.verdict is not None:
                self.view.judged(held.id, {**held.verdict, "undone_by": operator})
            entry = self.audit.append(operator, "undo", version_before=before, version=after,
                                      counts=manifest.counts() if manifest is not None else {})
        return entry

    def recalibrate(self, operator: str, quantile: float = calibration.DEFAULT_QUANTILE) -> dict:
        """A threshold from the enrolled good parts on disk, each scored with its own entries held out."""
        operator = checked_operator(operator)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
            raise MradError(f"quantile must lie in [0, 1], got {quantile}")
        with self._lock:
            target = self.detector.target_memory
            parts = list(dict.fromkeys(s.name for s in target.sources
                                       if s.label == "normal" and not s.augment and Path(s.name).is_file()))
            if not parts:
                raise MradError("no enrolled good part to calibrate on: mark good parts on this page (or enroll "
                                "image files with mrad-enroll --normal) first")
            scores = held_out_scores(self.detector, parts)
            result = calibration.calibrate(scores, quantile, self.detector.retrieval, self.detector.path,
                                           self.detector.enrollment_version)
            calibration.save(result, self.calibration_path)
            before = self.view.threshold
            self._apply(result.threshold, f"{self.calibration_path} (recalibrated on the operator page)",
                        self.detector.enrollment_version)
            return self.audit.append(operator, "recalibrate", threshold_before=before, threshold=result.threshold,
                                     quantile=quantile, parts=len(parts), scores_min=min(scores),
                                     scores_max=max(scores), enrollment=self.detector.enrollment_version,
                                     file=str(self.calibration_path))

    def set_threshold(self, operator: str, value: float) -> dict:
        """A threshold set by hand (for this run: mrad-run's next start reads its options and calibration again)."""
        operator = checked_operator(operator)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MradError(f"threshold must be a finite number, got {value!r}")
        with self._lock:
            before = self.view.threshold
            self._apply(float(value), "set on the operator page", "by hand")
            return self.audit.append(operator, "threshold", threshold_before=before, threshold=float(value))

    def _apply(self, value: float, origin: str, measured_with) -> None:
        self.on_threshold(value, origin)
        self.view.threshold, self.threshold_origin, self._measured_with = value, origin, measured_with

    def _held(self, held_id: int) -> Held:
        held = self.view.get(held_id)
        if held is None:
            raise NotHeld(f"frame {held_id} is no longer held: the page keeps each source's latest frame and "
                          "the review queue's last frames")
        return held

    def _keep(self, held: Held, label: str, mask: np.ndarray | None) -> tuple[Path, Path | None]:
        """Write the frame (and its drawn mask) under ``parts``: what the enrollment names, and recalibration reads."""
        self.parts.mkdir(parents=True, exist_ok=True)
        stem = f"{now().replace(':', '').replace('-', '')}-{label}-{Path(held.record['source']).stem}-{held.record['frame']}"
        part = self.parts / f"{stem}.png"
        Image.fromarray(held.image).save(part)
        mask_file = None
        if mask is not None:
            mask_file = self.parts / f"{stem}-mask.png"
            Image.fromarray(mask).save(mask_file)
        return part.resolve(), mask_file.resolve() if mask_file else None
