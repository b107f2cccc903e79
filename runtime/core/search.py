"""Nearest-neighbour search over unit vectors, pooling at several scales, and greedy coreset subsampling.

These are the pieces of the line's own memories (:mod:`mrad.runtime.memories.enrollment`):

- :func:`pool_patches` averages patch tokens over k x k neighbourhoods (zero
  padding counted, as spec section 2.7 pools them), one scale at a time;
- :class:`Nearest` holds unit-norm keys and answers, per query, the most
  similar key: by exact search (a matrix product) while the keys are few,
  through an hnswlib index once they reach ``exact_below`` and hnswlib is
  installed;
- :func:`greedy_coreset` picks a subset that covers the whole set (PatchCore's
  greedy k-center selection on a random projection), so that a memory keeps a
  cap; :func:`novel_swaps` keeps a full memory at its cap as new entries
  arrive, each swap an in-place update instead of a new selection.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import defaults
from .bundle import HnswParams
from ..errors import MradError

# Rows of queries searched at once in exact mode: bounds the (rows x keys) similarity block.
_EXACT_CHUNK_ROWS = 2048
CORESET_PROJECTION_DIM = 128


def box_matrix(grid: int, kernel: int) -> np.ndarray:
    """(grid, grid) matrix of a 1-D average over ``kernel`` neighbours, zero padding counted."""
    offsets = np.abs(np.arange(grid)[:, None] - np.arange(grid)[None, :])
    return (offsets <= kernel // 2).astype(np.float32) / kernel


def pool_patches(tokens: np.ndarray, grid: int, kernel: int) -> np.ndarray:
    """(n, G*G, W) patch tokens -> the same averaged over kernel x kernel neighbourhoods (stride 1)."""
    if kernel == 1:
        return tokens.astype(np.float32, copy=False)
    n, _, width = tokens.shape
    box = box_matrix(grid, kernel)
    maps = tokens.reshape(n, grid, grid, width).astype(np.float32, copy=False)
    rows = np.einsum("ai,nijw->najw", box, maps, optimize=True)
    return np.einsum("bj,najw->nabw", box, rows, optimize=True).reshape(n, grid * grid, width)


def hnswlib_or_none():
    try:
        import hnswlib
    except ModuleNotFoundError:
        return None
    return hnswlib


class Nearest:
    """Unit-norm keys; per query the largest inner product with any key, and that key's row.

    Appending is cheap: exact search needs nothing rebuilt, an existing index
    takes the new keys in place. Readers see all of an append or none of it.
    """

    def __init__(self, dim: int, exact_below: int = defaults.ENROLL_EXACT_BELOW, hnsw: HnswParams = HnswParams()):
        self.dim, self.exact_below, self.hnsw = dim, exact_below, hnsw
        self._keys = np.zeros((0, dim), np.float32)
        self._index = None
        self._lock = threading.Lock()

    @property
    def keys(self) -> np.ndarray:
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def uses_index(self) -> bool:
        """Whether queries go through hnswlib (enough keys, and hnswlib installed)."""
        return len(self._keys) >= self.exact_below and hnswlib_or_none() is not None

    def add(self, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise MradError(f"keys must be (n, {self.dim}), got {keys.shape}")
        with self._lock:
            start = len(self._keys)
            if self._index is not None and len(keys):
                self._index.resize_index(start + len(keys))
                self._index.add_items(keys, np.arange(start, start + len(keys)), num_threads=1)
            self._keys = np.concatenate([self._keys, keys])

    def replace_rows(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Put ``keys`` in place of the entries at ``rows``; an existing index updates those entries in place."""
        keys = np.ascontiguousarray(keys, np.float32)
        with self._lock:
            updated = self._keys.copy()
            updated[rows] = keys
            if self._index is not None and len(rows):
                self._index.add_items(keys, np.asarray(rows), num_threads=1)  # hnswlib updates existing labels
            self._keys = updated

    def radii(self) -> np.ndarray:
        """Per key, its distance (1 - inner product) to the nearest other key."""
        keys = self._keys
        if self.uses_index:
            with self._lock:
                if self._index is None:
                    self._index = self._build(keys)
                ids, distances = self._index.knn_query(keys, k=min(2, len(keys)))
            other = ids[:, 0] == np.arange(len(keys))
            return np.where(other, distances[:, -1], distances[:, 0]).astype(np.float32)
        radius = np.empty(len(keys), np.float32)
        for start in range(0, len(keys), _EXACT_CHUNK_ROWS):
            block = keys[start : start + _EXACT_CHUNK_ROWS] @ keys.T
            block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
            radius[start : start + len(block)] = 1.0 - block.max(axis=1)
        return radius

    def replace(self, keys: np.ndarray) -> None:
        """Swap in a new key set (after subsampling): the index is rebuilt when next needed."""
        keys = np.ascontiguousarray(keys, np.float32)
        with self._lock:
            self._keys, self._index = keys, None

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) unit queries -> (similarity, row) of the most similar key, each (n,)."""
        if not len(self._keys):
            raise MradError("nearest-neighbour search in an empty memory")
        if self.uses_index:
            return self._nearest_hnsw(queries)
        return nearest_exact(queries, self._keys)

    def _nearest_hnsw(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            if self._index is None:
                self._index = self._build(self._keys)
            ids, distances = self._index.knn_query(np.ascontiguousarray(queries, np.float32), k=1)
        return (1.0 - distances[:, 0]).astype(np.float32), ids[:, 0].astype(np.int64)  # "ip" distance is 1 - <q, k>

    def _build(self, keys: np.ndarray):
        index = hnswlib_or_none().Index(space="ip", dim=self.dim)
        index.init_index(max_elements=max(len(keys), 1), M=self.hnsw.M, ef_construction=self.hnsw.ef_construction,
                         random_seed=defaults.HNSW_SEED)
        index.add_items(keys, np.arange(len(keys)), num_threads=1)
        index.set_ef(max(self.hnsw.ef_search, 1))
        return index


def nearest_exact(queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    similarity = np.empty(len(queries), np.float32)
    rows = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), _EXACT_CHUNK_ROWS):
        block = queries[start : start + _EXACT_CHUNK_ROWS] @ keys.T
        best = block.argmax(axis=1)
        rows[start : start + len(block)] = best
        similarity[start : start + len(block)] = block[np.arange(len(block)), best]
    return similarity, rows


def novel_swaps(radius: np.ndarray, new: np.ndarray, novelty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which new entries take the places of which kept ones, in a memory that is full.

    ``radius``: each kept entry's distance to its nearest kept neighbour;
    ``new``: unit vectors of the candidates; ``novelty``: each candidate's
    distance to its nearest kept entry. Greedily, the most novel candidate
    replaces the most redundant kept entry as long as it is farther from
    everything kept than that entry is from its neighbour, which keeps the
    covering radius of k-center selection from growing; each accepted
    candidate then covers the candidates near it. Returns (kept rows
    replaced, candidate indices, the new entries' radii).
    """
    novelty = novelty.astype(np.float32).copy()
    rows, chosen, radii = [], [], []
    for row in np.argsort(radius, kind="stable"):
        best = int(np.argmax(novelty)) if len(novelty) else -1
        if best < 0 or novelty[best] <= radius[row]:
            break
        rows.append(int(row))
        chosen.append(best)
        radii.append(float(novelty[best]))
        np.minimum(novelty, 1.0 - new @ new[best], out=novelty)
        novelty[best] = -np.inf
    return np.asarray(rows, np.int64), np.asarray(chosen, np.int64), np.asarray(radii, np.float32)


