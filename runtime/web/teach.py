"""What the operator changes from the page: enroll a frame, undo, the threshold, the recipe; each change audited.

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

The audit log, ``<data>/audit.jsonl`` (see :mod:`.audit`), holds two entries
per change. The first says what is asked (operator, action, what it acts on,
the state before: enrollment version, score, threshold, recipe; for a frame,
its source's name on the page, its file and frame number) and is on disk
(fsync) before anything is applied: when it cannot be written, nothing is
changed and the page is told so. The second, ``"result": "applied"`` (with
what changed: the new version, the score after, the new threshold) or
``"failed"`` (with the error), names the first by its digest (``of``).
A change is checked before its first entry is written: a request refused
(a bad name, nothing to undo) leaves no entry.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..formats import calibration
from ..line.station import Recipe, Station
from ..memories.enrollment import LABELS
from ..memories.trials import enrolled_parts
from ..errors import MradError
from ..line.records import now
from .audit import AuditError, AuditLog
from .view import Held, LineView

AUDIT_NAME = "audit.jsonl"
PARTS_FOLDER = "parts"
OPERATOR_CHARS = 64
ECHOED = 64  # characters of a refused value said back


class NotHeld(MradError):
    """The frame asked for is no longer held (the review queue moved on)."""


def checked_operator(operator) -> str:
    """The operator's name: a string of 1 to OPERATOR_CHARS printable characters (a JSON object is no name)."""
    name = operator.strip() if isinstance(operator, str) else ""
    if not name or len(name) > OPERATOR_CHARS or not name.isprintable():
        raise MradError(f"say who you are: an operator name of 1 to {OPERATOR_CHARS} printable characters")
    return name


