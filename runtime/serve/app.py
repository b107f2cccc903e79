"""The Ray Serve deployment: one Detector per replica, requests batched into predict_batch calls.

Decoding happens per request, before batching, so a bad image fails its own
request (HTTP 400, the CLI's ImageError text) and never a batch or a replica.
The encoder runs in a thread so the replica keeps taking requests, which then
form the next batch. Requests reach the replicas through mrad-serve's front
(:mod:`.front`) by a handle (:class:`RayScorer`), or from Python by
``serve.get_app_handle(name)``; Serve's own HTTP proxy is not used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Sequence

import ray
from ray import serve

from ..core.preprocess import ImageLike
from ..core.result import Result
from ..errors import ImageError, MradError
from ..formats.station import RecipeConfig
from ..line.records import frame_record
from ..line.sources import Frame
from ..line.station import Recipe, Staged, Station
from . import APP_NAME
from .backend import Scored, public_readiness, scored
from .http import record
from .protocol import MAX_PIXELS, Model, ProtocolError

# Requests a replica holds at once, per slot of its batch: enough queued to fill the next batch
# while one runs.
ONGOING_PER_BATCH_SLOT = 2
# A replica that cannot open its bundle or calibration will not do better on a later try: fail the deployment soon.
CONSTRUCTOR_TRIES = 3


@serve.deployment(name="MradDetector")
class DetectorDeployment:
    """Python (a handle): ``predict(image_bytes)`` gives the record; mrad-serve's front calls ``score``."""

    def __init__(self, recipe: RecipeConfig, provider: str = "auto", max_batch_size: int = 8,
                 batch_wait_ms: float = 10.0, max_pixels: int = MAX_PIXELS):
        # one recipe of a station (its enrollment, policy, region, trusted keys), served as one model
        self.station = Station.of(Recipe.open(recipe, provider=provider, max_pixels=max_pixels,
                                              threshold_origin="--threshold"))
        self.detector = self.station.recipe().detector
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.requests = count()
        self.batch_sizes: Counter[int] = Counter()
        self.where = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    # -- Python ---------------------------------------------------------------------------------

    async def score(self, image: ImageLike, want_map: bool = False) -> Scored:
        """One image scored in the batches being formed (the front's call); a bad image raises ImageError."""
        result, batch_size, latency_ms = await self._scored(image)
        return scored(result, want_map, batch_size, latency_ms, self.where["node"], self.where["pid"])

    async def predict(self, image: bytes, source: str = "handle") -> dict:
        """mrad-run's record for one image file's bytes; a bad image raises ImageError."""
        return record(await self.score(image), next(self.requests), source)

    async def score_frame(self, frame: Frame) -> dict:
        """A camera reader's frame (mrad-serve --camera): its record, or the error that kept it from being scored."""
        if frame.error is not None:
            return frame_record(frame)
        try:
            result, _, latency_ms = await self._scored(frame.image)
        except ImageError as exc:
            return frame_record(replace(frame, error=str(exc)))
        return frame_record(frame, result, round(latency_ms, 3))

    async def readiness(self) -> dict:
        """The bundle this replica has loaded, its threshold and where that came from, its providers (for the
        driver: /readyz shows :func:`~.backend.public_readiness`)."""
        recipe = self.station.recipe()
        return {"ready": True, "bundle": str(self.detector.path), "bundle_digest": recipe.bundle_digest,
                "recipe": recipe.name, "threshold": recipe.policy.threshold,
                "threshold_origin": recipe.policy.origin, "threshold_stale": recipe.threshold_stale,
                "enrollment": self.detector.enrollment_version, "providers": self.detector.providers}

    async def stats(self) -> dict:
        """This replica's node, process, images scored and how many batches of each size it formed."""
        return {**self.where, "scored": sum(size * n for size, n in self.batch_sizes.items()),
                "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())}}

    # -- scoring --------------------------------------------------------------------------------

    async def _scored(self, image: ImageLike) -> tuple[Result, int, float]:
        start = time.perf_counter()
        prepared = await asyncio.to_thread(self.station.prepare, image)  # ImageError: this request alone
        result, batch_size = await self._score_batch(prepared)
        return result, batch_size, (time.perf_counter() - start) * 1000

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both set per deployment in __init__
    async def _score_batch(self, prepared: list[Staged]) -> list[tuple[Result, int]]:
        results = await asyncio.to_thread(self.station.predict_batch, prepared)
        self.batch_sizes[len(prepared)] += 1
        return [(result, len(prepared)) for result in results]


def application(recipe: RecipeConfig, *, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                autoscaling: dict | None = None, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
                num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0,
                max_replicas_per_node: int | None = None, **detector):
    """The bound application ``serve.run(..., name=name, route_prefix=route_prefix(name))`` deploys.

    ``autoscale``: (min, max) replicas by load instead of ``replicas``; ``autoscaling``: more of Ray Serve's
    autoscaling_config keys (target_ongoing_requests, upscale_delay_s, ...), Ray's defaults for those left out,
    except target_ongoing_requests: one batch per replica. ``detector``: DetectorDeployment's options.
    The recipe's files (bundle, enrollment, calibration, keys) must be readable at the same place on every
    node (one machine, or a shared folder).
    """
    options = {"ray_actor_options": {"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
               "max_ongoing_requests": ONGOING_PER_BATCH_SLOT * max_batch_size,
               "max_constructor_retry_count": CONSTRUCTOR_TRIES}
    if autoscale:
        options["autoscaling_config"] = {"target_ongoing_requests": max_batch_size, **(autoscaling or {}),
                                         "min_replicas": autoscale[0], "max_replicas": autoscale[1]}
    else:
        options["num_replicas"] = replicas
    if max_replicas_per_node:
        options["max_replicas_per_node"] = max_replicas_per_node
    recipe = replace(recipe, bundle=Path(recipe.bundle).resolve())
    return DetectorDeployment.options(**options).bind(recipe, max_batch_size=max_batch_size,
                                                      batch_wait_ms=batch_wait_ms, **detector)


class RayScorer:
    """The front's backend in the Ray mode: each image to the application by its handle, in the replicas' batches."""

    def __init__(self, handle, name: str, recipe: str):
        self.handle, self.model = handle, Model(name, recipe)

    async def score(self, images: Sequence[ImageLike], want_map: bool = False) -> list[Scored]:
        return list(await asyncio.gather(*(self._one(image, n, len(images), want_map)
                                           for n, image in enumerate(images))))

    async def _one(self, image: ImageLike, n: int, count: int, want_map: bool) -> Scored:
        try:
            return await self.handle.score.remote(image, want_map)
        except ray.exceptions.RayActorError:
            raise ProtocolError("the replica scoring this request was lost; send it again", 503) from None
        except Exception as exc:  # a replica's exception comes wrapped (RayTaskError): answer with the cause
            cause = getattr(exc, "cause", exc)
            if isinstance(cause, ImageError):
                raise ImageError(f"image {n + 1} of {count}: {cause}" if count > 1 else str(cause)) from None
            if isinstance(cause, MradError):
                raise MradError(str(cause)) from None
            logging.getLogger("mrad.serve").error("mrad-serve: a replica failed: %s", exc)
            raise MradError("a replica failed scoring this request: mrad-serve's log says more") from None

    async def readiness(self) -> dict:
        found = await self.handle.readiness.remote()
        return public_readiness(self.model, found["bundle_digest"], found["threshold"], found["threshold_stale"],
                                found["enrollment"], found["providers"])

    async def stats(self) -> dict:
        return await self.handle.stats.remote()

    def close(self) -> None:
        pass


__all__ = ["APP_NAME", "DetectorDeployment", "RayScorer", "application"]
