"""mrad-quantize: an INT8 variant of a bundle, calibrated on images, with its fidelity to fp32 measured.

    mrad-quantize --bundle bundles/visa-tf --precision int8 --calibration 'good/*.png' --out bundles/visa-tf-int8

Torch-free: ONNX Runtime's static quantizer (QDQ format: weights int8 per
channel, activations uint8, the U8S8 form x86 VNNI runs fastest) rewrites
the encoder graph. The MatMuls with a weight input are quantized; the
attention products (activation x activation, doubled by MRAD's v-v path)
only with ``--attention``, since ONNX Runtime's QDQ kernels made them cost
more than they saved (measured: docs/BENCHMARKS.md). Ranges come from
running the fp32 graph on the calibration images, one image at a time
(MinMax by default).

The derived bundle keeps the memories and constants of its source; its
manifest records the precision and the fidelity against the fp32 graph,
measured on the calibration images: per output the max and mean absolute
difference, and for the scores their Spearman rank correlation and largest
difference. Needs the ``quantize`` extra (the onnx package, which ONNX
Runtime's quantizer imports).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from mrad.runtime import Detector, MradError
from mrad.runtime.bundle import read_manifest, write_manifest
from mrad.runtime.cli import bundle_option, command
from mrad.runtime.files import swap_in_directory
from mrad.runtime.preprocess import load_rgb
from mrad.runtime.sources import IMAGE_SUFFIXES, expand_inputs

from .metrics import spearman

CALIBRATION_IMAGES = 32
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Left behind in the copy: what belongs to the source bundle's life on the line, not to its content.
NOT_COPIED = ("enrollment", "model.sig", ".lock")


def calibration_images(patterns: tuple[str, ...], bundle: Path, count: int) -> list[Path]:
    """The images to calibrate and measure on: those given, else the bundle's auxiliary data when it is at hand."""
    if patterns:
        found = [p for p in expand_inputs(patterns, "--calibration") if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        roots = [Path(r) for r in read_manifest(bundle, verify=False).provenance.get("aux_data", [])]
        found = sorted(p for root in roots if root.is_dir() for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and "ground_truth" not in p.parts)
        if not found:
            raise MradError("the bundle's auxiliary data is not at hand here: pass --calibration 'good/*.png'")
    if not found:
        raise MradError(f"--calibration {' '.join(patterns)} matches no image")
    step = max(len(found) // count, 1)
    return found[::step][:count]


class _Reader:
    """Feeds the encoder input of each calibration image to ONNX Runtime's calibrator, in strides of one image.

    Striding (``CalibStridedMinMax``) folds each image's ranges in before the
    next runs: a ViT's attention maps for many images at once do not fit in memory.
    """

    def __init__(self, detector: Detector, images: list[Path]):
        self.inputs = [detector.preprocess([load_rgb(p)]) for p in images]
        self.input_name = detector.manifest.graphs["encoder"].inputs[0].name
        self.set_range(0, len(self.inputs))

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self.inputs[start_index:end_index])

    def get_next(self):
        batch = next(self._next, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self):
        self.set_range(0, len(self.inputs))


def activation_products(path: Path) -> list[str]:
    """MatMul nodes with no weight input: the attention products (q k^T, weights x v, and MRAD's v v^T)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {i.name for i in graph.initializer}
    for node in graph.node:  # in topological order: a weight transposed or reshaped in the graph is still a weight
        if all(i in constant for i in node.input if i):
            constant.update(node.output)
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constant for i in n.input)]


def quantize_encoder(source: Path, target: Path, detector: Detector, images: list[Path], method: str,
                     external: bool, attention: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(str(source), str(target), _Reader(detector, images), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Conv", "Gemm"], calibrate_method=methods[method],
                    nodes_to_exclude=None if attention else activation_products(source),
                    use_external_data_format=external,
                    extra_options={"ActivationSymmetric": False, "CalibStridedMinMax": 1})


def fidelity(reference: Detector, derived: Detector, images: list[Path]) -> dict:
    """How far the derived encoder moves outputs and scores from the reference, on ``images``."""
    outputs = [o.name for o in reference.manifest.graphs["encoder"].outputs]
    max_diff = dict.fromkeys(outputs, 0.0)
    mean_diff = dict.fromkeys(outputs, 0.0)
    scores = ([], [])
    for path in tqdm(images, desc="measuring fidelity", unit="img"):
        batch = reference.preprocess([load_rgb(path)])
        want, got = reference.encode(batch, outputs), derived.encode(batch, outputs)
        for name in outputs:
            difference = np.abs(want[name].astype(np.float64) - got[name])
            max_diff[name] = max(max_diff[name], float(difference.max()))
            mean_diff[name] += float(difference.mean()) / len(images)
        for scores_of, detector, encoded in ((scores[0], reference, want), (scores[1], derived, got)):
            scores_of.append(detector.map_and_score(detector.retrieve(encoded), [(8, 8)])[0].score)
    a, b = np.asarray(scores[0]), np.asarray(scores[1])
    return {"reference": "fp32", "images": len(images), "max_abs_diff": max_diff, "mean_abs_diff": mean_diff,
            "score_spearman": spearman(a, b), "score_max_abs_diff": float(np.abs(a - b).max())}


def _with_encoder(manifest, encoder):
    return dataclasses.replace(manifest, graphs={**manifest.graphs, "encoder": encoder})


@command("mrad-quantize", epilog="""
\b
Examples:
  mrad-quantize --bundle bundles/visa-tf --calibration 'good/*.png' --out bundles/visa-tf-int8
  mrad-quantize --bundle bundles/visa-tf --out bundles/visa-tf-int8 --images 64 --method percentile
\b
The new bundle's manifest states the precision and the fidelity measured against fp32 on the
calibration images; mrad-bench and mrad-eval take it like any bundle.
""")
@bundle_option
@click.option("--precision", type=click.Choice(["int8"]), default="int8", show_default=True)
@click.option("--calibration", multiple=True,
              help="Images to calibrate on (folder, glob or file; repeatable) [default: the bundle's aux data].")
@click.option("--images", "count", default=CALIBRATION_IMAGES, show_default=True, type=click.IntRange(min=1),
              help="At most this many calibration images, spread over what was given.")
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default="minmax", show_default=True,
              help="How activation ranges are chosen from the calibration run.")
@click.option("--attention/--weights-only", default=False, show_default=True,
              help="Also quantize the attention products (activation x activation). Off by default: with ONNX "
                   "Runtime's QDQ kernels they cost more than they save (ViT-B-16 @ 448: 1.20x against 1.69x).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder of the derived bundle.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds files.")
def main(bundle, precision, calibration, count, method, attention, out, overwrite):
    """Derive an INT8 bundle from an fp32 one, without torch; its fidelity to fp32 goes into its manifest."""
    try:
        import onnx  # noqa: F401 - ONNX Runtime's quantizer needs it
    except ModuleNotFoundError as exc:
        raise MradError('mrad-quantize needs the onnx package: pip install "mrad-edge[quantize]"') from exc
    reference = Detector(bundle, provider="cpu")
    graph = reference.manifest.graphs["encoder"]
    if graph.precision != "fp32":
        raise MradError(f"{bundle} is already {graph.precision}; quantize from the fp32 bundle")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MradError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
    images = calibration_images(calibration, bundle, count)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shutil.copytree(bundle, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
        for name in graph.files():
            (staging / name).unlink()
        click.echo(f"calibrating on {len(images)} images ({method}) and quantizing the encoder", err=True)
        quantize_encoder(Path(bundle) / graph.file, staging / graph.file, reference, images, method,
                         external=graph.external_data is not None, attention=attention)
        external = f"{graph.file}.data" if (staging / f"{graph.file}.data").is_file() else None
        quantized = dataclasses.replace(graph, precision=precision, external_data=external, checked_providers=(),
                                        max_abs_diff={})
        manifest = write_manifest(staging, _with_encoder(reference.manifest, quantized))
        measured = {**fidelity(reference, Detector(staging, provider="cpu"), images),
                    "quantized": "every MatMul" if attention else "MatMuls with a weight input"}
        write_manifest(staging, _with_encoder(manifest, dataclasses.replace(quantized, fidelity=measured)))
        swap_in_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    click.echo(f"{precision} bundle written to {out}: score rank correlation with fp32 {measured['score_spearman']}, "
               f"largest score difference {measured['score_max_abs_diff']:.4g} on {len(images)} images", err=True)
