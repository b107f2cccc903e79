"""Retrieval alone at a chosen memory size, without building a bundle of that size.

Zero-shot memories: exact softmax against hnsw top-k, on random unit keys.
Bundles built from the generated data hold tens of entries; this measures the
sizes real auxiliary sets give (VisA: about 2,200 image and 3,400 pixel
entries).

    python -m mrad.tools.bench_retrieval --entries 3400 --dim 1024 --queries 1369

The line's own memories (``--target-shots N``): a target memory of N normal
shots at a grid and width (ViT-L-14-336 @ 518: 37 x 37 patches of 1,024, image
features of 768), exact and through hnswlib: enrollment time per shot
(insertion only, the encoder call comes on top) and the compare stage per
frame, with hnsw's recall of the exact nearest entry. The features are
synthetic: one fixed "product layout" of patch vectors, each shot and each
test frame that layout plus noise, so that queries have near neighbours as
real parts do.

    python -m mrad.tools.bench_retrieval --target-shots 16 --grid 37 --dim 1024 --image-dim 768
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from mrad.runtime import defaults
from mrad.runtime.core.bundle import HnswParams
from mrad.runtime.commands.common import command
from mrad.runtime.memories.enrollment import EnrollmentSettings, Source, TargetMemory
from mrad.runtime.core.memory import Memory
from mrad.runtime.core.search import hnswlib_or_none


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
@click.option("--target-shots", type=click.IntRange(min=1), help="Measure a target memory of this many normal shots.")
@click.option("--grid", default=37, show_default=True, help="Patch grid side G for --target-shots.")
@click.option("--ef-construction", default=defaults.ENROLL_HNSW_EF_CONSTRUCTION, show_default=True,
              help="hnswlib ef_construction for --target-shots.")
@click.option("--image-dim", default=768, show_default=True, help="Image feature size D for --target-shots.")
def main(entries, dim, queries, top_k, ef_search, repeats, target_shots, grid, ef_construction, image_dim):
    """Median milliseconds per image of exact and hnsw retrieval, and the index build time."""
    if target_shots:
        return bench_target(target_shots, grid, dim, image_dim, repeats, ef_search, ef_construction)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        tic = time.perf_counter()
        built = Memory("pixel", "patch_query", None, dim, hnsw=HnswParams(ef_construction=ef_construction,
                                                                                     ef_search=ef_search))
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


def _shots(rng, layout: np.ndarray, image_dim: int, count: int, noise: float = 0.5):
    tokens = layout[None] + noise * rng.standard_normal((count, *layout.shape)).astype(np.float32)
    return rng.standard_normal((count, image_dim)).astype(np.float32), tokens.astype(np.float32)


def bench_target(shots: int, grid: int, dim: int, image_dim: int, repeats: int, ef_search: int,
                 ef_construction: int) -> None:
    rng = np.random.default_rng(0)
    layout = rng.standard_normal((grid * grid, dim)).astype(np.float32)
    enrolled = _shots(rng, layout, image_dim, shots)
    frame = _shots(rng, layout, image_dim, 1)
    click.echo(f"target memory: {shots} shots of {grid} x {grid} patches of {dim} (scales "
               f"{','.join(map(str, defaults.ENROLL_SCALES))}: {shots * grid * grid} entries per scale), image dim "
               f"{image_dim}")
    modes = {"exact": 10 ** 9, "hnsw": 1} if hnswlib_or_none() else {"exact": 10 ** 9}
    finest = f"normal/patch_{defaults.ENROLL_SCALES[0]}"
    exact_distances = None
    for mode, exact_below in modes.items():
        settings = EnrollmentSettings(exact_below=exact_below, cap=10 ** 9, hnsw=HnswParams(ef_construction=ef_construction,
                                                                                     ef_search=ef_search))
        memory = TargetMemory(settings, grid, image_dim, dim)
        memory.add(enrolled[0][:1], enrolled[1][:1], [Source("shot-0", "normal")], [None])
        tic = time.perf_counter()
        memory.compare(*frame)  # hnsw: the indexes are built here, on the first shot
        first = (time.perf_counter() - tic) * 1000
        insert = []
        for i in range(1, shots):
            tic = time.perf_counter()
            memory.add(enrolled[0][i : i + 1], enrolled[1][i : i + 1], [Source(f"shot-{i}", "normal")], [None])
            insert.append((time.perf_counter() - tic) * 1000)
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            comparison = memory.compare(*frame)
            times.append((time.perf_counter() - tic) * 1000)
        line = f"{mode}: compare {np.median(times):.1f} ms per frame"
        if insert:
            line += f"; enrollment {np.median(insert):.1f} ms per shot (insertion, encoder call not included)"
        distances = comparison.nearest[finest][0][0]
        if mode == "exact":
            exact_distances = distances
        else:
            line += (f"; ef_search {ef_search}, ef_construction {ef_construction}; first compare (builds the indexes) {first:.0f} ms; nearest found exactly for "
                     f"{np.mean(np.abs(distances - exact_distances) < 1e-6):.3f} of the patches")
        click.echo(line)

if __name__ == "__main__":
    main()