def said(value) -> str:
    """A refused value as the answer says it back: its repr, at most ECHOED characters."""
    text = repr(value)
    return text if len(text) <= ECHOED else text[:ECHOED] + "..."


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
    """The page's changes, each one a call on the station or one of its recipes, one at a time, audited first.

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
            "audit_head": self.audit.head,
        }

    # -- changing --------------------------------------------------------------------------------

    def enroll(self, held_id: int, label: str, operator: str, region: Sequence[float] | None = None) -> dict:
        """Enroll a held frame as ``label`` ("normal": a false alarm; "defect", with an optional drawn region)
        into the recipe that scored it."""
        operator = checked_operator(operator)
        if not isinstance(label, str) or label not in LABELS:
            raise MradError(f"label must be one of {', '.join(LABELS)}, got {said(label)}")
        if region is not None and label != "defect":
            raise MradError("a region marks where a defect is: only for label defect")
        held = self._held(held_id)
        recipe = self.station.recipe(held.record.get("recipe") or self.station.active)
        mask = region_mask(region, held.image.shape[:2]) if region is not None else None
        with self._lock:
            part, mask_file = self._names(held, label, mask is not None)
            asked = dict(recipe=recipe.name, label=label, name=held.name, source=held.record["source"],
                         frame=held.record["frame"], part=str(part), mask=str(mask_file) if mask_file else None,
                         region=[float(v) for v in region] if region is not None else None,
                         version_before=_version(recipe), score_before=held.record["score"],
                         threshold_before=recipe.policy.threshold)

            def apply() -> dict:
                self._keep(held, part, mask, mask_file)
                manifest, measured = recipe.enroll([held.image], label, masks=[mask_file] if mask_file else None,
                                                   names=[str(part)])
                score = self.station.recipe(recipe.name).detector.predict(held.image).score
                self._made_by[(recipe.name, manifest.version)] = held.id
                return {"version": manifest.version, "score_after": round(score, 6), "counts": manifest.counts(),
                        "threshold": recipe.policy.threshold, "message": measured.message}

            done = self._audited(operator, "enroll", asked, apply)
            verdict = {"label": label, "operator": operator, "score_before": held.record["score"],
                       "score_after": done["score_after"], "version": done["version"], "recipe": recipe.name,
                       "threshold": done["message"]}
            self.view.judged(held.id, verdict)
        return {**verdict, **({"warning": done["warning"]} if "warning" in done else {})}

    def undo(self, operator: str) -> dict:
        """Roll the active recipe's enrollment back to the version before the current one."""
        operator = checked_operator(operator)
        recipe = self.station.recipe()
        with self._lock:
            before = _version(recipe)
            if before is None:
                raise MradError("nothing to undo: nothing is enrolled")

            def apply() -> dict:
                manifest = recipe.rollback()
                held_id = self._made_by.pop((recipe.name, before), None)
                held = self.view.get(held_id) if held_id is not None else None
                if held is not None and held.verdict is not None:
                    self.view.judged(held.id, {**held.verdict, "undone_by": operator})
                return {"version": _version(recipe), "counts": manifest.counts() if manifest is not None else {}}

            return self._audited(operator, "undo", {"recipe": recipe.name, "version_before": before}, apply)

    def recalibrate(self, operator: str, quantile: float = calibration.DEFAULT_QUANTILE) -> dict:
        """The active recipe's threshold from its enrolled good parts on disk, each scored with its own entries held out."""
        operator = checked_operator(operator)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
            raise MradError(f"quantile must lie in [0, 1], got {said(quantile)}")
        recipe = self.station.recipe()
        with self._lock:
            parts = enrolled_parts(recipe.detector.target_memory)
            if not parts:
                raise MradError("no enrolled good part to calibrate on: mark good parts on this page (or enroll "
                                "image files with mrad-enroll --normal) first")
            asked = dict(recipe=recipe.name, threshold_before=recipe.policy.threshold, quantile=quantile,
                         parts=len(parts), enrollment=recipe.detector.enrollment_version,
                         file=str(recipe.calibration_path))

            def apply() -> dict:
                measured = recipe.remeasure(quantile, f"{recipe.calibration_path} (recalibrated on the operator page)",
                                            minimum=1, fixed_too=True)
                return {"threshold": recipe.policy.threshold, "message": measured.message}

            return self._audited(operator, "recalibrate", asked, apply)

    def set_threshold(self, operator: str, value: float) -> dict:
        """A threshold set by hand for the active recipe (for this run: the next start reads its settings again)."""
        operator = checked_operator(operator)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MradError(f"threshold must be a finite number, got {said(value)}")
        recipe = self.station.recipe()
        with self._lock:
            asked = dict(recipe=recipe.name, threshold_before=recipe.policy.threshold, threshold=float(value))

            def apply() -> dict:
                recipe.set_threshold(float(value), "set on the operator page")
                return {}

            return self._audited(operator, "threshold", asked, apply)

    def activate(self, operator: str, name: str) -> dict:
        """Change over to recipe ``name`` from the next frame."""
        operator = checked_operator(operator)
        if not isinstance(name, str):
            raise MradError(f"a recipe is named by a string, got {said(name)}")
        self.station.recipe(name)  # the station says which names it knows; nothing is asked of it yet
        with self._lock:
            asked = dict(recipe_before=self.station.active, recipe=name)

            def apply() -> dict:
                self.station.activate(name, by=f"operator page ({operator})")
                return {}

            return self._audited(operator, "recipe", asked, apply)

    def _audited(self, operator: str, action: str, asked: dict, apply: Callable[[], dict]) -> dict:
        """Write what is asked (on disk: fsync), then apply it, then write what came of it.

        When the first entry cannot be written, AuditError goes to the caller and nothing is applied. When the
        second cannot, the change stands (its request is on record): the answer carries a warning saying so.
        """
        request = self.audit.append(operator, action, **asked)
        of = self.audit.head
        try:
            outcome = apply()
        except Exception as exc:
            self._settle(operator, action, of, result="failed", error=str(exc)[:500])
            raise
        settled = self._settle(operator, action, of, result="applied", **outcome)
        return {"time": request["time"], "operator": operator, "action": action, **asked, **outcome, **settled}

    def _settle(self, operator: str, action: str, of: str, **what) -> dict:
        try:
            self.audit.append(operator, action, of=of, **what)
        except AuditError as exc:
            return {"warning": f"{action} applied, but its outcome could not be written to the audit log ({exc}); "
                               "the request is on record"}
        return {}

    def _held(self, held_id: int) -> Held:
        held = self.view.get(held_id)
        if held is None:
            raise NotHeld(f"frame {held_id} is no longer held: the page keeps each source's latest frame and "
                          "the review queue's last frames")
        return held

    def _names(self, held: Held, label: str, masked: bool) -> tuple[Path, Path | None]:
        """Where the frame (and its drawn mask) will be kept under ``parts``: named in the audit before written."""
        stem = f"{now().replace(':', '').replace('-', '')}-{label}-{Path(held.record['source']).stem}-{held.record['frame']}"
        folder = self.parts.resolve()
        return folder / f"{stem}.png", folder / f"{stem}-mask.png" if masked else None

    def _keep(self, held: Held, part: Path, mask: np.ndarray | None, mask_file: Path | None) -> None:
        """Write the frame (and its drawn mask): what the enrollment names, and recalibration reads."""
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
            Image.fromarray(held.image).save(part)
            if mask is not None:
                Image.fromarray(mask).save(mask_file)
        except OSError as exc:
            raise MradError(f"the frame cannot be kept under {PARTS_FOLDER}/: {exc.strerror or exc}") from exc


def _version(recipe: Recipe) -> int | None:
    manifest = recipe.detector.enrollment
    return manifest.version if manifest is not None else None
