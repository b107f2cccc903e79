"""Synthetic MVTec-AD-layout data: texture categories with painted defects and their masks.

Real inspection datasets cannot be downloaded here, so tests and the demo use
this: each category is a texture family with its own colours, each defect
type a shape painted over the texture with a known mask. ``aux`` and
``target`` hold disjoint categories, as zero-shot use requires.

``--scene objects`` writes scenes of several parts instead (a tray of
capsules, a bag of nuts): parts at random positions and rotations on a plain
background, one part of each defective scene with a painted defect. Besides
the MVTec AD folders, each category keeps ``object_masks/<split>/<kind>/<name>.png``:
a label image (0 background, 1..n the parts) for measuring a segmenter.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image

from mrad.runtime.commands.common import command
from mrad.runtime.errors import MradError

AUX_CATEGORIES = ("stripes", "grain", "dots")
TARGET_CATEGORIES = ("checker", "weave")


def _grating(rng, h, w, freq, angle):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    return 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)


def _blur(field, passes, radius):
    for _ in range(passes):
        for axis in (0, 1):
            padded = np.pad(field, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="wrap")
            csum = np.cumsum(padded, axis=axis, dtype=np.float64)
            csum = np.insert(csum, 0, 0, axis=axis)
            n = field.shape[axis]
            field = (np.take(csum, np.arange(2 * radius + 1, n + 2 * radius + 1), axis=axis)
                     - np.take(csum, np.arange(0, n), axis=axis)) / (2 * radius + 1)
    return field.astype(np.float32)


def _stripes(rng, h, w):
    return _grating(rng, h, w, 0.45, rng.normal(0.3, 0.05))


def _weave(rng, h, w):
    return _grating(rng, h, w, 0.6, 0.0) * _grating(rng, h, w, 0.6, np.pi / 2)


def _checker(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    cell = 8
    off = rng.integers(0, cell, size=2)
    return (((yy + off[0]) // cell + (xx + off[1]) // cell) % 2).astype(np.float32) * 0.6 + 0.2


def _grain(rng, h, w):
    field = _blur(rng.normal(size=(h, w)).astype(np.float32), passes=2, radius=2)
    field = _blur(field, passes=1, radius=4)
    return (field - field.min()) / (np.ptp(field) + 1e-6)


def _dots(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    off = rng.uniform(0, 10, size=2)
    return np.exp(-(((yy + off[0]) % 10 - 5) ** 2 + ((xx + off[1]) % 10 - 5) ** 2) / 6.0)


FAMILIES = {"stripes": _stripes, "weave": _weave, "checker": _checker, "grain": _grain, "dots": _dots}


def _blob(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.06, 0.16) * h, rng.uniform(0.06, 0.16) * w
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _scratch(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return (np.abs(across) <= rng.uniform(1.5, 3.0)) & (np.abs(along) <= rng.uniform(0.2, 0.35) * min(h, w))


DEFECTS = {"blob": _blob, "scratch": _scratch}


def _render(rng, family, palette, h, w):
    texture = FAMILIES[family](rng, h, w)[..., None]
    low, high = palette
    image = low + texture * (high - low) + rng.normal(0, 6, size=(h, w, 3))
    return image


def write_category(root: Path, family: str, size: tuple[int, int], normal: int, anomalous: int, train: int,
                   seed: int) -> None:
    """Write one category: train/good, test/good, test/<defect> and ground_truth/<defect>."""
    rng = np.random.default_rng([seed, sum(map(ord, family))])
    width, height = size
    palette = (rng.uniform(20, 110, size=3), rng.uniform(140, 235, size=3))
    folder = root / family

    def save(image, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)

    for split, count in (("train", train), ("test", normal)):
        for i in range(count):
            save(_render(rng, family, palette, height, width), folder / split / "good" / f"{i:03d}.png")
    for defect, shape in DEFECTS.items():
        for i in range(anomalous):
            image = _render(rng, family, palette, height, width)
            mask = shape(rng, height, width)
            colour = rng.uniform(0, 255, size=3)
            image[mask] = 0.25 * image[mask] + 0.75 * colour
            save(image, folder / "test" / defect / f"{i:03d}.png")
            save(mask.astype(np.float32) * 255, folder / "ground_truth" / defect / f"{i:03d}_mask.png")


def write_dataset(out: Path, aux: tuple[str, ...] = AUX_CATEGORIES, target: tuple[str, ...] = TARGET_CATEGORIES,
                  size: tuple[int, int] = (112, 96), normal: int = 6, anomalous: int = 3, train: int = 4,
                  seed: int = 0) -> tuple[Path, Path]:
    """Write ``out/aux`` and ``out/target``; return both roots."""
    out = Path(out)
    unknown = sorted(set(aux + target) - FAMILIES.keys())
    if unknown:
        raise MradError(f"unknown categories {unknown}; choose from {sorted(FAMILIES)}")
    for name, families in (("aux", aux), ("target", target)):
        for family in families:
            write_category(out / name, family, size, normal, anomalous, train, seed)
    return out / "aux", out / "target"


# Parts of a scene: (length, radius) of a stadium as fractions of the scene's shorter side.
PARTS = {"capsules": (0.22, 0.05), "pins": (0.22, 0.035)}
SCENE_DEFECTS = ("spot", "crack")


def _part(shape: tuple[int, int], centre, angle: float, length: float, radius: float):
    """A stadium (a capsule's outline) at ``centre`` (y, x), long axis at ``angle``: mask and along-axis coordinate."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    along = (xx - centre[1]) * np.cos(angle) + (yy - centre[0]) * np.sin(angle)
    across = -(xx - centre[1]) * np.sin(angle) + (yy - centre[0]) * np.cos(angle)
    half = length / 2 - radius
    outside = np.maximum(np.abs(along) - half, 0.0)
    return outside ** 2 + across ** 2 <= radius ** 2, along, across


def _place(rng, count: int, height: int, width: int, reach: float, attempts: int = 50, tries: int = 500
           ) -> list[tuple[float, float]]:
    """Centres more than two reaches apart (parts never touch) and a reach inside the frame."""
    for _ in range(attempts):  # one unlucky early centre can leave no room: start over
        centres: list[tuple[float, float]] = []
        for _ in range(tries):
            y, x = rng.uniform(reach, height - reach), rng.uniform(reach, width - reach)
            if all((y - cy) ** 2 + (x - cx) ** 2 >= (2.2 * reach) ** 2 for cy, cx in centres):
                centres.append((y, x))
                if len(centres) == count:
                    return centres
    raise MradError(f"cannot place {count} parts apart on a {width}x{height} scene; use fewer --parts or a larger size")


def render_scene(rng, kind: str, colours, height: int, width: int, parts: int, defect: str | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (image float HxWx3, defect mask bool, part labels uint8 with 0 background and 1..parts)."""
    side = min(height, width)
    length, radius = PARTS[kind][0] * side, PARTS[kind][1] * side
    background, left, right = colours
    image = np.broadcast_to(background, (height, width, 3)).astype(np.float32).copy()
    labels = np.zeros((height, width), np.uint8)
    defect_mask = np.zeros((height, width), bool)
    broken = int(rng.integers(0, parts)) if defect else -1
    for i, centre in enumerate(_place(rng, parts, height, width, length / 2 + 2)):
        inside, along, across = _part((height, width), centre, rng.uniform(0, np.pi), length, radius)
        tone = np.where((along < 0)[..., None], left, right)
        shade = 0.85 + 0.15 * np.cos(across / radius * np.pi / 2)[..., None]  # a rounded body looks lit
        image[inside] = (tone * shade)[inside]
        labels[inside] = i + 1
        if i == broken:
            if defect == "spot":
                spot_along = rng.uniform(-0.3, 0.3) * length
                spot = ((along - spot_along) ** 2 + across ** 2) <= (rng.uniform(0.45, 0.7) * radius) ** 2
                image[spot & inside] = rng.uniform(0, 255, size=3)
                defect_mask |= spot & inside
            else:
                crack = (np.abs(along - rng.uniform(-0.25, 0.25) * length) <= rng.uniform(0.5, 1.5)) & inside
                image[crack] = 0.3 * image[crack]
                defect_mask |= crack
    return image + rng.normal(0, 3, size=image.shape), defect_mask, labels


def write_scene_category(root: Path, kind: str, size: tuple[int, int], parts: int, normal: int, anomalous: int,
                         train: int, seed: int) -> None:
    """Write one category of multi-part scenes: the MVTec AD folders and ``object_masks/``."""
    if kind not in PARTS:
        raise MradError(f"unknown part kind {kind!r}; choose from {', '.join(PARTS)}")
    rng = np.random.default_rng([seed, sum(map(ord, kind))])
    width, height = size
    colours = (rng.uniform(20, 70, size=3), rng.uniform(150, 240, size=3), rng.uniform(90, 200, size=3))
    folder = root / kind

    def save(array, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)

    jobs = [("train", "good", train), ("test", "good", normal)] + [("test", d, anomalous) for d in SCENE_DEFECTS]
    for split, name, count in jobs:
        for i in range(count):
            image, defect, labels = render_scene(rng, kind, colours, height, width, parts, None if name == "good" else name)
            save(image, folder / split / name / f"{i:03d}.png")
            save(labels, folder / "object_masks" / split / name / f"{i:03d}.png")
            if name != "good":
                save(defect.astype(np.float32) * 255, folder / "ground_truth" / name / f"{i:03d}_mask.png")


def write_scenes(out: Path, kinds: tuple[str, ...] = ("capsules",), size: tuple[int, int] = (224, 224),
                 parts: int = 6, normal: int = 6, anomalous: int = 3, train: int = 4, seed: int = 0) -> Path:
    """Write ``out/objects/<kind>/...`` (multi-part scenes); return ``out/objects``."""
    root = Path(out) / "objects"
    for kind in kinds:
        write_scene_category(root, kind, size, parts, normal, anomalous, train, seed)
    return root


def object_labels(image: Path) -> Path:
    """The part label image the scene generator wrote for ``image`` (``<category>/<split>/<kind>/<name>.png``)."""
    category = image.parents[2]
    return category / "object_masks" / image.parents[1].name / image.parent.name / image.name


def _names(value: str) -> tuple[str, ...]:
    return tuple(n for n in value.split(",") if n)


@command("mrad-synth", epilog="""
\b
Examples:
  # textures with painted defects: aux/ (for mrad-export) and target/ (to score)
  mrad-synth --out data/synth
\b
  # trays of parts at random places and rotations, some broken, for --objects (per-part memory)
  mrad-synth --out data/synth --scene objects --width 224 --height 224 --parts 6
  mrad-eval --bundle B --data data/synth/objects --enroll-normal 4 --objects auto
""")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write aux/ and target/ into.")
@click.option("--aux", default=",".join(AUX_CATEGORIES), show_default=True, help="Comma-separated auxiliary categories.")
@click.option("--target", default=",".join(TARGET_CATEGORIES), show_default=True,
              help="Comma-separated target categories, disjoint from --aux.")
@click.option("--width", default=112, show_default=True)
@click.option("--height", default=96, show_default=True)
@click.option("--normal", default=6, show_default=True, help="test/good images per category.")
@click.option("--anomalous", default=3, show_default=True, help="Images per defect type per category.")
@click.option("--train", default=4, show_default=True, help="train/good images per category.")
@click.option("--seed", default=0, show_default=True)
@click.option("--scene", type=click.Choice(["textures", "objects"]), default="textures", show_default=True,
              help="'objects': scenes of several parts on a plain background (out/objects/<kind>/...).")
@click.option("--kinds", default="capsules", show_default=True,
              help=f"With --scene objects: comma-separated part kinds ({', '.join(PARTS)}).")
@click.option("--parts", default=6, show_default=True, type=click.IntRange(min=1), help="With --scene objects: parts per scene.")
def main(out, aux, target, width, height, normal, anomalous, train, seed, scene, kinds, parts):
    """Write a small synthetic dataset in the MVTec AD layout (aux/ and target/ roots, or objects/)."""
    if scene == "objects":
        root = write_scenes(out, _names(kinds), (width, height), parts, normal, anomalous, train, seed)
        click.echo(f"wrote {root} (part labels in <kind>/object_masks/)")
        return
    aux_root, target_root = write_dataset(out, _names(aux), _names(target), (width, height), normal, anomalous,
                                          train, seed)
    click.echo(f"wrote {aux_root} and {target_root}")
