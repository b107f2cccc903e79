"""Labelled image folders in the MVTec AD layout, read the same way by export and evaluation.

    <root>/<category>/test/good/*.png                      normal
    <root>/<category>/test/<defect>/*.png                  anomalous
    <root>/<category>/ground_truth/<defect>/<name>_mask.png
    <root>/<category>/train/good/*.png                     normal (only with include_train)

The reference builds its memory from the test split only; ``include_train``
adds train/good.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import MradError
from ..line.sources import IMAGE_SUFFIXES

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    root: Path
    image: Path
    mask: Path | None  # None for normal images
    category: str
    defect: str  # "good" for normal images
    split: str = "test"  # "train" for train/good images

    @property
    def anomalous(self) -> bool:
        return self.mask is not None

    @property
    def source(self) -> str:
        """The image's path from its root's parent: what provenance records."""
        return self.image.relative_to(self.root.parent).as_posix()


def scan(roots: list[Path], include_train: bool = False, what: str = "--data") -> list[Sample]:
    """Every labelled image under ``roots``, in a fixed order; masks checked to exist and fit.

    ``what`` names the option the roots came from, for error messages.
    """
    samples: list[Sample] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise MradError(f"{what} {root} is not a directory")
        categories = sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())
        if not categories:
            raise MradError(
                f"{what} {root} holds no category in the MVTec AD layout: expected "
                f"{root}/<category>/test/good/*.png and {root}/<category>/test/<defect>/*.png"
            )
        for category in categories:
            samples.extend(_scan_category(root, category, include_train))
    for sample in samples:
        _check_headers(sample)
    return samples


def _scan_category(root: Path, category: Path, include_train: bool) -> list[Sample]:
    name = category.name
    samples = [Sample(root, p, None, name, GOOD) for p in _images(category / "test" / GOOD)]
    if include_train:
        samples += [Sample(root, p, None, name, GOOD, "train") for p in _images(category / "train" / GOOD)]
    for defect in sorted(p for p in (category / "test").iterdir() if p.is_dir() and p.name != GOOD):
        for image in _images(defect):
            mask = category / "ground_truth" / defect.name / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise MradError(f"anomalous image {image} has no mask: expected {mask}")
            samples.append(Sample(root, image, mask, name, defect.name))
    return samples


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


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
            raise MradError(f"image could not be decoded: {path} ({exc}); fix or remove the file") from exc
    if len(sizes) == 2 and sizes[0] != sizes[1]:
        raise MradError(
            f"mask {sample.mask} is {sizes[1][0]}x{sizes[1][1]} but its image {sample.image} is "
            f"{sizes[0][0]}x{sizes[0][1]}; masks must match their image"
        )
