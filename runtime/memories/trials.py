"""Held-out trials: which enrolled parts to score with their own entries left out, and how many are enough.

A good part scored against a memory that holds it finds itself and scores
near nothing, so a threshold measured that way sits too low (the line then
flags good parts). Every threshold measured on enrolled parts (mrad-enroll,
mrad-calibrate, the operator's page) scores each of them with its entries,
augmented copies included, left out
(:meth:`~mrad.runtime.memories.service.LineMemory.held_out_scores`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .enrollment import TargetMemory

# Enrolled good parts needed before enrolling measures the threshold again. Two reasons: held out, each part is
# scored against a memory that lacks it, which at n parts is 1/n of the enrolled variation (a fifth at 5); and a new
# good part scores above the highest of n good parts with probability 1/(n + 1) (a sixth at 5). Below 5 the
# threshold would be a guess, so the previous policy stays and the command says so.
MIN_CALIBRATION_PARTS = 5


def enrolled_parts(target: TargetMemory) -> list[str]:
    """The enrolled good parts that are image files (not arrays), once each, in enrollment order."""
    return list(dict.fromkeys(s.name for s in target.sources
                              if s.label == "normal" and not s.augment and Path(s.name).is_file()))


def _same_file(a: str, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def enrolled_as(target: TargetMemory, image: str | os.PathLike) -> list[str]:
    """The names under which ``image`` (a file) was enrolled, if it was."""
    names = {s.name for s in target.sources}
    return [name for name in names if _same_file(name, image)]
