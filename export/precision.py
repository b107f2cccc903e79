"""A bundle's encoder at another precision: fp16 for GPUs, INT8 calibrated for CPUs, with its fidelity measured.

Torch-free (ONNX Runtime and the onnx package only), so that ``mrad-quantize``
derives a variant from any bundle on the machine that runs it, and
``mrad-export --precision`` uses the same code right after writing fp32.

- fp16: ONNX Runtime's float16 converter; inputs and outputs stay float32, so
  the runtime's contract with the graph does not change.
- int8: ONNX Runtime's static quantizer (QDQ: weights int8 per channel,
  activations uint8, the U8S8 form x86 VNNI runs fastest). The MatMuls with a
  weight input are quantized. The attention products stay float: exported
  graphs hold them fused (export/attention.py), and in graphs exported before
  that, quantizing them with ONNX Runtime's QDQ kernels cost more than it
  saved (docs/BENCHMARKS.md).

The derived bundle keeps the memories and constants of its source; its
manifest records the precision and the fidelity against the fp32 graph on the
given images: per output the max and mean absolute difference, the largest
difference of the anomaly maps, and for the scores their Spearman rank
correlation and largest difference.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from mrad.runtime import Detector, MradError
from mrad.runtime.core import signing
from mrad.runtime.core.bundle import Manifest, read_manifest, write_manifest
from mrad.runtime.files import staged_directory
from mrad.runtime.core.preprocess import load_rgb
from mrad.runtime.line.sources import IMAGE_SUFFIXES

CALIBRATION_IMAGES = 32
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("MatMul", "Conv", "Gemm")
# Left behind in a derived copy: what belongs to the source bundle's life on the line, not to its content.
NOT_COPIED = ("enrollment", "model.sig", ".lock")


def check_tools(precision: str) -> None:
    """Fail early, with what to install, when this machine cannot derive ``precision``."""
    try:
        import onnx  # noqa: F401 - ONNX Runtime's converters and quantizer import it
    except ModuleNotFoundError as exc:
        raise MradError(f'{precision} needs the onnx package: pip install "mrad-edge[quantize]"') from exc
    if precision == "int8":
        from onnxruntime.quantization import quantize_static

        if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
            raise MradError("int8 needs a newer ONNX Runtime (one whose quantize_static takes "
                            "calibration_cache_path): pip install -U onnxruntime")


def spread(images: list[Path], count: int) -> list[Path]:
    """At most ``count`` of ``images``, evenly spread over the list (categories are usually in sorted runs)."""
    return images[::max(len(images) // count, 1)][:count]


def aux_images(bundle: Path) -> list[Path]:
    """The auxiliary images the bundle's memory was built from, when they are at hand on this machine."""
    roots = [Path(r) for r in read_manifest(bundle, verify=False).provenance.get("aux_data", [])]
    return sorted(p for root in roots if root.is_dir() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and "ground_truth" not in p.parts)


class _Reader:
    """Feeds the encoder input of the calibration images to ONNX Runtime's calibrator, ``set_range`` at a time."""

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


def calibrate(source: Path, detector: Detector, images: list[Path], method: str, folder: Path) -> Path:
    """Activation ranges of the fp32 graph over ``images``, written as ONNX Runtime's calibration cache.

    Ours rather than inside ``quantize_static`` for the memory: each image's
    ranges are folded in before the next runs, and the calibration session
    runs without ONNX Runtime's memory arena, which otherwise keeps the largest
    activations of every run (ViT-B-16 @ 448: 1.8 GB in place of 5.3 GB; with
    it ViT-L-14-336 @ 518 did not fit in 24 GB).
    """
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    calibrator = create_calibrator(source, QUANTIZED_OPS, augmented_model_path=folder / "augmented.onnx",
                                   calibrate_method=methods[method], use_external_data_format=True)
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # folds constants, keeps tensors
    calibrator.infer_session = ort.InferenceSession(str(calibrator.augmented_model_path), options,
                                                    providers=["CPUExecutionProvider"])
    reader = _Reader(detector, images)
    for index in tqdm(range(len(reader)), desc="calibrating", unit="img"):
        reader.set_range(index, index + 1)
        calibrator.collect_data(reader)
    cache = folder / "ranges.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def activation_products(path: Path) -> list[str]:
    """MatMul nodes with no weight input: the attention products (q k^T, weights x v, and MRAD's v v^T)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {i.name for i in graph.initializer}
    for node in graph.node:  # in topological order: a weight transposed or reshaped in the graph is still a weight
        if all(i in constant for i in node.input if i):
            constant.update(node.output)
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constant for i in n.input)]


def quantize_int8(source: Path, target: Path, ranges: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(source), str(target), None, calibration_cache_path=ranges, quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    nodes_to_exclude=activation_products(source),
                    use_external_data_format=external, extra_options={"ActivationSymmetric": False})


def convert_fp16(source: Path, target: Path) -> None:
    """Weights and arithmetic in float16; float32 in and out, so the runtime's contract stays the same."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))  # half of an fp32 graph that fitted: under protobuf's 2 GiB, one file


