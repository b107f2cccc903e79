"""mrad-serve --local: one process scores, no Ray: a station's recipe (or a bundle) behind the same front.

    >>> scorer = LocalScorer(station, "mrad", max_batch_size=8, batch_wait_ms=10)
    >>> [s.result.score for s in await scorer.score([png_bytes, frame])]     # on the front's event loop
    [0.41, 0.87]

Requests are batched as the Ray application batches them: decoding runs per
image in a small pool of threads (a bad image fails its own request, never a
batch); the first image staged waits at most ``batch_wait_ms`` for others,
and up to ``max_batch_size`` of them go through one ``predict_batch`` call,
on one thread, so the encoder runs one batch at a time while the next forms.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from ..core.preprocess import ImageLike
from ..errors import ImageError
from ..line.station import Staged, Station
from .backend import Scored, public_readiness, scored
from .protocol import Model

# Images decoded at once: each may hold up to --max-pixels of RGB (75 MB at 25 MP) while it is made ready.
DECODE_THREADS = min(4, os.cpu_count() or 1)


class Batcher:
    """Items submitted on one event loop, run ``max_size`` at a time by ``run`` on a thread of its own.

    The first item of a batch waits at most ``wait_s`` for more; items that arrive while a batch runs form the
    next one. ``run(items)`` answers one result per item, in order; what it raises fails that batch's items.
    """

    def __init__(self, run: Callable[[list], list], max_size: int, wait_s: float):
        self._run, self._max, self._wait = run, max_size, wait_s
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mrad-batch")
        self._pending: list[tuple[object, asyncio.Future, float]] = []  # item, its caller's future, when it came
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.sizes: Counter[int] = Counter()

    async def submit(self, item) -> tuple[object, int]:
        """``item``'s result and the size of the batch that made it."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._batches())
        future = loop.create_future()
        self._pending.append((item, future, loop.time()))
        self._arrived.set()
        return await future

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._pending and len(self._pending) < self._max:
                left = self._pending[0][2] + self._wait - loop.time()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
                self._arrived.clear()
            batch = [(item, future) for item, future, _ in self._pending[:self._max] if not future.done()]
            self._pending = self._pending[self._max:]
            if self._pending:
                self._arrived.set()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._thread, self._run, [item for item, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - the batch's callers get it, each in their own request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.sizes[len(batch)] += 1
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result((result, len(batch)))

    def close(self) -> None:
        """Let the thread go; the batch loop ends with its event loop (the front cancels what is left there)."""
        self._thread.shutdown(wait=False, cancel_futures=True)


class LocalScorer:
    """A station's active recipe scored in this process (see the module's examples); the front's backend."""

    def __init__(self, station: Station, name: str, max_batch_size: int = 8, batch_wait_ms: float = 10.0):
        self.station = station
        self.model = Model(name, station.active)
        self._decode = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="mrad-decode")
        self._batcher = Batcher(station.predict_batch, max_batch_size, batch_wait_ms / 1000)

    async def score(self, images: Sequence[ImageLike], want_map: bool = False) -> list[Scored]:
        return list(await asyncio.gather(*(self._one(image, n, len(images), want_map)
                                           for n, image in enumerate(images))))

    async def _one(self, image: ImageLike, n: int, count: int, want_map: bool) -> Scored:
        start = time.perf_counter()
        try:
            staged: Staged = await asyncio.get_running_loop().run_in_executor(self._decode, self.station.prepare,
                                                                                image)
        except ImageError as exc:
            raise ImageError(f"image {n + 1} of {count}: {exc}" if count > 1 else str(exc)) from None
        result, batch_size = await self._batcher.submit(staged)
        return scored(result, want_map, batch_size, (time.perf_counter() - start) * 1000, "local", os.getpid())

    async def readiness(self) -> dict:
        recipe = self.station.recipe()
        return public_readiness(self.model, recipe.bundle_digest, recipe.policy.threshold, recipe.threshold_stale,
                                recipe.detector.enrollment_version, recipe.detector.providers)

    async def stats(self) -> dict:
        sizes = self._batcher.sizes
        return {"node": "local", "pid": os.getpid(), "scored": sum(size * n for size, n in sizes.items()),
                "batch_sizes": {str(size): n for size, n in sorted(sizes.items())}}

    def close(self) -> None:
        self._batcher.close()
        self._decode.shutdown(wait=False, cancel_futures=True)