def greedy_coreset(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Rows of a ``count``-subset of ``vectors`` chosen by greedy k-center selection (PatchCore).

    Each step takes the vector farthest from everything chosen so far, so the
    subset covers outliers first: a rare normal pattern is kept, a hundred
    copies of the same background are not. Distances are measured on a random
    projection to 128 dimensions, as PatchCore does, to keep the cost at
    count x n x 128. The result is sorted and deterministic for a seed.
    """
    n = len(vectors)
    if count >= n:
        return np.arange(n)
    if count < 1:
        raise MradError("a coreset needs at least one entry")
    rng = np.random.default_rng(seed)
    points = vectors.astype(np.float32)
    if points.shape[1] > CORESET_PROJECTION_DIM:
        projection = rng.standard_normal((points.shape[1], CORESET_PROJECTION_DIM)).astype(np.float32)
        points = points @ (projection / np.sqrt(CORESET_PROJECTION_DIM))
    squared = np.einsum("nd,nd->n", points, points)
    chosen = np.empty(count, np.int64)
    chosen[0] = rng.integers(n)
    closest = np.full(n, np.inf, np.float32)
    for step in range(count):
        if step:
            chosen[step] = int(closest.argmax())
        point = points[chosen[step]]
        distance = squared - 2.0 * (points @ point) + squared[chosen[step]]
        np.minimum(closest, distance, out=closest)
    return np.sort(chosen)
