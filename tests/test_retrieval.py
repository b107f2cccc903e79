"""Retrieval read-out on cases small enough to check by hand, hnsw against exact, and memory I/O."""

import math

import numpy as np
import pytest

from mrad.runtime.core.bundle import HnswParams
from mrad.runtime.core.memory import Memory, patch_groups

KEY_TOLERANCE = 1e-6  # unit keys through normalisation and a float32 file


def new_memory(keys, labels, ef_search=64):
    keys = np.asarray(keys, np.float32)
    memory = Memory("pixel", "patch_query", "patch_feature", keys.shape[1], hnsw=HnswParams(ef_search=ef_search))
    memory.add(keys, labels)
    return memory


def test_exact_softmax_by_hand():
    memory = new_memory([[1, 0], [0, 1], [-1, 0]], [1, 0, 0])
    p = memory.anomalous_probability(np.array([[1.0, 0.0]], np.float32), "exact", top_k=3)
    e = math.e
    assert p[0] == pytest.approx(e / (e + 1 + 1 / e), abs=1e-6)


@pytest.fixture
def random_memory():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 16)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    labels = rng.integers(0, 2, size=200)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    return new_memory(keys, labels, ef_search=200), keys, labels.astype(np.float32), queries


def test_hnsw_is_the_softmax_over_the_true_top_k(random_memory):
    """With a search breadth far above k the index finds the true neighbours (unnormalised queries, as in FT)."""
    memory, keys, labels, queries = random_memory
    sims = queries @ keys.T
    top = np.argsort(-sims, axis=1)[:, :20]
    top_sims = np.take_along_axis(sims, top, axis=1)
    weights = np.exp(top_sims - top_sims.max(axis=1, keepdims=True))
    want = (weights * labels[top]).sum(axis=1) / weights.sum(axis=1)
    np.testing.assert_allclose(memory.anomalous_probability(queries, "hnsw", top_k=20), want, atol=1e-5)


def test_hnsw_with_every_entry_is_exact(random_memory):
    memory, _, _, queries = random_memory
    exact = memory.anomalous_probability(queries, "exact", top_k=0)
    np.testing.assert_allclose(memory.anomalous_probability(queries, "hnsw", top_k=500), exact, atol=1e-6)
    few = memory.anomalous_probability(queries, "hnsw", top_k=5)
    assert np.abs(few - exact).max() > 1e-3  # top-k is a different estimator, not a copy of exact


def test_save_and_open_round_trip(random_memory, tmp_path):
    memory, keys, labels, queries = random_memory
    provenance = [{"source": f"img{i}.png"} for i in range(len(labels))]
    memory = new_memory(keys, labels, ef_search=200)
    memory.add(keys[:0], [], [])  # nothing added is fine
    fresh = Memory("pixel", "patch_query", "patch_feature", 16, hnsw=HnswParams(ef_search=200))
    fresh.add(keys, labels, provenance)
    spec = fresh.save(tmp_path, "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(spec.files())
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    opened = Memory.open(tmp_path, spec)
    np.testing.assert_allclose(opened.keys, keys, atol=KEY_TOLERANCE)
    assert opened.provenance == tuple(provenance)
    for mode in ("exact", "hnsw"):
        np.testing.assert_allclose(opened.anomalous_probability(queries, mode, 20),
                                   fresh.anomalous_probability(queries, mode, 20), atol=1e-6)


def test_added_entries_are_found_at_once(random_memory):
    """Entries added to a memory whose index is already in use are searched by the next query."""
    memory, keys, labels, _ = random_memory
    memory.anomalous_probability(keys[:1], "hnsw", top_k=5)  # builds the index
    far = np.zeros((1, 16), np.float32)
    far[0, 0] = 1.0
    before = memory.anomalous_probability(far, "hnsw", top_k=1)
    label = 1.0 - before[0]
    memory.add(far, [int(label)])
    assert memory.count == 201
    assert memory.anomalous_probability(far, "hnsw", top_k=1)[0] == label
    assert memory.anomalous_probability(far, "exact", top_k=0)[0] != before[0]


def test_patch_groups_by_hand():
    mask = np.zeros((28, 28), dtype=bool)
    mask[:14, :14] = True  # exactly the top-left patch of a 2 x 2 grid
    # The resize reads the 2 x 2 pixels at each patch centre (here 20 and 21): half of them is neither group.
    mask[14:, 14:21] = True
    assert patch_groups(mask, 2).tolist() == [1, 0, 0, -1]
