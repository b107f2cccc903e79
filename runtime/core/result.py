"""What scoring one image gives back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..memories.objects import FoundObject


@dataclass(frozen=True)
class Result:
    """One image's verdict material.

    ``score`` is the spec's image score; ``anomaly_map`` is float32 at the
    input image's height and width (or the size asked for); ``image_probability``
    is the image-level retrieval (``p_img``, fused with the enrolled image
    memory when there is one), kept for inspection. ``evidence`` (when asked
    for) names the memory entries that weighed most (see
    :meth:`~mrad.runtime.core.detector.Detector.evidence`). With a per-part
    memory enrolled, ``objects`` lists the parts found (box in the image's
    pixels, x0, y0, x1, y1, and score), and ``object_count_ok`` says whether
    their number lies within the enrolled normal counts (False: a part is
    missing or extra, a defect whatever the score); both are None without one.

    Scored by a :class:`~mrad.runtime.line.station.Station`, a result also
    names its ``recipe``, its ``decision`` by that recipe's policy
    ("anomalous", "normal", or None without a threshold) and ``scored_by``:
    what judged it (bundle digest, enrollment version, calibration id,
    threshold, and ``threshold_stale`` when the threshold was measured with
    another enrollment).
    """

    score: float
    anomaly_map: np.ndarray
    image_probability: float
    evidence: dict | None = None
    objects: tuple[FoundObject, ...] | None = None
    object_count_ok: bool | None = None
    recipe: str | None = None
    decision: str | None = None
    scored_by: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary; the map itself is left out (save it with :func:`~mrad.runtime.core.overlay`)."""
        summary = {
            "score": self.score,
            "image_probability": self.image_probability,
            "map_size": list(self.anomaly_map.shape),
            "map_max": float(self.anomaly_map.max()),
        }
        if self.evidence is not None:
            summary["evidence"] = self.evidence
        if self.objects is not None:
            summary.update(objects=[o.to_dict() for o in self.objects], object_count_ok=self.object_count_ok)
        if self.recipe is not None:
            summary.update(recipe=self.recipe, decision=self.decision, scored_by=self.scored_by)
        return summary
