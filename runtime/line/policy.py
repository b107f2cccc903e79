"""The decision policy of a recipe: the threshold, where it came from, and the rule that turns a score into a verdict.

A policy is immutable; its recipe replaces it whole (a recalibration, a
threshold set on the operator's page), so a batch reads one policy.

    decision = "anomalous"   if a per-part count lies outside the enrolled counts
               "anomalous"   if score > threshold
               "normal"      otherwise
               None          without a threshold (records carry scores only)

Where a threshold comes from, strongest first: a fixed value (``--threshold``
or the station file's ``threshold``); a calibration file (``mrad-calibrate``,
or written when enrolling measured it); none. A calibration measured with
another enrollment version than the one scoring now is still used (a run
never refuses to start because the enrollment changed), and results say
``threshold_stale`` until it is measured again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..core.result import Result
from ..errors import MradError
from ..formats import calibration

NO_THRESHOLD = "none: records carry scores only (run mrad-calibrate, enroll good parts, or pass --threshold)"


@dataclass(frozen=True)
class DecisionPolicy:
    """``threshold`` (None: scores only); ``origin`` for people; ``calibration``: the id of the calibration file
    it came from (None: fixed or none); ``measured_with``: the enrollment version it was measured with."""

    threshold: float | None = None
    origin: str = NO_THRESHOLD
    calibration: str | None = None
    measured_with: int | None = None
    fixed: bool = False  # set by hand: no enrollment makes it stale

    def __post_init__(self):
        # the one check every threshold passes, wherever it comes from (flag, station file, page, PLC, file):
        # NaN would pass every part (a NaN comparison is always false)
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold) and 0 <= self.threshold <= 1):
            raise MradError(f"a threshold is a score between 0 and 1, got {str(self.threshold)[:40]} ({self.origin})")

    def decide(self, result: Result) -> str | None:
        if self.threshold is None:
            return None
        if result.object_count_ok is False:  # a missing or extra part is a defect whatever the score
            return "anomalous"
        return "anomalous" if result.score > self.threshold else "normal"

    def stale(self, enrollment: int | None) -> bool:
        """Whether the threshold was measured with another enrollment than ``enrollment`` (the one scoring now)."""
        return self.threshold is not None and not self.fixed and self.measured_with != enrollment


def calibration_id(path: Path) -> str:
    """A calibration's id in records: the first 12 hex digits of its file's sha256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def policy_for(bundle: Path, retrieval: str, threshold: float | None = None, calibration_file: Path | None = None,
               origin: str = "--threshold", default: Path | None = None, trusted_keys: Sequence[Path] = (),
               bundle_sha: str | None = None) -> DecisionPolicy:
    """A recipe's policy at start: a fixed ``threshold``; else ``calibration_file``; else the calibration at
    ``default`` (beside the bundle unless given) when there is one; else none. A calibration of another bundle or
    retrieval mode is refused, and so is one not signed by ``trusted_keys`` when they are given
    (:func:`~mrad.runtime.formats.calibration.load`)."""
    if threshold is not None:
        return DecisionPolicy(float(threshold), origin, fixed=True)
    path = Path(calibration_file) if calibration_file else Path(default or calibration.default_path(bundle))
    if calibration_file is None and not path.is_file():
        return DecisionPolicy()
    measured = calibration.load(path, bundle, retrieval, trusted_keys, bundle_sha)
    return DecisionPolicy(measured.threshold, str(path), calibration_id(path), measured.enrollment)


def measured(result: calibration.Calibration, path: Path, origin: str | None = None) -> DecisionPolicy:
    """The policy a calibration just written to ``path`` gives."""
    return DecisionPolicy(result.threshold, origin or str(path), calibration_id(path), result.enrollment)
