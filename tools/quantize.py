"""mrad-quantize: a bundle's encoder at another precision, derived without torch, its fidelity to fp32 measured.

    mrad-quantize --bundle bundles/visa-tf --precision int8 --calibration 'good/*.png' --out bundles/visa-tf-int8
    mrad-quantize --bundle bundles/visa-tf --precision fp16 --out bundles/visa-tf-fp16

The work is :mod:`mrad.export.precision`'s (``mrad-export --precision`` runs
the same); this is its command line. Needs the ``quantize`` extra (the onnx
package, which ONNX Runtime's converters import).
"""

from __future__ import annotations

from pathlib import Path

import click

from mrad.export import precision as derivation
from mrad.runtime import MradError
from mrad.runtime.commands.common import bundle_option, command
from mrad.runtime.line.sources import IMAGE_SUFFIXES, expand_inputs


def calibration_images(patterns: tuple[str, ...], bundle: Path, count: int) -> list[Path]:
    """The images to calibrate and measure on: those given, else the bundle's auxiliary data when it is at hand."""
    if patterns:
        found = [p for p in expand_inputs(patterns, "--calibration") if p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise MradError(f"--calibration {' '.join(patterns)} matches no image")
    else:
        found = derivation.aux_images(bundle)
        if not found:
            raise MradError("the bundle's auxiliary data is not at hand here: pass --calibration 'good/*.png'")
    return derivation.spread(found, count)


@command("mrad-quantize", epilog="""
\b
Examples:
  mrad-quantize --bundle bundles/visa-tf --calibration 'good/*.png' --out bundles/visa-tf-int8
  mrad-quantize --bundle bundles/visa-tf --out bundles/visa-tf-int8 --images 64 --method percentile
  mrad-quantize --bundle bundles/visa-tf --precision fp16 --out bundles/visa-tf-fp16
\b
int8 is for CPUs (fastest with AVX-512 VNNI or AMX), fp16 for GPUs (on a CPU it runs, slower than
fp32). The new bundle's manifest states the precision and the fidelity measured against fp32 on the
calibration images; mrad-bench (--against the fp32 bundle) and mrad-eval take it like any bundle.
""")
@bundle_option
@click.option("--precision", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True)
@click.option("--calibration", multiple=True,
              help="Images to calibrate and measure on (folder, glob or file; repeatable) [default: the bundle's "
                   "aux data].")
@click.option("--images", "count", default=derivation.CALIBRATION_IMAGES, show_default=True,
              type=click.IntRange(min=1), help="At most this many calibration images, spread over what was given.")
@click.option("--method", type=click.Choice(derivation.CALIBRATION_METHODS), default="minmax", show_default=True,
              help="int8: how activation ranges are chosen from the calibration run.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder of the derived bundle.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds files.")
def main(bundle, precision, calibration, count, method, out, overwrite):
    """Derive an int8 or fp16 bundle from an fp32 one, without torch; its fidelity to fp32 goes into its manifest."""
    derivation.check_tools(precision)
    images = calibration_images(calibration, bundle, count)
    derivation.derive(bundle, out, precision, images, method=method, overwrite=overwrite,
                      log=lambda message: click.echo(message, err=True))
