"""Retrieval read-out on cases small enough to check by hand, and hnsw against exact."""

import math

import numpy as np
import pytest

from mrad.export.package import write_memory_level
from mrad.runtime.retrieval import Memory


def open_level(tmp_path, keys, labels):
    level = write_memory_level(tmp_path, "test", np.asarray(keys, np.float32), np.asarray(labels))
    return Memory(tmp_path, level, ef_search=64)


def test_exact_softmax_by_hand(tmp_path):
    memory = open_level(tmp_path, [[1, 0], [0, 1], [-1, 0]], [1, 0, 0])
    p = memory.anomalous_probability(np.array([[1.0, 0.0]], np.float32), "exact", top_k=3)
    e = math.e
    assert p[0] == pytest.approx(e / (e + 1 + 1 / e), abs=1e-6)


@pytest.fixture
def random_memory(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 16)).astype(np.float32)
    labels = rng.integers(0, 2, size=200)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    return open_level(tmp_path, keys, labels), keys, labels.astype(np.float32), queries


def test_hnsw_is_the_softmax_over_the_true_top_k(random_memory):
    """With a search breadth far above k the index finds the true neighbours (unnormalised keys, as in FT)."""
    memory, keys, labels, queries = random_memory
    memory.index.set_ef(200)
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


def test_keys_round_trip_through_the_index(tmp_path):
    keys = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    memory = open_level(tmp_path, keys, np.zeros(30, dtype=np.uint8))
    np.testing.assert_array_equal(memory.keys, keys)
