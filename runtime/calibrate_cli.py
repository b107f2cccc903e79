"""mrad-calibrate: a decision threshold from known-good images, stored beside the bundle."""

from __future__ import annotations

from pathlib import Path

import click

from . import calibration
from .cli import bundle_option, command, enrollment_option, provider_option, retrieval_option
from .detector import Detector
from .sources import file_frames

EXAMPLES = """
\b
Examples:
  mrad-calibrate --bundle bundles/visa-tf --normal good-parts/
  mrad-calibrate --bundle bundles/visa-tf --normal good/ --quantile 1.0 --retrieval hnsw
\b
The threshold goes to <bundle>.calibration.json, which mrad-run reads by default.
"""


@command("mrad-calibrate", epilog=EXAMPLES)
@bundle_option
@click.option("--normal", "normal", multiple=True, required=True,
              help="Known-good images of the target product: folder, glob or file; repeat for several.")
@click.option("--quantile", default=calibration.DEFAULT_QUANTILE, show_default=True, type=click.FloatRange(0, 1),
              help="Threshold = this quantile of the known-good scores (1.0: their maximum).")
@click.option("--out", "out_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Calibration file [default: <bundle>.calibration.json].")
@provider_option
@retrieval_option
@enrollment_option
def main(bundle, normal, quantile, out_file, provider, retrieval, enrollment):
    """Score known-good images and store a decision threshold beside the bundle (with its current enrollment)."""
    detector = Detector(bundle, provider=provider, retrieval=retrieval, enrollment=enrollment)
    scores, unreadable = [], []
    for frame in file_frames(normal):
        if frame.error:
            unreadable.append(frame.source)
            click.echo(f"skipped: {frame.error}", err=True)
        else:
            scores.append(detector.predict(frame.image).score)
    result = calibration.calibrate(scores, quantile, detector.retrieval, detector.path, detector.enrollment_version)
    path = out_file or calibration.default_path(detector.path)
    calibration.save(result, path)
    click.echo(result.summary(), err=True)
    click.echo(f"calibration written to {path}" + (f"; {len(unreadable)} unreadable images skipped" if unreadable else ""),
               err=True)