def fidelity(reference: Detector, derived: Detector, images: list[Path]) -> dict:
    """How far the derived encoder moves outputs, maps and scores from the reference, on ``images``.

    Maps are compared at the bundle's input size (the spec's map, before any
    resize to the image's own size).
    """
    outputs = [o.name for o in reference.manifest.graphs["encoder"].outputs]
    side = reference.manifest.preprocess.image_size
    max_diff = dict.fromkeys(outputs, 0.0)
    mean_diff = dict.fromkeys(outputs, 0.0)
    scores, map_diff = ([], []), 0.0
    for path in tqdm(images, desc="measuring fidelity", unit="img"):
        batch = reference.preprocess([load_rgb(path)])
        want, got = reference.encode(batch, outputs), derived.encode(batch, outputs)
        for name in outputs:
            difference = np.abs(want[name].astype(np.float64) - got[name])
            max_diff[name] = max(max_diff[name], float(difference.max()))
            mean_diff[name] += float(difference.mean()) / len(images)
        results = [d.map_and_score(d.retrieve(e), [(side, side)])[0] for d, e in ((reference, want), (derived, got))]
        for scores_of, result in zip(scores, results):
            scores_of.append(result.score)
        map_diff = max(map_diff, float(np.abs(results[0].anomaly_map - results[1].anomaly_map).max()))
    a, b = np.asarray(scores[0]), np.asarray(scores[1])
    return {"reference": "fp32", "images": len(images), "max_abs_diff": max_diff, "mean_abs_diff": mean_diff,
            "score_spearman": spearman(a, b), "score_max_abs_diff": float(np.abs(a - b).max()),
            "map_max_abs_diff": map_diff}


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than two values or a constant side."""
    if len(a) < 2:
        return None
    ranks = [_average_ranks(x) for x in (a, b)]
    if min(np.std(r) for r in ranks) == 0:
        return None
    return float(np.corrcoef(*ranks)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def derive(bundle: Path, out: Path, precision: str, images: list[Path], method: str = "minmax",
           overwrite: bool = False, sign_key: Path | None = None,
           log: Callable[[str], None] = print) -> Manifest:
    """Write ``out``: ``bundle`` with its encoder at ``precision``, measured against it on ``images``."""
    check_tools(precision)
    reference = Detector(bundle, provider="cpu")
    graph = reference.manifest.graphs["encoder"]
    if graph.precision != "fp32":
        raise MradError(f"{bundle} is already {graph.precision}; derive from the fp32 bundle")
    if precision not in ("fp16", "int8"):
        raise MradError(f"cannot derive {precision!r}: choose fp16 or int8")
    if not images:
        raise MradError("no images to measure the derived encoder on")
    out = Path(out)
    if (out.is_file() or (out.is_dir() and any(out.iterdir()))) and not overwrite:
        raise MradError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
    with staged_directory(out) as staging:
        shutil.copytree(bundle, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
        for name in graph.files():
            (staging / name).unlink()
        source, target = Path(bundle) / graph.file, staging / graph.file
        if precision == "int8":
            log(f"calibrating on {len(images)} images ({method}) and quantizing the encoder")
            with tempfile.TemporaryDirectory(prefix="mrad-calibration-") as scratch:
                ranges = calibrate(source, reference, images, method, Path(scratch))
                quantize_int8(source, target, ranges, external=graph.external_data is not None)
            quantized = "MatMuls with a weight input"
        else:
            log("converting the encoder to fp16")
            convert_fp16(source, target)
            quantized = "every float tensor inside the graph; float32 in and out"
        external = f"{graph.file}.data" if (staging / f"{graph.file}.data").is_file() else None
        # optimized={}: a derived graph is opened at the full level, which fuses int8's QDQ pairs on this machine
        derived = dataclasses.replace(graph, precision=precision, external_data=external, checked_providers=(),
                                      max_abs_diff={}, optimized={})
        manifest = write_manifest(staging, _with_encoder(reference.manifest, derived))
        measured = {**fidelity(reference, Detector(staging, provider="cpu"), images), "converted": quantized}
        manifest = write_manifest(staging, _with_encoder(manifest, dataclasses.replace(derived, fidelity=measured)))
        if sign_key:
            signing.sign(staging, sign_key)
    log(f"{precision} bundle written to {out}: score rank correlation with fp32 {measured['score_spearman']}, "
        f"largest score difference {measured['score_max_abs_diff']:.4g} on {len(images)} images")
    return manifest


def _with_encoder(manifest: Manifest, encoder) -> Manifest:
    return dataclasses.replace(manifest, graphs={**manifest.graphs, "encoder": encoder})
