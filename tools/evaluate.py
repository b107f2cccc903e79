"""mrad-eval: score an MVTec-AD-layout test set with a bundle and report detection metrics.

Uses the runtime only, so the figures are those a deployed bundle gives.
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

from .metrics import auroc


@dataclass(frozen=True)
class TestImage:
    path: Path
    mask: Path | None
    category: str


def list_test_images(root: Path) -> list[TestImage]:
    images = []
    for category in sorted(p for p in Path(root).iterdir() if (p / "test").is_dir()):
        for folder in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
            for path in sorted(folder.glob("*.png")):
                mask = None if folder.name == "good" else category / "ground_truth" / folder.name / f"{path.stem}_mask.png"
                images.append(TestImage(path, mask, category.name))
    if not images:
        raise click.UsageError(f"{root} holds no <category>/test/<kind>/*.png images")
    return images


def score_images(detector: Detector, images: list[TestImage], batch: int = 8) -> tuple[np.ndarray, list[np.ndarray]]:
    scores, maps = [], []
    for start in tqdm(range(0, len(images), batch), desc=f"scoring ({detector.retrieval})", unit="batch"):
        results = detector.predict_batch([t.path for t in images[start : start + batch]])
        scores += [r.score for r in results]
        maps += [r.anomaly_map for r in results]
    return np.asarray(scores), maps


def ground_truth(image: TestImage, shape: tuple[int, int]) -> np.ndarray:
    if image.mask is None:
        return np.zeros(shape, dtype=bool)
    return np.asarray(Image.open(image.mask).convert("L")) > 0


def metrics(images: list[TestImage], scores: np.ndarray, maps: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Image and pixel AUROC per category and their mean."""
    table = {}
    for category in sorted({t.category for t in images}):
        chosen = [i for i, t in enumerate(images) if t.category == category]
        labels = [images[i].mask is not None for i in chosen]
        masks = np.concatenate([ground_truth(images[i], maps[i].shape).ravel() for i in chosen])
        table[category] = {
            "image_auroc": auroc(labels, scores[chosen]),
            "pixel_auroc": auroc(masks, np.concatenate([maps[i].ravel() for i in chosen])),
        }
    table["mean"] = {key: float(np.mean([row[key] for row in table.values()])) for key in ("image_auroc", "pixel_auroc")}
    return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path, exists=True),
              help="Root in the MVTec AD layout; its test split is scored.")
@click.option("--retrieval", type=click.Choice(RETRIEVAL_MODES + ("both",)), default="exact", show_default=True,
              help="'both' also reports how far hnsw moves scores from exact.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the figures to this file too.")
def main(bundle, data, retrieval, provider, json_out):
    """Image and pixel AUROC of a bundle on a test set, per category and mean."""
    images = list_test_images(data)
    modes = RETRIEVAL_MODES if retrieval == "both" else (retrieval,)
    report, scored = {}, {}
    for mode in modes:
        scored[mode] = score_images(Detector(bundle, provider=provider, retrieval=mode), images)
        report[mode] = metrics(images, *scored[mode])
        click.echo(f"{mode}:")
        for category, row in report[mode].items():
            click.echo(f"  {category:<12} image AUROC {row['image_auroc']:.4f}   pixel AUROC {row['pixel_auroc']:.4f}")
    if len(modes) == 2:
        exact, hnsw = scored["exact"][0], scored["hnsw"][0]
        map_diff = max(np.abs(a - b).max() for a, b in zip(scored["exact"][1], scored["hnsw"][1]))
        report["hnsw_vs_exact"] = {
            "score_pearson": float(np.corrcoef(exact, hnsw)[0, 1]),
            "score_max_abs_diff": float(np.abs(exact - hnsw).max()),
            "map_max_abs_diff": float(map_diff),
        }
        click.echo("hnsw vs exact: " + ", ".join(f"{k} {v:.6f}" for k, v in report["hnsw_vs_exact"].items()))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
