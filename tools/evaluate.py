"""mrad-eval: score an MVTec-AD-layout test set with a bundle and report the paper's metrics.

Uses the runtime only, so the figures are those a deployed bundle gives. Pixel
metrics are computed at the bundle's input size with masks resized as the
reference does (binarised, bilinear, > 0.5); ``--full-resolution`` uses each
image's own size instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from mrad.runtime import Detector
from mrad.runtime.bundle import RETRIEVAL_MODES
from mrad.runtime.detector import PROVIDER_CHOICES
from mrad.runtime.sources import IMAGE_SUFFIXES

from .metrics import aupro, auroc, average_precision, f1_max

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_aupro")


@dataclass(frozen=True)
class TestImage:
    path: Path
    mask: Path | None  # None for good images
    category: str


def list_test_images(root: Path) -> list[TestImage]:
    images = []
    for category in sorted(p for p in Path(root).iterdir() if (p / "test").is_dir()):
        for folder in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                mask = None if folder.name == "good" else category / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                images.append(TestImage(path, mask, category.name))
    if not images:
        raise click.UsageError(f"{root} holds no <category>/test/<kind>/<image> files in the MVTec AD layout")
    return images


def ground_truth(image: TestImage, size: tuple[int, int] | None) -> np.ndarray:
    """Binary mask, at ``size`` (height, width) resized as the reference resizes masks, or as stored."""
    if image.mask is None:
        if size is None:
            with Image.open(image.path) as opened:
                size = (opened.height, opened.width)
        return np.zeros(size, dtype=bool)
    binary = Image.fromarray((np.asarray(Image.open(image.mask).convert("L")) > 0).astype(np.uint8) * 255)
    if size is None:
        return np.asarray(binary) > 0
    return np.asarray(binary.resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float32) / 255.0 > 0.5


def evaluate(detector: Detector, images: list[TestImage], full_resolution: bool = False, batch: int = 8,
             pixel: bool = True) -> dict[str, dict[str, float]]:
    """Metrics per category and their mean over categories."""
    side = detector.manifest.preprocess.image_size
    size = None if full_resolution else (side, side)
    scores, masks, maps = [], [], []
    for start in tqdm(range(0, len(images), batch), desc=f"scoring ({detector.retrieval})", unit="batch"):
        chunk = images[start : start + batch]
        results = detector.predict_batch([t.path for t in chunk], map_size=size)
        scores += [r.score for r in results]
        if pixel:
            maps += [r.anomaly_map for r in results]
            masks += [ground_truth(t, size) for t in chunk]
    scores = np.asarray(scores)
    table = {}
    for category in sorted({t.category for t in images}):
        chosen = [i for i, t in enumerate(images) if t.category == category]
        labels = np.array([images[i].mask is not None for i in chosen])
        row = {"images": len(chosen)}
        if labels.all() or not labels.any():
            click.echo(f"warning: {category} lacks good or defective images; its image metrics are skipped", err=True)
        else:
            row.update(image_auroc=auroc(labels, scores[chosen]), image_ap=average_precision(labels, scores[chosen]),
                       image_f1_max=f1_max(labels, scores[chosen]))
        if pixel and labels.any():
            cat_masks, cat_maps = [masks[i] for i in chosen], [maps[i] for i in chosen]
            flat_masks = np.concatenate([m.ravel() for m in cat_masks])
            flat_maps = np.concatenate([m.ravel() for m in cat_maps])
            row.update(pixel_auroc=auroc(flat_masks, flat_maps), pixel_ap=average_precision(flat_masks, flat_maps),
                       pixel_aupro=aupro(cat_masks, cat_maps))
        table[category] = row
    table["mean"] = {key: float(np.mean([row[key] for row in table.values() if key in row]))
                     for key in IMAGE_METRICS + PIXEL_METRICS if any(key in row for row in table.values())}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    columns = [c for c in IMAGE_METRICS + PIXEL_METRICS if c in table["mean"]]
    width = max(len(name) for name in table) + 2
    lines = ["category".ljust(width) + "".join(c.replace("_", " ").rjust(14) for c in columns)]
    for name, row in table.items():
        cells = "".join((f"{100 * row[c]:.1f}" if c in row else "-").rjust(14) for c in columns)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog="""
\b
Examples:
  mrad-eval --bundle bundles/visa-tf --data /data/mvtec --json mvtec-tf.json
  mrad-eval --bundle bundles/visa-ft --data /data/mvtec --retrieval both
""")
@click.option("--bundle", required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Root in the MVTec AD layout; its test split is scored.")
@click.option("--retrieval", type=click.Choice(RETRIEVAL_MODES + ("both",)), default="exact", show_default=True,
              help="'both' evaluates each and reports how far hnsw moves scores from exact.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True)
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--full-resolution", is_flag=True, help="Pixel metrics at each image's size, not the bundle's input size.")
@click.option("--image-only", is_flag=True, help="Skip pixel metrics (less memory and time).")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), help="Also write the figures here.")
def main(bundle, data, retrieval, provider, batch, full_resolution, image_only, json_out):
    """Image AUROC, AP and F1-max; pixel AUROC, AP and AUPRO (FPR up to 0.3): per category and mean (in %)."""
    images = list_test_images(data)
    report = {"bundle": str(bundle), "data": str(data), "images": len(images)}
    modes = RETRIEVAL_MODES if retrieval == "both" else (retrieval,)
    for mode in modes:
        detector = Detector(bundle, provider=provider, retrieval=mode)
        report[mode] = evaluate(detector, images, full_resolution, batch, pixel=not image_only)
        click.echo(f"\nretrieval {mode}:\n{format_table(report[mode])}")
    if len(modes) == 2:
        report["hnsw_vs_exact"] = compare_retrieval(Detector(bundle, provider=provider), [t.path for t in images], batch)
        click.echo("\nhnsw vs exact: " + ", ".join(f"{k} {v:.6g}" for k, v in report["hnsw_vs_exact"].items()
                                                    if v is not None))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


def compare_retrieval(detector: Detector, images: list, batch: int = 8) -> dict[str, float | None]:
    """Score each image both ways from the same encoder outputs; how far hnsw moves scores and maps.

    ``images``: anything ``Detector.predict`` takes. The correlation needs two images or more.
    """
    from mrad.runtime.preprocess import load_rgb

    exact_scores, hnsw_scores, map_diff = [], [], 0.0
    for start in range(0, len(images), batch):
        rgb = [load_rgb(p) for p in images[start : start + batch]]
        queries = detector.encode(detector.preprocess(rgb))
        exact = detector.finish(rgb, *detector.retrieve(*queries, mode="exact"))
        hnsw = detector.finish(rgb, *detector.retrieve(*queries, mode="hnsw"))
        exact_scores += [r.score for r in exact]
        hnsw_scores += [r.score for r in hnsw]
        map_diff = max(map_diff, *(np.abs(a.anomaly_map - b.anomaly_map).max() for a, b in zip(exact, hnsw)))
    exact_scores, hnsw_scores = np.asarray(exact_scores), np.asarray(hnsw_scores)
    pearson = float(np.corrcoef(exact_scores, hnsw_scores)[0, 1]) if len(images) > 1 else None
    return {"score_pearson": pearson,
            "score_max_abs_diff": float(np.abs(exact_scores - hnsw_scores).max()),
            "score_mean_abs_diff": float(np.abs(exact_scores - hnsw_scores).mean()),
            "map_max_abs_diff": float(map_diff)}
