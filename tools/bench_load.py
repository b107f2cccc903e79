"""What opening a bundle's encoder costs, and one batch-1 pass: graphs optimised at export against graphs as traced.

    python -m mrad.tools.bench_load --bundle OPTIMISED --bundle TRACED [--rounds 7] [--runs 3]

For each bundle, in rounds that interleave them, the encoder's ONNX Runtime
session is created as the runtime creates it (runtime/graphs.py: a graph
optimised at export by this ONNX Runtime version opens at a lower level), and
for a graph optimised at export also at the full level (what a runtime of
another version does); then ``--runs`` batch-1 passes on one random image,
after one warm-up pass. Prints per case the median and the fastest session
creation and pass, and the ratio of the medians to the first case's. Compare
ratios: on a shared machine the absolute times move between runs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from ..runtime.core.bundle import read_manifest
from ..runtime.core.graphs import default_session_options, preoptimized


def cases(bundles: list[Path]) -> list[tuple[str, Path, ort.SessionOptions]]:
    """(label, graph file, session options) for each way a bundle's encoder is opened."""
    found = []
    for bundle in bundles:
        graph = read_manifest(bundle).graphs["encoder"]
        path = Path(bundle) / graph.file
        level = graph.optimized.get("level", "none")
        options = default_session_options(graph)
        found.append((f"{bundle.name} (optimised at export: {level}), as the runtime opens it", path, options))
        if preoptimized(graph):
            full = default_session_options()
            found.append((f"{bundle.name} (optimised at export: {level}), at the full level", path, full))
    return found


def measure(path: Path, options: ort.SessionOptions, runs: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    opened = time.perf_counter() - start
    spec = session.get_inputs()[0]
    image = np.random.default_rng(0).standard_normal((1, *spec.shape[1:])).astype(np.float32)
    session.run(None, {spec.name: image})
    passes = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {spec.name: image})
        passes.append(time.perf_counter() - start)
    return opened, passes


@click.command()
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="a bundle; give several to compare them (the first is the reference of the ratios)")
@click.option("--rounds", default=7, show_default=True, help="sessions created per case, interleaved")
@click.option("--runs", default=3, show_default=True, help="timed batch-1 passes per session")
def main(bundles: tuple[Path, ...], rounds: int, runs: int) -> None:
    chosen = cases(list(bundles))
    opened = {label: [] for label, _, _ in chosen}
    passes = {label: [] for label, _, _ in chosen}
    for _ in range(rounds):
        for label, path, options in chosen:
            seconds, each = measure(path, options, runs)
            opened[label].append(seconds)
            passes[label] += each
    click.echo(f"onnxruntime {ort.__version__}, CPUExecutionProvider, {rounds} rounds, {runs} passes per session")
    first = chosen[0][0]
    for label, _, _ in chosen:
        o, p = statistics.median(opened[label]), statistics.median(passes[label])
        click.echo(f"{label}: session created in {o * 1e3:.1f} ms (fastest {min(opened[label]) * 1e3:.1f}, "
                   f"{o / statistics.median(opened[first]):.2f}x the first), batch-1 pass {p * 1e3:.1f} ms "
                   f"(fastest {min(passes[label]) * 1e3:.1f}, {p / statistics.median(passes[first]):.2f}x)")


if __name__ == "__main__":
    main()
