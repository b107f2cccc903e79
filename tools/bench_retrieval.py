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

from mrad.export.package import write_memory_level
from mrad.runtime.retrieval import Memory


def _unit(rng, rows, dim):
    x = rng.normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--entries", default=3400, show_default=True, help="Memory entries.")
@click.option("--dim", default=1024, show_default=True, help="Key size (W for the pixel level, D for the image level).")
@click.option("--queries", default=1369, show_default=True, help="Queries per image (G*G patches, or 1).")
@click.option("--top-k", default=64, show_default=True)
@click.option("--ef-search", default=128, show_default=True)
@click.option("--repeats", default=5, show_default=True)
def main(entries, dim, queries, top_k, ef_search, repeats):
    """Median milliseconds per image of exact and hnsw retrieval, and the index build time."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        tic = time.perf_counter()
        level = write_memory_level(Path(folder), "bench", _unit(rng, entries, dim), rng.integers(0, 2, entries))
        build = time.perf_counter() - tic
        memory = Memory(Path(folder), level, ef_search)
        q = _unit(rng, queries, dim)
        for mode in ("exact", "hnsw"):
            memory.anomalous_probability(q, mode, top_k)
            times = []
            for _ in range(repeats):
                tic = time.perf_counter()
                memory.anomalous_probability(q, mode, top_k)
                times.append((time.perf_counter() - tic) * 1000)
            click.echo(f"{entries} entries x {dim}, {queries} queries: {mode} {np.median(times):.1f} ms")
    click.echo(f"index build {build:.1f} s (M 16, ef_construction 200, one thread)")


if __name__ == "__main__":
    main()
