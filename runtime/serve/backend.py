"""What mrad-serve's front (REST and gRPC) asks of whatever scores: a Ray Serve application or this process.

Both backends answer :class:`Scored` per image; the front turns those into
the protocol's answers and today's records, so neither knows HTTP or gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence


from ..core.preprocess import ImageLike
from ..core.result import Result
from .protocol import Model


@dataclass(frozen=True)
class Scored:
    """One image's result, its map kept only when asked for (its statistics always), and how it was scored."""

    result: Result  # anomaly_map is None unless the map was asked for
    map_size: tuple[int, int]  # (height, width)
    map_max: float
    map_mean: float
    batch_size: int  # images in the encoder call that scored it
    latency_ms: float  # from decoding to the result
    node: str  # where: the Ray node's id, or "local"
    pid: int


def scored(result: Result, want_map: bool, batch_size: int, latency_ms: float, node: str, pid: int) -> Scored:
    found = result.anomaly_map
    return Scored(result if want_map else replace(result, anomaly_map=None), tuple(found.shape),
                  float(found.max()), float(found.mean()), batch_size, latency_ms, node, pid)


class Backend(Protocol):
    """The scoring side of mrad-serve."""

    model: Model

    async def score(self, images: Sequence[ImageLike], want_map: bool = False) -> list[Scored]:
        """Score the images (each in the batches being formed); an image that cannot be decoded raises ImageError
        (naming it by position when there are several)."""

    async def readiness(self) -> dict:
        """What serves, for anyone who asks: nothing that reveals paths or secrets."""

    async def stats(self) -> dict:
        """The batches formed so far."""

    def close(self) -> None:
        """Let go of what scoring holds (threads)."""


def public_readiness(model: Model, bundle_digest: str, threshold: float | None, stale: bool,
                     enrollment: int | None, providers: list[str]) -> dict:
    """/readyz: what serves, by digest and name; no path (the bundle's, the calibration's) and no secret."""
    return {"ready": True, "model": model.name, "recipe": model.recipe, "bundle": bundle_digest,
            "threshold": threshold, "threshold_stale": stale, "enrollment": enrollment, "providers": providers}
