"""Held-out trials: score an enrolled image against the line's memory without its own entries.

A good part scored against a memory that holds it finds itself and scores
near nothing, so a threshold measured that way sits too low (the line then
flags good parts). Every threshold measured on enrolled parts (mrad-enroll,
mrad-calibrate, the operator's page) scores each of them with its entries,
augmented copies included, left out.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.preprocess import ImageLike
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


def held_out_scores(detector, trials: Sequence[tuple[ImageLike, Sequence[str]]]) -> list[float]:
    """Each image scored against the live enrollment without the entries of the sources named beside it."""
    live = detector.target_memory
    sources, levels = live.snapshot()
    largest = max((len(keys) for keys, _ in levels.values()), default=0)
    settings = dataclasses.replace(live.settings, exact_below=largest + 1)  # exact search: no index built per trial
    scores = []
    for image, names in trials:
        own = np.flatnonzero([source.name in names for source in sources])
        if not len(own):
            scores.append(detector.predict(image).score)
            continue
        kept = {}
        for name, (keys, owners) in levels.items():
            others = ~np.isin(owners, own)
            kept[name] = (keys[others], owners[others])
        trial = TargetMemory.restored(settings, live.grid, live.image_dim, live.token_dim, sources, kept)
        scores.append(detector.predict_batch([image], target=trial)[0].score)
    return scores
