"""mrad-eval: score an MVTec-AD-layout test set with a bundle and report the paper's metrics.

Uses the runtime only, so the figures are those a deployed bundle gives. Pixel
metrics are computed at the bundle's input size with masks resized as the
reference does (binarised, bilinear, > 0.5); ``--full-resolution`` uses each
image's own size instead. Categories are scored one after the other and each
one's maps are let go once its metrics are computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from mrad.runtime import Detector, MradError
from mrad.runtime.cli import bundle_option, command, provider_option
from mrad.runtime.defaults import RETRIEVAL_MODES
from mrad.runtime.mvtec import Sample, scan
from mrad.runtime.preprocess import load_mask, load_rgb

from .metrics import aupro, auroc, average_precision, f1_max

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


def score_modes(detector: Detector, images: list, sizes, modes=RETRIEVAL_MODES) -> dict[str, list]:
    """Results of a batch of RGB images for each retrieval mode, from one encoder call."""
    encoded = detector.encode(detector.preprocess(images))
    return {mode: detector.map_and_score(detector.retrieve(encoded, mode=mode), sizes) for mode in modes}


def compare_retrieval(detector: Detector, images: list, batch: int = 8) -> dict[str, float | None]:
    """Score each image both ways; how far hnsw moves scores and maps. ``images``: what ``predict`` takes."""
    comparison = RetrievalComparison()
    for start in range(0, len(images), batch):
        rgb = [load_rgb(p) for p in images[start : start + batch]]
        results = score_modes(detector, rgb, [(im.height, im.width) for im in rgb])
        comparison.add(results["exact"], results["hnsw"])
    return comparison.report()


def evaluate(detector: Detector, samples: list[Sample], modes=("exact",), full_resolution: bool = False,
             batch: int = 8, pixel: bool = True) -> tuple[dict[str, dict], dict | None]:
    """Metrics per category and their mean, for each retrieval mode; with both modes, their comparison.

    Each image is encoded once, whatever the number of modes.
    """
    side = detector.manifest.preprocess.image_size
    categories: dict[str, list[Sample]] = {}
    for sample in samples:
        categories.setdefault(sample.category, []).append(sample)
    tables = {mode: {} for mode in modes}
    comparison = RetrievalComparison() if len(modes) > 1 else None
    with tqdm(total=len(samples), desc=f"scoring ({', '.join(modes)})", unit="img") as bar:
        for category, chosen in categories.items():
            scores = {mode: [] for mode in modes}
            maps = {mode: [] for mode in modes}
            masks = []
            for start in range(0, len(chosen), batch):
                chunk = chosen[start : start + batch]
                rgb = [load_rgb(s.image) for s in chunk]
                sizes = [(im.height, im.width) if full_resolution else (side, side) for im in rgb]
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
            for mode in modes:
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


@command("mrad-eval", epilog="""
\b
Examples:
  mrad-eval --bundle bundles/visa-tf --data /data/mvtec --json mvtec-tf.json
  mrad-eval --bundle bundles/visa-ft --data /data/mvtec --retrieval both
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
def main(bundle, data, retrieval, provider, batch, full_resolution, image_only, json_out):
    """Image AUROC, AP and F1-max; pixel AUROC, AP and AUPRO (FPR up to 0.3): per category and mean (in %)."""
    detector = Detector(bundle, provider=provider)
    samples = scan([data], what="--data")
    if not samples:
        raise MradError(f"--data {data} holds no test images")
    modes = RETRIEVAL_MODES if retrieval == "both" else (retrieval,)
    tables, comparison = evaluate(detector, samples, modes, full_resolution, batch, pixel=not image_only)
    report = {"bundle": str(bundle), "data": str(data), "images": len(samples), **tables}
    for mode in modes:
        click.echo(f"\nretrieval {mode}:\n{format_table(tables[mode])}")
    if comparison:
        report["hnsw_vs_exact"] = comparison
        click.echo("\nhnsw vs exact: " + ", ".join(f"{k} {v:.6g}" for k, v in comparison.items() if v is not None))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
