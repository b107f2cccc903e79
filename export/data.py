"""Auxiliary data in the MVTec AD layout (spec section 3).

    <root>/<category>/test/good/*.png                      normal
    <root>/<category>/test/<defect>/*.png                  anomalous
    <root>/<category>/ground_truth/<defect>/<name>_mask.png
    <root>/<category>/train/good/*.png                     normal (only with include_train)

The reference uses the test split only; ``include_train`` adds train/good.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mrad.runtime.errors import ImageError
from mrad.runtime.preprocess import load_rgb
from mrad.runtime.sources import IMAGE_SUFFIXES

from .errors import ExportError

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None  # None for normal images
    category: str

    @property
    def anomalous(self) -> bool:
        return self.mask is not None


def scan(roots: list[Path], include_train: bool = False) -> list[Sample]:
    """List every auxiliary sample under ``roots``, checking the layout as it goes."""
    samples: list[Sample] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ExportError(f"--aux-data {root} is not a directory")
        categories = sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())
        if not categories:
            raise ExportError(
                f"--aux-data {root} holds no category in the MVTec AD layout: expected "
                f"{root}/<category>/test/good/*.png and {root}/<category>/test/<defect>/*.png"
            )
        for category in categories:
            samples.extend(_scan_category(category, include_train))
    if not any(s.anomalous for s in samples) or all(s.anomalous for s in samples):
        raise ExportError("auxiliary data must hold both normal (test/good) and anomalous (test/<defect>) images")
    for sample in samples:
        _check_headers(sample)
    return samples


def _check_headers(sample: Sample) -> None:
    """Catch unreadable files and mismatched masks before minutes of encoding, from file headers alone."""
    sizes = []
    for path in (sample.image, sample.mask):
        if path is None:
            continue
        try:
            with Image.open(path) as opened:
                sizes.append(opened.size)
        except (OSError, ValueError) as exc:
            raise ExportError(f"image could not be decoded: {path} ({exc}); fix or remove the file") from exc
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        raise ExportError(
            f"mask {sample.mask} is {sizes[1][0]}x{sizes[1][1]} but its image {sample.image} is "
            f"{sizes[0][0]}x{sizes[0][1]}; masks must match their image"
        )


def _scan_category(category: Path, include_train: bool) -> list[Sample]:
    name = category.name
    samples = [Sample(p, None, name) for p in _images(category / "test" / GOOD)]
    if include_train:
        samples += [Sample(p, None, name) for p in _images(category / "train" / GOOD)]
    for defect in sorted(p for p in (category / "test").iterdir() if p.is_dir() and p.name != GOOD):
        for image in _images(defect):
            mask = category / "ground_truth" / defect.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise ExportError(f"anomalous image {image} has no mask: expected {mask}")
            samples.append(Sample(image, mask, name))
    return samples


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_sample(sample: Sample, image_size: int) -> tuple[Image.Image, np.ndarray]:
    """Return the RGB image and its (S, S) boolean mask, binarised as the reference does.

    The mask is binarised at its own resolution (> 0), resized bilinearly by
    Pillow (as torchvision does for PIL masks), then binarised again (> 0.5).
    """
    try:
        image = load_rgb(sample.image)
    except ImageError as exc:
        raise ExportError(str(exc)) from exc
    if sample.mask is None:
        return image, np.zeros((image_size, image_size), dtype=bool)
    try:
        with Image.open(sample.mask) as opened:
            raw = np.asarray(opened.convert("L")) > 0
    except OSError as exc:
        raise ExportError(f"mask could not be decoded: {sample.mask} ({exc})") from exc
    binary = Image.fromarray(raw.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(binary.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.float32)
    return image, resized / 255.0 > 0.5
