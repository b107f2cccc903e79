"""A recipe's region of interest: what of the frame is scored, and what is left out.

The region is a rectangle ``(x, y, w, h)`` or a polygon ``((x, y), ...)`` in
frame pixels, minus ignore masks (rectangles or polygons: a printed label, a
clamp that moves). Before scoring, the frame is cut to the region's bounding
box and every pixel of the box outside the region, or inside an ignore mask,
is set to one colour: OpenAI CLIP's mean, which normalises to zero. So the
encoder's input does not depend on any pixel outside the region, and a
defect there can never move the score. The map comes back on the whole
frame: the box's map pasted in place, zero outside the region.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from .. import defaults
from ..core.result import Result
from ..errors import ImageError

Shape = tuple  # (x, y, w, h) or ((x, y), ...)
MASKS_KEPT = 8  # frame sizes whose masks are kept (a line has one or two cameras' sizes)


@dataclass(frozen=True)
class Placement:
    """Where a region sits in one frame: the box (x0, y0, x1, y1), the frame's (height, width), the box's mask."""

    box: tuple[int, int, int, int]
    frame_size: tuple[int, int]
    inside: np.ndarray  # bool (box height, box width): scored pixels


def _draw(shape: Shape, size: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """``shape`` rasterised on an image of ``size`` (width, height) whose origin is ``offset`` in the frame."""
    canvas = Image.new("1", size, 0)
    draw = ImageDraw.Draw(canvas)
    dx, dy = offset
    if isinstance(shape[0], tuple):
        draw.polygon([(x - dx, y - dy) for x, y in shape], fill=1, outline=1)
    else:
        x, y, w, h = shape
        draw.rectangle([x - dx, y - dy, x - dx + w - 1, y - dy + h - 1], fill=1)
    return np.array(canvas, dtype=bool)


def _bounds(shape: Shape) -> tuple[float, float, float, float]:
    if isinstance(shape[0], tuple):
        xs, ys = [p[0] for p in shape], [p[1] for p in shape]
        return min(xs), min(ys), max(xs) + 1, max(ys) + 1
    x, y, w, h = shape
    return x, y, x + w, y + h


class Region:
    """A region of interest with its ignore masks; placed once per frame size (cached)."""

    def __init__(self, shape: Shape, ignore: tuple[Shape, ...] = (), fill: tuple[int, int, int] = defaults.OBJECT_FILL):
        self.shape, self.ignore, self.fill = shape, tuple(ignore), np.asarray(fill, np.uint8)
        self._placed: collections.OrderedDict[tuple[int, int], Placement] = collections.OrderedDict()

    def place(self, height: int, width: int) -> Placement:
        key = (height, width)
        placed = self._placed.get(key)
        if placed is None:
            placed = self._placed[key] = self._placement(height, width)
            while len(self._placed) > MASKS_KEPT:
                self._placed.popitem(last=False)
        return placed

    def _placement(self, height: int, width: int) -> Placement:
        x0, y0, x1, y1 = _bounds(self.shape)
        box = (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(width, int(np.ceil(x1))),
               min(height, int(np.ceil(y1))))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise ImageError(f"the region of interest {list(self.shape)} lies outside the {width}x{height} frame; "
                             "fix the recipe's roi")
        size, offset = (box[2] - box[0], box[3] - box[1]), box[:2]
        inside = _draw(self.shape, size, offset)
        for shape in self.ignore:
            inside &= ~_draw(shape, size, offset)
        if not inside.any():
            raise ImageError(f"the region of interest {list(self.shape)} is entirely covered by its ignore masks")
        return Placement(box, (height, width), inside)

    def cut(self, frame: np.ndarray) -> tuple[np.ndarray, Placement]:
        """The part of ``frame`` (HxWx3 uint8) that is scored: its box, outside pixels filled; and its placement."""
        placed = self.place(*frame.shape[:2])
        x0, y0, x1, y1 = placed.box
        cut = np.array(frame[y0:y1, x0:x1], dtype=np.uint8, copy=True)
        cut[~placed.inside] = self.fill
        return cut, placed


def on_frame(result: Result, placed: Placement) -> Result:
    """A result scored on a region's cut, with its map (and part boxes) on the whole frame."""
    x0, y0, x1, y1 = placed.box
    whole = np.zeros(placed.frame_size, np.float32)
    whole[y0:y1, x0:x1] = np.where(placed.inside, result.anomaly_map, 0.0)
    objects = result.objects
    if objects is not None:
        objects = tuple(type(o)((o.box[0] + x0, o.box[1] + y0, o.box[2] + x0, o.box[3] + y0), o.score) for o in objects)
    return replace(result, anomaly_map=whole, objects=objects)
