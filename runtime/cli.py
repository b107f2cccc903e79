"""mrad-run: score images with a bundle, one JSON line per frame."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from .bundle import RETRIEVAL_MODES
from .detector import PROVIDER_CHOICES, Detector
from .errors import BundleError, ImageError, MradError
from .sources import expand_inputs

EXIT_BAD_ARGUMENTS, EXIT_BAD_BUNDLE = 2, 3

EXAMPLES = """
\b
Examples:
  mrad-run --bundle bundles/visa-tf --input parts/                # every image in a folder
  mrad-run --bundle bundles/visa-tf --input 'line3/*.png' --out scores.jsonl
  mrad-run --bundle bundles/visa-tf --input part.png --retrieval hnsw --provider cpu
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory from mrad-export.")
@click.option("--input", "inputs", multiple=True, required=True,
              help="Image file, folder or glob pattern; repeat for several.")
@click.option("--out", type=click.File("w"), default="-", help="Where the JSON lines go (default: stdout).")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime execution provider.")
@click.option("--retrieval", type=click.Choice(RETRIEVAL_MODES), default=None,
              help="exact softmax over the whole memory, or top-k through the index (default: the bundle's).")
def main(bundle, inputs, out, provider, retrieval):
    """Score images with an MRAD bundle: one JSON line per image with its anomaly score and latency."""
    try:
        detector = Detector(bundle, provider=provider, retrieval=retrieval)
    except BundleError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_BUNDLE)
    except MradError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_ARGUMENTS)
    latencies, errors, started = [], 0, time.perf_counter()
    try:
        for frame, path in enumerate(expand_inputs(inputs)):
            record = {"source": str(path), "frame": frame,
                      "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
            tic = time.perf_counter()
            try:
                result = detector.predict(path)
            except ImageError as exc:
                errors += 1
                record["error"] = str(exc)
            else:
                latency = (time.perf_counter() - tic) * 1000
                latencies.append(latency)
                record.update(score=round(result.score, 6), latency_ms=round(latency, 2))
            out.write(json.dumps(record) + "\n")
            out.flush()
    except MradError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_ARGUMENTS)
    elapsed = time.perf_counter() - started
    frames = len(latencies) + errors
    summary = f"{frames} frames, {errors} errors, {frames / elapsed:.1f} frames/s"
    if latencies:
        p50, p95 = np.percentile(latencies, [50, 95])
        summary += f", latency p50 {p50:.1f} ms, p95 {p95:.1f} ms"
    click.echo(summary, err=True)
