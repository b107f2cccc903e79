"""mrad-eval: score an MVTec-AD-layout test set with a bundle and report the paper's metrics.

Uses the runtime only, so the figures are those a deployed bundle gives (with
its current enrollment, if any). Pixel metrics are computed at the bundle's
input size with masks resized as the reference does (binarised, bilinear,
> 0.5); ``--full-resolution`` uses each image's own size instead. Categories
are scored one after the other and each one's maps are let go once its
metrics are computed.

``--enroll-normal K [--enroll-defects M]`` measures what the line's own
memories add: per category, K images of ``train/good`` and M test defects
(taken in turn from each defect type, with their masks) are enrolled in
memory (nothing is saved), the held-out defects leave the test set, and the
rest is scored zero-shot and enrolled from the same encoder outputs.
``--objects auto|segmenter.onnx`` adds a per-part memory to that enrollment
(same images) and a third table, global + per-part; where the data holds the
part label images ``mrad-synth --scene objects`` writes, the segmenter's part
count accuracy and mean IoU are reported too.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from mrad.runtime import Detector, MradError
from mrad.runtime.commands.common import bundle_option, command, enrollment_option, provider_option
from mrad.runtime.commands.sign import trusted_key_option
from mrad.runtime.defaults import RETRIEVAL_MODES
from mrad.runtime.formats.mvtec import Sample, scan
from mrad.runtime.core.preprocess import load_mask, load_rgb

from .metrics import aupro, auroc, average_precision, f1_max, segmentation_scores

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_aupro")


def ground_truth(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """The binary mask at ``size`` (height, width): resized as the reference resizes masks, or empty."""
    if sample.mask is None:
        return np.zeros(size, dtype=bool)
    return load_mask(sample.mask, size)


class RetrievalComparison:
    """How far hnsw retrieval moves scores and maps from exact retrieval, over the same encoder outputs."""

    def __init__(self):
        self.exact, self.hnsw, self.map_diff = [], [], 0.0

    def add(self, exact: list, hnsw: list) -> None:
        self.exact += [r.score for r in exact]
        self.hnsw += [r.score for r in hnsw]
        self.map_diff = max(self.map_diff, *(float(np.abs(a.anomaly_map - b.anomaly_map).max())
                                             for a, b in zip(exact, hnsw)))

    def report(self) -> dict[str, float | None]:
        """Differences; the correlation needs two images or more."""
        exact, hnsw = np.asarray(self.exact), np.asarray(self.hnsw)
        pearson = float(np.corrcoef(exact, hnsw)[0, 1]) if len(exact) > 1 else None
        return {"score_pearson": pearson, "score_max_abs_diff": float(np.abs(exact - hnsw).max()),
                "score_mean_abs_diff": float(np.abs(exact - hnsw).mean()), "map_max_abs_diff": self.map_diff}


ZERO_SHOT, ENROLLED, OBJECTS = "zero-shot", "enrolled", "enrolled+objects"


def score_modes(detector: Detector, images: list, sizes, modes=RETRIEVAL_MODES) -> dict[str, list]:
    """Results of a batch of RGB images for each retrieval mode, from one encoder call."""
    encoded = detector.encode(detector.preprocess(images))
    comparison = detector.compare(encoded)
    return {mode: detector.map_and_score(detector.fuse(detector.align(encoded, detector.retrieve(encoded, mode=mode)),
                                                       comparison), sizes)
            for mode in modes}


def score_enrolled(detector: Detector, images: list, sizes, mode: str, parts: list | None = None) -> dict[str, list]:
    """Results of a batch zero-shot and with the detector's enrollment, from one encoder call.

    With a per-part memory enrolled, also global + per-part; ``parts``, when
    given, receives each image's segmented parts.
    """
    encoded = detector.encode(detector.preprocess(images))
    retrieved = detector.align(encoded, detector.retrieve(encoded, mode=mode))
    comparison = detector.compare(encoded)
    fused = detector.fuse(retrieved, comparison)
    results = {ZERO_SHOT: detector.map_and_score(retrieved, sizes), ENROLLED: detector.map_and_score(fused, sizes)}
    if detector.objects is not None and detector.objects.active:
        frames = [np.asarray(image) for image in images]
        found = detector.segment(frames)
        results[OBJECTS] = detector.map_and_score(fused, sizes, detector.compare_objects(frames, found, comparison))
        if parts is not None:
            parts.extend(found)
    return results


def part_labels(sample: Sample) -> Path:
    """Where mrad-synth --scene objects keeps the part label image of a sample."""
    category = sample.root / sample.category
    return category / "object_masks" / sample.split / sample.defect / sample.image.name


class SegmentationCheck:
    """Part count accuracy and mean IoU of the segmenter against label images, where the data has them."""

    def __init__(self):
        self.frames, self.counted, self.ious = 0, 0, []

    def add(self, sample: Sample, parts: list, shape: tuple[int, int]) -> None:
        path = part_labels(sample)
        if not path.is_file():
            return
        labels = np.asarray(Image.open(path))
        same, ious = segmentation_scores([part.frame_mask(shape) for part in parts], labels)
        self.frames += 1
        self.counted += same
        self.ious += ious

    def report(self) -> dict | None:
        if not self.frames:
            return None
        return {"frames": self.frames, "count_accuracy": self.counted / self.frames, "parts": len(self.ious),
                "mean_iou": float(np.mean(self.ious)) if self.ious else 0.0}


def enrollment_split(samples: list[Sample], normal: int, defects: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """One category's samples -> (normal images to enroll, defects to enroll, the test images scored).

    Normal images are the first of train/good; defects are taken in turn from
    each defect type (first of each, then second of each, ...).
    """
    category = samples[0].category
    train = [s for s in samples if s.split == "train"]
    if len(train) < normal:
        raise MradError(f"category {category} has {len(train)} train/good images; --enroll-normal {normal} needs "
                        f"{normal}")
    by_type: dict[str, list[Sample]] = {}
    for sample in samples:
        if sample.anomalous:
            by_type.setdefault(sample.defect, []).append(sample)
    turns = [s for row in zip_longest(*by_type.values()) for s in row if s is not None]
    if defects and len(turns) <= defects:
        raise MradError(f"category {category} has {len(turns)} defect images; --enroll-defects {defects} would leave "
                        "none to score")
    held = set(turns[:defects])
    scored = [s for s in samples if s.split == "test" and s not in held]
    return train[:normal], turns[:defects], scored


def compare_retrieval(detector: Detector, images: list, batch: int = 8) -> dict[str, float | None]:
    """Score each image both ways; how far hnsw moves scores and maps. ``images``: what ``predict`` takes."""
    comparison = RetrievalComparison()
    for start in range(0, len(images), batch):
        rgb = [load_rgb(p) for p in images[start : start + batch]]
        results = score_modes(detector, rgb, [(im.height, im.width) for im in rgb])
        comparison.add(results["exact"], results["hnsw"])
    return comparison.report()


def evaluate(detector: Detector, samples: list[Sample], modes=("exact",), full_resolution: bool = False,
             batch: int = 8, pixel: bool = True, enroll: tuple[int, int] | None = None, objects: str | None = None,
             segmentation: SegmentationCheck | None = None) -> tuple[dict[str, dict], dict | None]:
    """Metrics per category and their mean, for each retrieval mode; with both modes, their comparison.

    Each image is encoded once, whatever the number of modes. With ``enroll``
    (normal, defect counts per category) the tables are "zero-shot" and
    "enrolled", for the one retrieval mode given (see the module docstring);
    ``objects`` ("auto" or a segmenter file) adds "enrolled+objects", and
    ``segmentation`` collects the segmenter's accuracy.
    """
    side = detector.manifest.preprocess.image_size
    categories: dict[str, list[Sample]] = {}
    for sample in samples:
        categories.setdefault(sample.category, []).append(sample)
    if enroll:
        if len(modes) != 1:
            raise MradError("evaluate enrollment with one retrieval mode at a time")
        splits = {name: enrollment_split(chosen, *enroll) for name, chosen in categories.items()}
        categories = {name: split[2] for name, split in splits.items()}
        names = [ZERO_SHOT, ENROLLED] + ([OBJECTS] if objects else [])
    else:
        names = list(modes)
    tables = {name: {} for name in names}
    comparison = RetrievalComparison() if len(modes) > 1 else None
    total = sum(len(chosen) for chosen in categories.values())
    with tqdm(total=total, desc=f"scoring ({', '.join(names)})", unit="img") as bar:
        for category, chosen in categories.items():
            if enroll:
                normals, defects, _ = splits[category]
                detector.line_memory.start_trial()
                detector.line_memory.enroll([s.image for s in normals], "normal", save=False, batch=batch, objects=objects)
                if defects:
                    detector.line_memory.enroll([s.image for s in defects], "defect", masks=[s.mask for s in defects], save=False,
                                    batch=batch)
            scores = {name: [] for name in names}
            maps = {name: [] for name in names}
            masks = []
            for start in range(0, len(chosen), batch):
                chunk = chosen[start : start + batch]
                rgb = [load_rgb(s.image) for s in chunk]
                sizes = [(im.height, im.width) if full_resolution else (side, side) for im in rgb]
                if enroll:
                    parts = [] if objects else None
                    results = score_enrolled(detector, rgb, sizes, modes[0], parts)
                    if segmentation is not None and parts:
                        for sample, found, image in zip(chunk, parts, rgb):
                            segmentation.add(sample, found, (image.height, image.width))
                else:
                    results = score_modes(detector, rgb, sizes, modes)
                for mode, got in results.items():
                    scores[mode] += [r.score for r in got]
                    if pixel:
                        maps[mode] += [r.anomaly_map for r in got]
                if pixel:
                    masks += [ground_truth(s, size) for s, size in zip(chunk, sizes)]
                if comparison:
                    comparison.add(results["exact"], results["hnsw"])
                bar.update(len(chunk))
            labels = np.array([s.anomalous for s in chosen])
            for mode in names:
                tables[mode][category] = category_metrics(category, labels, np.asarray(scores[mode]), masks,
                                                          maps[mode] if pixel else None)
    for table in tables.values():
        table["mean"] = {key: float(np.mean([row[key] for row in table.values() if key in row]))
                         for key in IMAGE_METRICS + PIXEL_METRICS if any(key in row for row in table.values())}
    return tables, comparison.report() if comparison else None


def category_metrics(category: str, labels: np.ndarray, scores: np.ndarray, masks: list, maps: list | None) -> dict:
    row = {"images": len(labels)}
    if labels.all() or not labels.any():
        click.echo(f"warning: {category} lacks good or defective images; its image metrics are skipped", err=True)
    else:
        row.update(image_auroc=auroc(labels, scores), image_ap=average_precision(labels, scores),
                   image_f1_max=f1_max(labels, scores))
    if maps is not None and labels.any():
        flat_masks = np.concatenate([m.ravel() for m in masks])
        flat_maps = np.concatenate([m.ravel() for m in maps])
        if flat_masks.all() or not flat_masks.any():  # masks all empty (or all full): no pixel to tell apart
            click.echo(f"warning: {category}'s masks mark no defective pixel (or only defective ones); its pixel "
                       "metrics are skipped", err=True)
            return row
        row.update(pixel_auroc=auroc(flat_masks, flat_maps), pixel_ap=average_precision(flat_masks, flat_maps),
                   pixel_aupro=aupro(masks, maps))
    return row


def format_table(table: dict[str, dict[str, float]]) -> str:
    columns = [c for c in IMAGE_METRICS + PIXEL_METRICS if c in table["mean"]]
    width = max(len(name) for name in table) + 2
    lines = ["category".ljust(width) + "".join(c.replace("_", " ").rjust(14) for c in columns)]
    for name, row in table.items():
        cells = "".join((f"{100 * row[c]:.1f}" if c in row else "-").rjust(14) for c in columns)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def format_side_by_side(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """AUROCs of two tables per category, as "before -> after" cells."""
    columns = [c for c in ("image_auroc", "pixel_auroc", "pixel_aupro") if c in before["mean"]]
    width = max(len(name) for name in before) + 2
    lines = ["category".ljust(width) + "".join(c.replace("_", " ").rjust(18) for c in columns)]
    for name, row in before.items():
        cells = "".join((f"{100 * row[c]:.1f} -> {100 * after[name][c]:.1f}" if c in row else "-").rjust(18)
                        for c in columns)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


@command("mrad-eval", epilog="""
\b
Examples:
  mrad-eval --bundle bundles/visa-tf --data /data/mvtec --json mvtec-tf.json
  mrad-eval --bundle bundles/visa-ft --data /data/mvtec --retrieval both

  # what 4 good parts and 2 flagged defects per category add to zero-shot
  mrad-eval --bundle bundles/visa-tf --data /data/mvtec --enroll-normal 4 --enroll-defects 2
