"""mrad-calibrate: a decision threshold from known-good images, stored beside the bundle."""

from __future__ import annotations

from pathlib import Path

import click

from ..formats import calibration
from .common import chosen_recipe, command, enrollment_option, provider_option, recipe_options, retrieval_option
from .sign import sign_key_option, trusted_key_option
from ..core import signing
from ..core.detector import Detector
from ..line.sources import file_frames
from ..memories.trials import enrolled_as

EXAMPLES = """
\b
Examples:
  mrad-calibrate --bundle bundles/visa-tf --normal good-parts/
  mrad-calibrate --bundle bundles/visa-tf --normal good/ --quantile 1.0 --retrieval hnsw
  # signed (<file>.sig beside it), for a line that trusts only signed thresholds
  mrad-calibrate --bundle bundles/visa-tf --normal good/ --trusted-key line.pub --sign-key line.pem
\b
The threshold goes to <bundle>.calibration.json (with --enrollment FOLDER: FOLDER/calibration.json),
which mrad-run reads by default.
"""


@command("mrad-calibrate", epilog=EXAMPLES)
@recipe_options
@click.option("--normal", "normal", multiple=True, required=True,
              help="Known-good images of the target product: folder, glob or file; repeat for several.")
@click.option("--quantile", default=calibration.DEFAULT_QUANTILE, show_default=True, type=click.FloatRange(0, 1),
              help="Threshold = this quantile of the known-good scores (1.0: their maximum).")
@click.option("--out", "out_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Calibration file [default: <bundle>.calibration.json; with --enrollment: inside its folder].")
@provider_option
@retrieval_option
@enrollment_option
@trusted_key_option
@sign_key_option
def main(bundle, station_file, recipe, normal, quantile, out_file, provider, retrieval, enrollment, trusted_keys,
         sign_key):
    """Score known-good images and store a decision threshold beside the bundle (with its current enrollment).

    An image that is also enrolled is scored with its own entries held out of the memory: against itself it
    would score near nothing, and the threshold would sit too low.
    """
    chosen = chosen_recipe(bundle, station_file, recipe)
    enrollment, out_file = enrollment or chosen.enrollment, out_file or chosen.calibration
    trusted_keys = signing.trusted(chosen.trusted_keys + tuple(trusted_keys))
    signer = signing.require_signer(trusted_keys, signing.Signer.from_environment(sign_key or chosen.sign_key),
                                    "a calibration")
    if signer is not None:
        signer.check_trusted(trusted_keys, "a calibration")
    detector = Detector(chosen.bundle, provider=provider, retrieval=retrieval or chosen.retrieval,
                        enrollment=enrollment, trusted_keys=trusted_keys)
    trials, unreadable = [], []
    target = detector.target if detector.target is not None and detector.target.active else None
    for frame in file_frames(normal, notice=lambda text: click.echo(f"note: {text}", err=True)):
        if frame.error:
            unreadable.append(frame.source)
            click.echo(f"skipped: {frame.error}", err=True)
        else:
            held = enrolled_as(target, frame.source) if target is not None else []
            trials.append((frame.source if held else frame.image, held))
    held_out = sum(bool(names) for _, names in trials)
    scores = (detector.line_memory.held_out_scores(trials) if held_out
              else [detector.predict(image).score for image, _ in trials])
    result = calibration.calibrate(scores, quantile, detector.retrieval, detector.path, detector.enrollment_version)
    path = out_file or calibration.default_path(detector.path, enrollment)
    calibration.save(result, path, signer)
    if held_out:
        click.echo(f"{held_out} of the {len(scores)} images are enrolled: each was scored with its own entries "
                   "held out", err=True)
    if len(scores) < calibration.images_needed(quantile):
        click.echo(f"warning: quantile {quantile} needs {calibration.images_needed(quantile)} or more images to be "
                   f"estimated; from {len(scores)} it is (nearly) their highest score: give more good parts, or ask "
                   "a lower --quantile", err=True)
    click.echo(result.summary(), err=True)
    click.echo(f"calibration written to {path}" + (f"; {len(unreadable)} unreadable images skipped" if unreadable else ""),
               err=True)
