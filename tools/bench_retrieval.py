"""Retrieval alone at a chosen memory size: exact softmax against hnsw top-k, on random unit keys.

Bundles built from the generated data hold tens of entries; this measures the
sizes real auxiliary sets give (VisA: about 2,200 image and 3,400 pixel
entries) without building such a bundle.

    python -m mrad.tools.bench_retrieval --entries 3400 --dim 1024 --queries 1369
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from mrad.runtime import defaults
from mrad.runtime.bundle import HnswParams
from mrad.runtime.cli import command
from mrad.runtime.memory import Memory


def _unit(rng, rows, dim):
    x = rng.normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@command("bench_retrieval")
@click.option("--entries", default=3400, show_default=True, help="Memory entries.")
@click.option("--dim", default=1024, show_default=True, help="Key size (W for the pixel level, D for the image level).")
@click.option("--queries", default=1369, show_default=True, help="Queries per image (G*G patches, or 1).")
@click.option("--top-k", default=defaults.TOP_K, show_default=True)
@click.option("--ef-search", default=defaults.HNSW_EF_SEARCH, show_default=True)
@click.option("--repeats", default=5, show_default=True)
def main(entries, dim, queries, top_k, ef_search, repeats):
    """Median milliseconds per image of exact and hnsw retrieval, and the index build time."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        tic = time.perf_counter()
        built = Memory("pixel", "patch_query", None, dim, hnsw=HnswParams(ef_search=ef_search))
        built.add(_unit(rng, entries, dim), rng.integers(0, 2, entries))
        spec = built.save(Path(folder), "bench")
        build = time.perf_counter() - tic
        memory = Memory.open(Path(folder), spec)
        q = _unit(rng, queries, dim)
        for mode in ("exact", "hnsw"):
            memory.anomalous_probability(q, mode, top_k)
            times = []
            for _ in range(repeats):
                tic = time.perf_counter()
                memory.anomalous_probability(q, mode, top_k)
                times.append((time.perf_counter() - tic) * 1000)
            click.echo(f"{entries} entries x {dim}, {queries} queries: {mode} {np.median(times):.1f} ms")
    click.echo(f"index build and save {build:.1f} s (M {defaults.HNSW_M}, ef_construction "
               f"{defaults.HNSW_EF_CONSTRUCTION}, one thread)")


if __name__ == "__main__":
    main()
