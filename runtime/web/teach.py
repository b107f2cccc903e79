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
after, threshold before and after; for a frame enrolled, its source's name
on the page, its file and frame number). It is only ever appended to.
"""

from __future__ import annotations

import collections
import json
import math
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..formats import calibration
from ..line.station import Recipe, Station
from ..memories.enrollment import LABELS
from ..memories.trials import enrolled_parts
from ..errors import MradError
from ..line.records import now
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


class Teacher:
    """The page's changes, each one a call on the station or one of its recipes, one at a time, audited.

    The page writes no state of its own: the station owns which recipe is
    active, each recipe its enrollment and decision policy. A frame is
    enrolled into the recipe that scored it; undo, the threshold and
    recalibration act on the active recipe.
    """

    def __init__(self, station: Station, view: LineView, data: Path):
        self.station, self.view = station, view
        self.audit = AuditLog(Path(data) / AUDIT_NAME)
        self.parts = Path(data) / PARTS_FOLDER
        self._made_by: dict[tuple[str, int], int] = {}  # (recipe, enrollment version) -> the held frame it enrolled
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------

    def state(self) -> dict:
        recipe = self.station.recipe()
        detector, policy = recipe.detector, recipe.policy
        target = detector.target
        images = {label: 0 for label in LABELS}
        for source in (target.sources if target is not None else ()):
            images[source.label] += not source.augment
        version = detector.enrollment.version if detector.enrollment is not None else None
        return {
            "recipe": {"active": recipe.name, "recipes": self.station.recipes},
            "enrollment": {"version": version, "can_enroll": target is not None,
                           "good": images["normal"], "defects": images["defect"]},
            "threshold": {"value": policy.threshold, "origin": policy.origin, "stale": recipe.threshold_stale,
                          "calibration": str(recipe.calibration_path)},
            "audit": list(self.audit.tail)[::-1],
        }

    # -- changing --------------------------------------------------------------------------------

    def enroll(self, held_id: int, label: str, operator: str, region: Sequence[float] | None = None) -> dict:
        """Enroll a held frame as ``label`` ("normal": a false alarm; "defect", with an optional drawn region)
        into the recipe that scored it."""
        operator = checked_operator(operator)
        if label not in LABELS:
            raise MradError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        if region is not None and label != "defect":
            raise MradError("a region marks where a defect is: only for label defect")
        held = self._held(held_id)
        recipe = self.station.recipe(held.record.get("recipe") or self.station.active)
        mask = region_mask(region, held.image.shape[:2]) if region is not None else None
        with self._lock:
            before = _version(recipe)
            threshold_before = recipe.policy.threshold
            part, mask_file = self._keep(held, label, mask)
            manifest, measured = recipe.enroll([held.image], label, masks=[mask_file] if mask_file else None,
                                               names=[str(part)])
            score = self.station.recipe(recipe.name).detector.predict(held.image).score
            verdict = {"label": label, "operator": operator, "score_before": held.record["score"],
                       "score_after": round(score, 6), "version": manifest.version, "recipe": recipe.name,
                       "threshold": measured.message}
            self._made_by[(recipe.name, manifest.version)] = held.id
            self.view.judged(held.id, verdict)
            self.audit.append(operator, "enroll", recipe=recipe.name, label=label, name=held.name,
                              source=held.record["source"], frame=held.record["frame"], part=str(part),
                              mask=str(mask_file) if mask_file else None,
                              region=list(region) if region is not None else None, version_before=before,
                              version=manifest.version, score_before=held.record["score"],
                              score_after=verdict["score_after"], counts=manifest.counts(),
                              threshold_before=threshold_before, threshold=recipe.policy.threshold)
        return verdict

    def undo(self, operator: str) -> dict:
        """Roll the active recipe's enrollment back to the version before the current one."""
        operator = checked_operator(operator)
        recipe = self.station.recipe()
        with self._lock:
            before = _version(recipe)
            if before is None:
                raise MradError("nothing to undo: nothing is enrolled")
            manifest = recipe.rollback()
            after = _version(recipe)
            held_id = self._made_by.pop((recipe.name, before), None)
            held = self.view.get(held_id) if held_id is not None else None
            if held is not None and held.verdict is not None:
                self.view.judged(held.id, {**held.verdict, "undone_by": operator})
            entry = self.audit.append(operator, "undo", recipe=recipe.name, version_before=before, version=after,
                                      counts=manifest.counts() if manifest is not None else {})
        return entry

    def recalibrate(self, operator: str, quantile: float = calibration.DEFAULT_QUANTILE) -> dict:
        """The active recipe's threshold from its enrolled good parts on disk, each scored with its own entries held out."""
        operator = checked_operator(operator)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
            raise MradError(f"quantile must lie in [0, 1], got {quantile}")
        recipe = self.station.recipe()
        with self._lock:
            parts = enrolled_parts(recipe.detector.target_memory)
            if not parts:
                raise MradError("no enrolled good part to calibrate on: mark good parts on this page (or enroll "
                                "image files with mrad-enroll --normal) first")
            before = recipe.policy.threshold
            measured = recipe.remeasure(quantile, f"{recipe.calibration_path} (recalibrated on the operator page)",
                                        minimum=1, fixed_too=True)
            return self.audit.append(operator, "recalibrate", recipe=recipe.name, threshold_before=before,
                                     threshold=recipe.policy.threshold, quantile=quantile, parts=len(parts),
                                     enrollment=recipe.detector.enrollment_version, file=str(recipe.calibration_path),
                                     message=measured.message)

    def set_threshold(self, operator: str, value: float) -> dict:
        """A threshold set by hand for the active recipe (for this run: the next start reads its settings again)."""
        operator = checked_operator(operator)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MradError(f"threshold must be a finite number, got {value!r}")
        recipe = self.station.recipe()
        with self._lock:
            before = recipe.policy.threshold
            recipe.set_threshold(float(value), "set on the operator page")
            return self.audit.append(operator, "threshold", recipe=recipe.name, threshold_before=before,
                                     threshold=float(value))

    def activate(self, operator: str, name: str) -> dict:
        """Change over to recipe ``name`` from the next frame."""
        operator = checked_operator(operator)
        with self._lock:
            before = self.station.active
            self.station.activate(name, by=f"operator page ({operator})")
            return self.audit.append(operator, "recipe", recipe_before=before, recipe=name)

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


def _version(recipe: Recipe) -> int | None:
    manifest = recipe.detector.enrollment
    return manifest.version if manifest is not None else None
