"""Retrieval over one memory level (spec section 4, value read-out).

``exact`` is the spec: a softmax over every memory entry. ``hnsw`` asks the
index for the ``top_k`` most similar entries and takes the softmax over those
alone, a different estimator that trades fidelity for speed on large memories.
"""

from __future__ import annotations

from pathlib import Path

import hnswlib
import numpy as np

from .bundle import MemoryLevel
from .errors import BundleError, MradError

# Rows of queries scored at once in exact mode: bounds the (rows x entries)
# similarity block to a few hundred MB for memories of ~10^4 entries.
_EXACT_CHUNK_ROWS = 4096


class Memory:
    """One memory level opened from a bundle: keys in an hnswlib index, labels beside it."""

    def __init__(self, directory: Path, level: MemoryLevel, ef_search: int):
        self.level = level
        if level.space != "ip":
            raise BundleError(f"bundle is corrupt: {level.index} uses space {level.space!r}; this runtime reads 'ip'")
        self.index = hnswlib.Index(space=level.space, dim=level.dim)
        try:
            self.index.load_index(str(directory / level.index), max_elements=level.count)
        except RuntimeError as exc:
            raise BundleError(f"bundle is corrupt: index {level.index} could not be loaded ({exc})") from exc
        if self.index.get_current_count() != level.count:
            raise BundleError(
                f"bundle is corrupt: index {level.index} holds {self.index.get_current_count()} entries, "
                f"the manifest says {level.count}"
            )
        self.index.set_ef(max(ef_search, 1))
        try:
            labels = np.load(directory / level.labels, allow_pickle=False)
        except ValueError as exc:  # object arrays (pickles) and malformed headers
            raise BundleError(f"bundle is corrupt: {level.labels} is not a plain label array ({exc})") from exc
        if labels.shape != (level.count,) or not np.isin(labels, (0, 1)).all():
            raise BundleError(f"bundle is corrupt: {level.labels} must hold {level.count} labels of 0 or 1")
        self.labels = labels.astype(np.float32)
        self._keys: np.ndarray | None = None

    @property
    def keys(self) -> np.ndarray:
        """(count, dim) float32 keys, read out of the index once, on first use."""
        if self._keys is None:
            ids = np.arange(self.level.count)
            self._keys = np.ascontiguousarray(self.index.get_items(ids, return_type="numpy"), dtype=np.float32)
        return self._keys

    def anomalous_probability(self, queries: np.ndarray, mode: str, top_k: int) -> np.ndarray:
        """(n, dim) queries -> (n,) softmax-weighted share of anomalous entries."""
        if mode == "exact":
            return self._exact(queries)
        if mode == "hnsw":
            return self._top_k(queries, top_k)
        raise ValueError(f"unknown retrieval mode {mode!r}")

    def _exact(self, queries: np.ndarray) -> np.ndarray:
        keys = self.keys
        out = np.empty(len(queries), dtype=np.float32)
        for start in range(0, len(queries), _EXACT_CHUNK_ROWS):
            sims = queries[start : start + _EXACT_CHUNK_ROWS] @ keys.T
            out[start : start + len(sims)] = _softmax_readout(sims, self.labels)
        return out

    def _top_k(self, queries: np.ndarray, top_k: int) -> np.ndarray:
        if top_k >= self.level.count:
            return self._exact(queries)  # the same estimator, and hnswlib cannot always return every entry
        try:
            ids, distances = self.index.knn_query(queries, k=top_k)
        except RuntimeError as exc:
            raise MradError(
                f"hnsw retrieval of {top_k} entries from {self.level.count} failed ({exc}); "
                "lower top_k or raise ef_search"
            ) from exc
        # hnswlib's "ip" distance is 1 - <q, key>.
        sims = 1.0 - distances
        return _softmax_readout(sims, self.labels[ids])


def _softmax_readout(sims: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Row-wise softmax of similarities, dotted with the labels (per row or shared)."""
    weights = np.exp(sims - sims.max(axis=-1, keepdims=True))
    if labels.ndim == 1:
        return (weights @ labels) / weights.sum(axis=-1)
    return (weights * labels).sum(axis=-1) / weights.sum(axis=-1)