\b
  # scenes of many parts: global memory against global + per-part memory, same images
  mrad-synth --out data/synth --scene objects --width 224 --height 224
  mrad-eval --bundle bundles/visa-tf --data data/synth/objects --enroll-normal 8 --objects auto
""")
@bundle_option
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Root in the MVTec AD layout; its test split is scored.")
@click.option("--retrieval", type=click.Choice(RETRIEVAL_MODES + ("both",)), default="exact", show_default=True,
              help="'both' evaluates each (one encoder call per image) and reports how far hnsw moves scores.")
@provider_option
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--full-resolution", is_flag=True, help="Pixel metrics at each image's size, not the bundle's input size.")
@click.option("--image-only", is_flag=True, help="Skip pixel metrics (less memory and time).")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), help="Also write the figures here.")
@enrollment_option
@click.option("--enroll-normal", type=click.IntRange(min=1),
              help="Per category, enroll this many train/good images (in memory only) and report zero-shot against "
                   "enrolled.")
@click.option("--enroll-defects", default=0, show_default=True, type=click.IntRange(min=0),
              help="With --enroll-normal: also enroll this many test defects per category (with masks); they are "
                   "not scored.")
@click.option("--objects", help="With --enroll-normal: also enroll a per-part memory, segmented by 'auto' or a "
                                "SAM-family segmenter's .onnx file, and report global + per-part as a third table.")
@trusted_key_option
def main(bundle, data, retrieval, provider, batch, full_resolution, image_only, json_out, enrollment, enroll_normal,
         enroll_defects, objects, trusted_keys):
    """Image AUROC, AP and F1-max; pixel AUROC, AP and AUPRO (FPR up to 0.3): per category and mean (in %)."""
    if enroll_defects and not enroll_normal:
        raise MradError("--enroll-defects needs --enroll-normal (defects sharpen a memory of normal parts)")
    if objects and not enroll_normal:
        raise MradError("--objects needs --enroll-normal (the per-part memory is made of enrolled normal images)")
    if enroll_normal and retrieval == "both":
        raise MradError("--enroll-normal evaluates one retrieval mode: pass --retrieval exact or hnsw")
    detector = Detector(bundle, provider=provider, enrollment=enrollment, trusted_keys=trusted_keys)
    samples = scan([data], include_train=bool(enroll_normal), what="--data")
    if not samples:
        raise MradError(f"--data {data} holds no test images")
    modes = RETRIEVAL_MODES if retrieval == "both" else (retrieval,)
    enroll = (enroll_normal, enroll_defects) if enroll_normal else None
    segmentation = SegmentationCheck() if objects else None
    tables, comparison = evaluate(detector, samples, modes, full_resolution, batch, pixel=not image_only,
                                  enroll=enroll, objects=objects, segmentation=segmentation)
    scored = sum(row["images"] for name, row in next(iter(tables.values())).items() if name != "mean")
    report = {"bundle": str(bundle), "data": str(data), "images": scored, **tables}
    if enroll:
        report["enrolled_per_category"] = {"normal": enroll_normal, "defect": enroll_defects}
        settings = detector.target.settings
        click.echo(f"\nenrolled per category: {enroll_normal} normal (train/good), {enroll_defects} defects (held out); "
                   f"map weight {settings.map_weight}, image weight {settings.image_weight}, scales "
                   f"{','.join(map(str, settings.scales))}")
        for name in tables:
            click.echo(f"\n{name} (retrieval {modes[0]}):\n{format_table(tables[name])}")
        click.echo(f"\nzero-shot -> enrolled:\n{format_side_by_side(tables[ZERO_SHOT], tables[ENROLLED])}")
        if objects:
            s = detector.objects.settings if detector.objects is not None else None
            click.echo(f"\nenrolled -> enrolled+objects (segmenter {objects}"
                       + (f", object map weight {s.map_weight}, object image weight {s.image_weight}" if s else "")
                       + f"):\n{format_side_by_side(tables[ENROLLED], tables[OBJECTS])}")
            found = segmentation.report()
            if found:
                report["segmentation"] = found
                click.echo(f"\nsegmenter against the part labels: part count right in {found['count_accuracy']:.1%} "
                           f"of {found['frames']} frames, mean IoU {found['mean_iou']:.3f} over {found['parts']} parts")
    else:
        if detector.enrollment is not None:
            click.echo(f"\nscored with the bundle's enrollment, version {detector.enrollment.version}", err=True)
        for mode in modes:
            click.echo(f"\nretrieval {mode}:\n{format_table(tables[mode])}")
    if comparison:
        report["hnsw_vs_exact"] = comparison
        click.echo("\nhnsw vs exact: " + ", ".join(f"{k} {v:.6g}" for k, v in comparison.items() if v is not None))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
