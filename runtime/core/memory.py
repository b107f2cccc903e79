"""Memories: labelled keys, retrieval over them, new entries, and saving (spec sections 3 and 4).

Everything that reads or writes a memory goes through :class:`Memory`, the
export stage included, so the project has one index writer.

Retrieval modes: ``exact`` is the spec, a softmax over every entry, and
needs only NumPy (keys are stored beside the index). ``hnsw`` asks an hnswlib
index for the ``top_k`` most similar entries and takes the softmax over those
alone, a different estimator; hnswlib is an optional extra because it ships
no wheels and builds from source.

How an image becomes entries (spec section 3) is written once here, for the
export stage and for the runtime alike: an entry's key is the normalised
vector it comes from, passed through MRAD-FT's learned key layer when the
memory has one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import defaults
from .bundle import BundleFiles, HnswParams, KeyProjection, MemorySpec, files_of
from ..errors import BundleError, MradError
from ..files import atomic_file, replace_with, save_array
from .maps import bilinear_matrix

NORMAL, ANOMALOUS = 0, 1
HNSW_INSTALL = "pip install 'mrad-edge[hnsw]' (hnswlib builds from source: it needs a C++ compiler)"
# Rows of queries scored at once in exact mode: bounds the (rows x entries)
# similarity block to a few hundred MB for memories of ~10^4 entries.
_EXACT_CHUNK_ROWS = 4096


# Keys without a learned projection are normalised vectors; projected keys stay far below this norm,
# which keeps every similarity, and so the softmax, finite in float32.
UNIT_TOLERANCE = 1e-3
MAX_KEY_NORM = 1e6


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis, as torch.nn.functional.normalize (eps 1e-12)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def patch_groups(mask: np.ndarray, grid: int) -> np.ndarray:
    """(S, S) boolean mask -> (G*G,) patch labels: 1 anomalous, 0 normal, -1 boundary.

    The mask is resized to the grid bilinearly (align_corners=False); only
    patches resized to exactly 1 or exactly 0 belong to a group. With S a
    multiple of G the resize averages the 2 x 2 pixels around each patch
    centre with weights of 1/4, so the values are exact.
    """
    rows = bilinear_matrix(grid, mask.shape[0])
    cols = bilinear_matrix(grid, mask.shape[1])
    small = (rows @ mask.astype(np.float64) @ cols.T).ravel()
    groups = np.full(small.shape, -1, dtype=np.int8)
    groups[small == 1] = ANOMALOUS
    groups[small == 0] = NORMAL
    return groups


def entry_vectors(kind: str, feature: np.ndarray, label: int, groups: np.ndarray | None
                  ) -> tuple[np.ndarray, list[int]]:
    """One image's entry vectors (before normalisation) and their labels.

    ``image``: the image feature, labelled ``label``. ``pixel``: the mean of
    the anomalous patches, then of the normal ones (the reference's order),
    each when the group is not empty; ``groups`` from :func:`patch_groups`,
    or ``None`` when no mask is known (no pixel entry then).
    """
    if kind == "image":
        return feature[None].astype(np.float32), [label]
    if groups is None:
        return np.zeros((0, feature.shape[-1]), np.float32), []
    vectors, labels = [], []
    for group in (ANOMALOUS, NORMAL):
        chosen = feature[groups == group]
        if len(chosen):
            vectors.append(chosen.mean(axis=0))
            labels.append(group)
    return np.asarray(vectors, np.float32).reshape(-1, feature.shape[-1]), labels


def hnswlib_module():
    try:
        import hnswlib
    except ModuleNotFoundError as exc:
        raise MradError(f"hnsw retrieval and index files need hnswlib, which is not installed: {HNSW_INSTALL}") from exc
    return hnswlib


@dataclass(frozen=True)
class _State:
    """What one query reads: swapped whole when entries are added, so readers never see half an addition."""

    keys: np.ndarray  # (n, dim) float32
    labels: np.ndarray  # (n,) float32, 0 or 1
    provenance: tuple[dict, ...]


class Memory:
    """One memory: keys, labels and provenance, searched exactly or through an hnswlib index.

    ``kind``, ``query`` and ``feature`` mean what they mean in
    :class:`~mrad.runtime.core.bundle.MemorySpec`; ``projection`` is MRAD-FT's key
    layer as ``(weight, bias)`` arrays, or ``None``.
    """

    def __init__(self, kind: str, query: str, feature: str | None, dim: int,
                 projection: tuple[np.ndarray, np.ndarray] | None = None, hnsw: HnswParams = HnswParams()):
        self.kind, self.query, self.feature, self.dim = kind, query, feature, dim
        self.projection, self.hnsw = projection, hnsw
        self._state = _State(np.zeros((0, dim), np.float32), np.zeros(0, np.float32), ())
        self._index = None  # hnswlib.Index over the current keys, built or loaded when first needed
        self._index_file: Path | None = None  # an index file holding exactly the current keys
        self._lock = threading.Lock()  # writers, and hnsw readers (the index changes in place)

    # -- reading --------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: "Path | BundleFiles", spec: MemorySpec) -> "Memory":
        """Open a memory of a bundle; every array is checked against the manifest.

        ``directory``: the bundle's folder, or its :class:`~mrad.runtime.core.bundle.BundleFiles`; with digests,
        every array is loaded from the bytes whose sha256 was checked, and the hnsw index at once from its checked
        bytes (when hnswlib is installed) rather than from its file at the first hnsw query.
        """
        directory = files_of(directory)
        if spec.space != "ip":
            raise BundleError(f"bundle is corrupt: memory uses space {spec.space!r}; this runtime reads 'ip'")
        projection = None
        if spec.key_projection:
            weight = _load_array(directory, spec.key_projection.weight, np.float32, 2)
            bias = _load_array(directory, spec.key_projection.bias, np.float32, 1)
            if weight.shape[0] != spec.dim or bias.shape != (spec.dim,):
                raise BundleError(f"bundle is corrupt: key projection {spec.key_projection.weight} does not map "
                                  f"to the memory's {spec.dim} dimensions")
            projection = (weight, bias)
        memory = cls(spec.kind, spec.query, spec.feature, spec.dim, projection, spec.hnsw)
        labels = _load_array(directory, spec.labels, None, 1)
        if labels.shape != (spec.count,) or not np.isin(labels, (NORMAL, ANOMALOUS)).all():
            raise BundleError(f"bundle is corrupt: {spec.labels} must hold {spec.count} labels of 0 or 1")
        if spec.keys:
            keys = _load_array(directory, spec.keys, np.float32, 2)
        elif spec.index:  # format 1: keys live only in the index, which is then kept for hnsw queries
            memory._index = memory._load_checked_index(directory, spec.index, spec.count)
            memory._index.set_ef(max(spec.hnsw.ef_search, 1))
            keys = memory._index.get_items(np.arange(spec.count), return_type="numpy").astype(np.float32)
        else:
            raise BundleError("bundle is corrupt: a memory has neither keys nor an index")
        if keys.shape != (spec.count, spec.dim) or not np.isfinite(keys).all():
            raise BundleError(f"bundle is corrupt: keys of {spec.keys or spec.index} must be {spec.count} x {spec.dim} "
                              "finite numbers")
        norms = np.linalg.norm(keys, axis=1)
        if projection is None and not np.allclose(norms, 1.0, atol=UNIT_TOLERANCE):
            raise BundleError(f"bundle is corrupt: keys of {spec.keys or spec.index} must be unit vectors "
                              f"(norms {norms.min():.4g} to {norms.max():.4g})")
        if norms.max() > MAX_KEY_NORM:
            raise BundleError(f"bundle is corrupt: keys of {spec.keys or spec.index} reach a norm of {norms.max():.3g}, "
                              "more than similarities can hold")
        provenance = _read_provenance(directory, spec.provenance, spec.count) if spec.provenance else ({},) * spec.count
        memory._state = _State(np.ascontiguousarray(keys), labels.astype(np.float32), provenance)
        if spec.index and not directory.checked:
            memory._index_file = directory.path(spec.index)
        elif spec.index and memory._index is None and hnswlib_installed():  # now, from the checked bytes
            memory._index = memory._load_checked_index(directory, spec.index, spec.count)
            memory._index.set_ef(max(spec.hnsw.ef_search, 1))
        return memory

    @property
    def keys(self) -> np.ndarray:
        return self._state.keys

    @property
    def labels(self) -> np.ndarray:
        return self._state.labels

    @property
    def provenance(self) -> tuple[dict, ...]:
        return self._state.provenance

    @property
    def count(self) -> int:
        return len(self._state.labels)

    @property
    def can_grow(self) -> bool:
        return self.feature is not None

    def anomalous_probability(self, queries: np.ndarray, mode: str, top_k: int) -> np.ndarray:
        """(n, dim) queries -> (n,) softmax-weighted share of anomalous entries."""
        state = self._state
        if mode == "exact" or (mode == "hnsw" and top_k >= len(state.labels)):
            # top_k covering the memory is the same estimator, and hnswlib cannot always return every entry
            return _exact(queries, state)
        if mode != "hnsw":
            raise MradError(f"unknown retrieval {mode!r}; choose one of {', '.join(defaults.RETRIEVAL_MODES)}")
        with self._lock:
            index = self._ensure_index()
            labels = self._state.labels
            try:
                ids, distances = index.knn_query(queries, k=top_k)
            except RuntimeError as exc:
                raise MradError(f"hnsw retrieval of {top_k} entries from {len(labels)} failed ({exc}); "
                                "lower top_k or raise ef_search") from exc
        # hnswlib's "ip" distance is 1 - <q, key>.
        return _softmax_readout(1.0 - distances, labels[ids])

    def strongest(self, query: np.ndarray, count: int) -> list[tuple[int, float]]:
        """The ``count`` entries of largest softmax weight for one query (exact), as (row, weight) pairs."""
        sims = self._state.keys @ query
        weights = np.exp(sims - sims.max())
        weights /= weights.sum()
        rows = np.argsort(-weights, kind="stable")[:count]
        return [(int(r), float(weights[r])) for r in rows]

    # -- growing --------------------------------------------------------------------------------

    def keys_of(self, vectors: np.ndarray) -> np.ndarray:
        """Entry vectors -> keys: normalised, then through the learned key layer when there is one."""
        keys = normalize(np.asarray(vectors, np.float32))
        if self.projection is not None:
            weight, bias = self.projection
            keys = (keys @ weight.T + bias).astype(np.float32)
        return keys

    def add(self, vectors: np.ndarray, labels: Sequence[int], provenance: Sequence[dict] | None = None) -> None:
        """Add entries made from ``vectors`` (see :func:`entry_vectors`); queries see all of them or none."""
        keys = self.keys_of(vectors)
        labels = np.asarray(labels, np.float32)
        provenance = tuple(provenance) if provenance is not None else ({},) * len(labels)
        if keys.shape[1:] != (self.dim,) or len(labels) != len(keys) or len(provenance) != len(keys):
            raise MradError(f"entries must be (n, {self.dim}) keys with n labels and n provenance records")
        if not np.isin(labels, (NORMAL, ANOMALOUS)).all():
            raise MradError("entry labels must be 0 (normal) or 1 (anomalous)")
        with self._lock:
            state = self._state
            start = len(state.labels)
            if self._index is not None and len(keys):
                self._index.resize_index(start + len(keys))
                self._index.add_items(keys, np.arange(start, start + len(keys)), num_threads=1)
            self._state = _State(np.concatenate([state.keys, keys]), np.concatenate([state.labels, labels]),
                                 state.provenance + provenance)
            self._index_file = None

    def save(self, directory: Path, name: str) -> MemorySpec:
        """Write the memory's files into ``directory`` as ``memory_<name>_*``, each atomically.

        The hnswlib index is written when hnswlib is installed; without it the
        memory is still complete for exact retrieval.
        """
        directory = Path(directory)
        state = self._state
        prefix = f"memory_{name}"
        files = {"keys": f"{prefix}_keys.npy", "labels": f"{prefix}_labels.npy",
                 "provenance": f"{prefix}_provenance.jsonl"}
        save_array(directory / files["keys"], state.keys)
        save_array(directory / files["labels"], state.labels.astype(np.uint8))
        with atomic_file(directory / files["provenance"]) as f:
            f.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in state.provenance).encode())
        projection = None
        if self.projection is not None:
            projection = KeyProjection(weight=f"{prefix}_key_weight.npy", bias=f"{prefix}_key_bias.npy")
            save_array(directory / projection.weight, self.projection[0])
            save_array(directory / projection.bias, self.projection[1])
        index = None
        if hnswlib_installed():
            index = f"{prefix}.hnsw"
            with self._lock:
                built = self._ensure_index()
                replace_with(directory / index, lambda path: built.save_index(str(path)))
        return MemorySpec(kind=self.kind, query=self.query, feature=self.feature, dim=self.dim,
                          count=len(state.labels), index=index, space="ip", hnsw=self.hnsw,
                          key_projection=projection, **files)

    # -- the index ------------------------------------------------------------------------------

    def _ensure_index(self):
        """The index over the current keys (call with the lock held)."""
        if self._index is None:
            count = len(self._state.labels)
            if self._index_file is not None:
                self._index = self._load_index(self._index_file, count)
            else:
                self._index = self._build_index(self._state.keys)
            self._index.set_ef(max(self.hnsw.ef_search, 1))
        return self._index

    def _build_index(self, keys: np.ndarray):
        index = hnswlib_module().Index(space="ip", dim=self.dim)
        index.init_index(max_elements=max(len(keys), 1), M=self.hnsw.M, ef_construction=self.hnsw.ef_construction,
                         random_seed=defaults.HNSW_SEED)
        if len(keys):
            # One thread: the graph, and so the hnsw retrieval, is then the same on every build.
            index.add_items(keys, np.arange(len(keys)), num_threads=1)
        return index

    def _load_checked_index(self, files: BundleFiles, name: str, count: int):
        """An index file loaded by hnswlib, which reads only by name: checked bytes go through a folder of this
        process's own (mode 0700), so that what is loaded is what was checked."""
        if not files.checked:
            return self._load_index(files.path(name), count)
        private = Path(tempfile.mkdtemp(prefix="mrad-checked-"))
        try:
            (private / "index.hnsw").write_bytes(files.read(name))
            return self._load_index(private / "index.hnsw", count)
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _load_index(self, path: Path, count: int):
        index = hnswlib_module().Index(space="ip", dim=self.dim)
        try:
            index.load_index(str(path), max_elements=count)
        except RuntimeError as exc:
            raise BundleError(f"bundle is corrupt: index {path.name} could not be loaded ({exc})") from exc
        if index.get_current_count() != count:
            raise BundleError(f"bundle is corrupt: index {path.name} holds {index.get_current_count()} entries, "
                              f"the manifest says {count}")
        return index


def _exact(queries: np.ndarray, state: _State) -> np.ndarray:
    out = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), _EXACT_CHUNK_ROWS):
        sims = queries[start : start + _EXACT_CHUNK_ROWS] @ state.keys.T
        out[start : start + len(sims)] = _softmax_readout(sims, state.labels)
    return out


def _softmax_readout(sims: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Row-wise softmax of similarities, dotted with the labels (per row or shared)."""
    weights = np.exp(sims - sims.max(axis=-1, keepdims=True))
    if labels.ndim == 1:
        return (weights @ labels) / weights.sum(axis=-1)
    return (weights * labels).sum(axis=-1) / weights.sum(axis=-1)


def hnswlib_installed() -> bool:
    try:
        hnswlib_module()
    except MradError:
        return False
    return True


def _load_array(files: BundleFiles, name: str, dtype, ndim: int) -> np.ndarray:
    array = files.array(name)
    if array.ndim != ndim or (dtype is not None and array.dtype != dtype):
        raise BundleError(f"bundle is corrupt: {name} holds a {array.dtype} array of shape {array.shape}")
    return array


def _read_provenance(files: BundleFiles, name: str, count: int) -> tuple[dict, ...]:
    try:
        rows = tuple(json.loads(line) for line in files.text(name).splitlines() if line.strip())
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle is corrupt: {name} is not JSON lines ({exc})") from exc
    if len(rows) != count or not all(isinstance(r, dict) for r in rows):
        raise BundleError(f"bundle is corrupt: {name} must hold {count} JSON objects, one per entry")
    return rows
