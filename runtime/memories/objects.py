"""Scenes of many parts: segment a frame into single parts, and compare each part with normal parts.

A tray of capsules seen whole confuses "a part moved" with "a part is broken",
and at the encoder's patch grid a small part is a few patches. The multi-scale
memory comparison method's answer is an individual memory: segment the scene
into single objects, crop each, and compare it with the parts of the enrolled
normal images, beside the global memory.

Segmenters share one small interface (:class:`Segmenter`: ``segment(rgb) ->
list[Part]``):

- :class:`AutoSegmenter` (``auto``), for parts on a plain background: a
  background model from the enrolled normal images (the median colour of
  their border bands, and the 99th percentile of its spread there), each
  pixel's colour distance to it thresholded, an opening and a closing, outer
  contours filled (so a defect of the background's colour leaves no hole),
  size limits;
- :class:`OnnxSegmenter`: a SAM-family model the user supplies as one ONNX
  graph (see its docstring for the contract); prompts on a point grid, the
  best of each prompt's masks above a predicted IoU, box non-maximum
  suppression. Never downloaded; its sha256 is kept in the enrollment.

A part becomes a crop (:func:`crop_transform`): turned so that its long axis
lies horizontal (when it has one), its box grown by a margin and made
square, resized to the bundle's input side, everything outside the part
filled with one colour. The crop is encoded like an image; its image feature
and multi-scale patch tokens go into a :class:`~mrad.runtime.memories.enrollment.TargetMemory`
of parts (normal labels only), built and searched like the global one.

Scoring pastes each part's map back (the inverse of its crop transform) and
fuses it into the enrolled target term of the global map. With ``a`` the
enrollment's map weight, ``c`` the object map weight, ``w`` a part's weight
(its crop mask, dilated and feathered, pasted back; where weights overlap
they are normalised), ``T_g`` the global target map and ``T_o`` the part's:

    M     = M_fused + a * c * w * (T_o - T_g)             the enrolled term, inside parts, from the part memory
    p_img = (1 - e) * p_fused + e * max over parts t_o    e = the object image weight

where ``M_fused`` is the global map of :mod:`~mrad.runtime.core.detector` (zero-shot
and enrolled, fused) and ``t_o`` a part's image-level distance. The image
score then follows spec section 4 on ``M``. A part's own score is
``(1 - k) * mean(top 1% of its crop map) + k * t_o`` (``k`` the spec's image
weight). A frame whose part count lies outside the enrolled normal counts,
widened by the tolerance, is flagged: a missing or an extra part is a defect
too. With no part memory enrolled nothing here runs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np

from .. import defaults
from ..core.bundle import read_regular
from ..errors import MradError

SEGMENTERS = ("auto", "onnx")
# Parts whose inertia axes differ by less than this ratio have no long axis to turn upright by.
ELONGATED = 1.3
# Band of the frame's border that the background model reads, as a fraction of the shorter side.
BORDER_BAND = 0.03
# A part's weight in the fused map: its crop mask dilated and blurred by this fraction of the crop side.
FEATHER = 0.04
# Crop patches where a part's weight passes this are the part's; the rest of the crop is fill, neither
# enrolled nor scored.
REACHED = 0.05


@dataclass(frozen=True)
class Background:
    """What ``auto`` knows of the background: its colour and how far background pixels stray from it."""

    colour: tuple[float, ...]
    spread: float


@dataclass(frozen=True)
class ObjectSettings:
    """How parts are found, cropped and fused; recorded in the enrollment manifest."""

    segmenter: str = "auto"
    model: str | None = None  # onnx: the segmenter file
    model_sha256: str | None = None
    threshold: float = defaults.OBJECT_THRESHOLD
    min_contrast: float = defaults.OBJECT_MIN_CONTRAST
    min_area: float = defaults.OBJECT_MIN_AREA
    max_area: float = defaults.OBJECT_MAX_AREA
    morphology: float = defaults.OBJECT_MORPHOLOGY
    margin: float = defaults.OBJECT_MARGIN
    upright: bool = True
    fill: tuple[int, ...] = defaults.OBJECT_FILL
    points_per_side: int = defaults.OBJECT_POINTS_PER_SIDE
    predicted_iou: float = defaults.OBJECT_PREDICTED_IOU
    nms_iou: float = defaults.OBJECT_NMS_IOU
    map_weight: float = defaults.OBJECT_MAP_WEIGHT
    image_weight: float = defaults.OBJECT_IMAGE_WEIGHT
    count_tolerance: int = defaults.OBJECT_COUNT_TOLERANCE

    def problems(self) -> list[str]:
        found = []
        if self.segmenter not in SEGMENTERS:
            found.append(f"segmenter must be one of {', '.join(SEGMENTERS)}, got {self.segmenter!r}")
        if self.segmenter == "onnx" and not (self.model and self.model_sha256):
            found.append("an onnx segmenter needs its model file and sha256")
        if not 0 <= self.min_area < self.max_area <= 1:
            found.append(f"need 0 <= min_area < max_area <= 1, got {self.min_area} and {self.max_area}")
        for name in ("map_weight", "image_weight", "predicted_iou", "nms_iou", "morphology"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                found.append(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.threshold <= 0 or self.min_contrast < 0 or self.margin < 0:
            found.append("threshold must be positive, min_contrast and margin not negative")
        if len(self.fill) != 3 or any(not 0 <= v <= 255 for v in self.fill):
            found.append(f"fill must be three 8-bit values, got {list(self.fill)}")
        if self.points_per_side < 1 or self.count_tolerance < 0:
            found.append("points_per_side must be positive and count_tolerance not negative")
        return found

    def checked(self) -> "ObjectSettings":
        problems = self.problems()
        if problems:
            raise MradError("object settings: " + "; ".join(problems))
        return self


@dataclass(frozen=True)
class Part:
    """One part found in a frame: its box (x0, y0, x1, y1; ends exclusive), its mask within the box."""

    box: tuple[int, int, int, int]
    mask: np.ndarray  # bool, (y1 - y0, x1 - x0)
    confidence: float = 1.0

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def frame_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The part's mask over the whole (height, width) frame."""
        mask = np.zeros(shape, bool)
        x0, y0, x1, y1 = self.box
        mask[y0:y1, x0:x1] = self.mask
        return mask


class Segmenter(Protocol):
    def segment(self, rgb: np.ndarray) -> list[Part]:
        """An HxWx3 uint8 RGB frame -> its parts, in reading order (top to bottom, then left to right)."""
        ...


def _reading_order(parts: list[Part]) -> list[Part]:
    return sorted(parts, key=lambda p: (p.box[1], p.box[0]))


def _within_limits(area: int, shape: tuple[int, int], settings: ObjectSettings) -> bool:
    total = shape[0] * shape[1]
    return settings.min_area * total <= area <= settings.max_area * total


# -- auto ---------------------------------------------------------------------------------------


def _border(rgb: np.ndarray) -> np.ndarray:
    band = max(1, int(round(BORDER_BAND * min(rgb.shape[:2]))))
    return np.concatenate([rgb[:band].reshape(-1, 3), rgb[-band:].reshape(-1, 3),
                           rgb[:, :band].reshape(-1, 3), rgb[:, -band:].reshape(-1, 3)]).astype(np.float32)


def fit_background(images: Sequence[np.ndarray]) -> Background:
    """The background model of ``auto`` from normal frames (HxWx3 uint8): their border bands show background."""
    if not len(images):
        raise MradError("the auto segmenter learns the background from normal images: enroll at least one")
    pixels = np.concatenate([_border(image) for image in images])
    colour = np.median(pixels, axis=0)
    spread = float(np.percentile(np.linalg.norm(pixels - colour, axis=1), 99))
    return Background(colour=tuple(round(float(v), 3) for v in colour), spread=round(spread, 3))


class AutoSegmenter:
    """Parts on a plain background (see the module docstring), NumPy and OpenCV only."""

    def __init__(self, settings: ObjectSettings, background: Background):
        self.settings, self.background = settings, background

    def foreground(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 0/1: pixels the background model does not explain, after the opening and closing."""
        s = self.settings
        distance = np.linalg.norm(rgb.astype(np.float32) - np.asarray(self.background.colour, np.float32), axis=2)
        foreground = (distance > max(s.threshold * self.background.spread, s.min_contrast)).astype(np.uint8)
        side = max(3, int(round(s.morphology * min(rgb.shape[:2]))) | 1)
        kernel = np.ones((side, side), np.uint8)
        foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, kernel)
        return cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, kernel)

    def segment(self, rgb: np.ndarray) -> list[Part]:
        contours, _ = cv2.findContours(self.foreground(rgb), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        parts = []
        for contour in contours:
            if len(parts) > defaults.OBJECT_MAX_PARTS:  # a cluttered frame: past the cap, its count decides it
                break
            x, y, w, h = cv2.boundingRect(contour)
            mask = np.zeros((h, w), np.uint8)
            cv2.drawContours(mask, [contour], -1, 1, thickness=cv2.FILLED, offset=(-x, -y))
            part = Part((x, y, x + w, y + h), mask.astype(bool))
            if _within_limits(part.area, rgb.shape[:2], self.settings):
                parts.append(part)
        return _reading_order(parts)


# -- a SAM-family ONNX model ----------------------------------------------------------------------

ONNX_INPUTS = ("image", "point_coords", "point_labels")
ONNX_OUTPUTS = ("masks", "iou_predictions")
MAX_MASK_SIDE = 4096  # a mask the model answers, per side


class OnnxSegmenter:
    """Automatic masks from a SAM-family model exported as one ONNX graph (MobileSAM, EfficientViT-SAM, ...).

    The graph's contract (SAM's encoder and prompt decoder in one graph):

    - input ``image``: float32 (1, 3, T, T), RGB in 0..255; the frame is
      resized so that its longer side is T (SAM's ResizeLongestSide) and
      padded with zeros at the bottom and right. T is read from the graph.
    - input ``point_coords``: float32 (N, 1, 2), one (x, y) point per prompt,
      in the T x T input's pixels; ``point_labels``: float32 (N, 1), all 1.
    - outputs ``masks``: float32 (N, M, h, w) mask logits over the T x T input
      (any h, w: they are resized to T), and ``iou_predictions`` (N, M).

    Per prompt the mask of highest predicted IoU is kept if its prediction
    reaches ``predicted_iou``; logits are resized bilinearly to T, the
    padding cut, resized to the frame and thresholded at 0; parts outside
    the size limits are dropped; then boxes overlapping a better-predicted
    kept box by more than ``nms_iou`` are suppressed. A graph with a fixed
    prompt count of 1 is called once per point.
    """

    def __init__(self, path: str | Path, settings: ObjectSettings, providers: Sequence = ("CPUExecutionProvider",),
                 model: bytes | None = None):
        """``model``: the graph's bytes as already read (and checked) from ``path``; default: read from ``path``."""
        import onnxruntime as ort

        self.path, self.settings = Path(path), settings
        if model is None and not self.path.is_file():
            raise MradError(f"segmenter {self.path} is not a file")
        try:
            self.session = ort.InferenceSession(model if model is not None else str(self.path), providers=list(providers))
        except Exception as exc:  # ONNX Runtime raises its own types for unreadable or invalid graphs
            raise MradError(f"segmenter {self.path} could not be opened by ONNX Runtime ({exc})") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in ONNX_INPUTS if n not in inputs] + [n for n in ONNX_OUTPUTS if n not in outputs]
        side = inputs["image"].shape[-1] if "image" in inputs else None
        if missing or not isinstance(side, int) or inputs["image"].shape[-2] != side:
            raise MradError(f"segmenter {self.path} does not follow the SAM-family contract: it needs inputs "
                            f"{', '.join(ONNX_INPUTS)} (image of a fixed square size) and outputs "
                            f"{', '.join(ONNX_OUTPUTS)}; missing {missing or 'a fixed image size'}. See "
                            "mrad.runtime.memories.objects.OnnxSegmenter")
        self.side = side
        prompts = inputs["point_coords"].shape[0]
        self.prompts_per_call = prompts if isinstance(prompts, int) else None

    def points(self, height: int, width: int) -> np.ndarray:
        """(N, 2) prompt points (x, y) in the graph's input pixels: a grid over the frame's resized area."""
        scale = self.side / max(height, width)
        n = self.settings.points_per_side
        steps = (np.arange(n) + 0.5) / n
        xs, ys = np.meshgrid(steps * width * scale, steps * height * scale)
        return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)

    def _input(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        scale = self.side / max(height, width)
        size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        padded = np.zeros((self.side, self.side, 3), np.float32)
        padded[: size[1], : size[0]] = resized
        return padded.transpose(2, 0, 1)[None]

    def _run(self, image: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        step = self.prompts_per_call or len(points)
        masks, ious = [], []
        for start in range(0, len(points), step):
            chosen = points[start : start + step]
            got = self.session.run(list(ONNX_OUTPUTS), {"image": image, "point_coords": chosen[:, None, :],
                                                        "point_labels": np.ones((len(chosen), 1), np.float32)})
            masks.append(got[0])
            ious.append(got[1])
        return np.concatenate(masks), np.concatenate(ious)

    def segment(self, rgb: np.ndarray) -> list[Part]:
        height, width = rgb.shape[:2]
        scale = self.side / max(height, width)
        valid = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        points = self.points(height, width)
        try:
            masks, ious = self._run(self._input(rgb), points)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types: this frame fails, not the run
            raise MradError(f"segmenter {self.path.name} failed on this frame ({str(exc)[:200]})") from exc
        self._check_outputs(masks, ious, len(points))
        best = np.argmax(ious, axis=1)
        candidates = []
        for n in np.flatnonzero(ious[np.arange(len(best)), best] >= self.settings.predicted_iou):
            logits = masks[n, best[n]]
            if logits.shape != (self.side, self.side):
                logits = cv2.resize(logits, (self.side, self.side), interpolation=cv2.INTER_LINEAR)
            logits = cv2.resize(np.ascontiguousarray(logits[: valid[1], : valid[0]]), (width, height),
                                interpolation=cv2.INTER_LINEAR)
            mask = logits > 0
            if not _within_limits(int(mask.sum()), (height, width), self.settings):
                continue
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            candidates.append((float(ious[n, best[n]]), Part(box, mask[box[1] : box[3], box[0] : box[2]],
                                                             float(ious[n, best[n]]))))
        kept: list[Part] = []
        for _, part in sorted(candidates, key=lambda c: -c[0]):  # stable: equal predictions keep grid order
            if all(box_iou(part.box, other.box) <= self.settings.nms_iou for other in kept):
                kept.append(part)
        return _reading_order(kept)


    def _check_outputs(self, masks, ious, prompts: int) -> None:
        """A user's model answers what the contract says, or the frame fails with one line naming it."""
        ok = (isinstance(masks, np.ndarray) and isinstance(ious, np.ndarray) and masks.ndim == 4 and ious.ndim == 2
              and masks.shape[:2] == ious.shape and len(ious) == prompts and masks.shape[1] >= 1
              and 0 < masks.shape[2] <= MAX_MASK_SIDE and 0 < masks.shape[3] <= MAX_MASK_SIDE
              and np.issubdtype(masks.dtype, np.floating) and np.issubdtype(ious.dtype, np.floating)
              and bool(np.isfinite(ious).all()))
        if not ok:
            shapes = f"masks {getattr(masks, 'shape', '?')}, iou_predictions {getattr(ious, 'shape', '?')}"
            raise MradError(f"segmenter {self.path.name} answered {shapes} for {prompts} prompts; the contract is "
                            f"masks NxMxhxw float logits (h, w at most {MAX_MASK_SIDE}) and iou_predictions NxM, "
                            "finite")


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def open_segmenter(settings: ObjectSettings, background: Background | None, providers: Sequence = ("CPUExecutionProvider",)
                   ) -> Segmenter:
    """The segmenter an enrollment names; an ONNX file must still have the sha256 it was enrolled with."""
    if settings.segmenter == "auto":
        if background is None:
            raise MradError("the auto segmenter has no background model: enroll normal images with --objects auto")
        return AutoSegmenter(settings, background)
    path = Path(settings.model)
    # read once, checked and loaded from the same bytes: the file cannot be swapped between the two
    model = read_regular(path, what="segmenter") if path.is_file() else None
    if model is None or hashlib.sha256(model).hexdigest() != settings.model_sha256:
        raise MradError(f"segmenter {path} is missing or is not the file enrolled with (sha256 "
                        f"{settings.model_sha256[:12]}...); put that file back, or --clear and enroll again")
    return OnnxSegmenter(path, settings, providers, model)


# -- crops --------------------------------------------------------------------------------------


def crop_transform(part: Part, side: int, margin: float, upright: bool) -> np.ndarray:
    """The 2x3 affine map from frame pixels to the crop's: the part centred, turned upright, scaled to fit ``side``."""
    ys, xs = np.nonzero(part.mask)
    xs = xs.astype(np.float64) + part.box[0]
    ys = ys.astype(np.float64) + part.box[1]
    cx, cy = xs.mean(), ys.mean()
    dx, dy = xs - cx, ys - cy
    angle = 0.0
    if upright:
        mu20, mu02, mu11 = (dx * dx).mean(), (dy * dy).mean(), (dx * dy).mean()
        spread = math.hypot(mu20 - mu02, 2 * mu11)
        low, high = (mu20 + mu02 - spread) / 2, (mu20 + mu02 + spread) / 2
        if high > ELONGATED * max(low, 1e-9):
            angle = 0.5 * math.atan2(2 * mu11, mu20 - mu02)
    cos, sin = math.cos(angle), math.sin(angle)
    along, across = cos * dx + sin * dy, -sin * dx + cos * dy
    half = (max(np.abs(along).max(), np.abs(across).max()) + 0.5) * (1 + 2 * margin)
    scale = side / (2 * half)
    centre = (side - 1) / 2
    return np.array([[scale * cos, scale * sin, centre - scale * (cos * cx + sin * cy)],
                     [-scale * sin, scale * cos, centre - scale * (-sin * cx + cos * cy)]], np.float64)


def crop(rgb: np.ndarray, part: Part, transform: np.ndarray, side: int, fill: Sequence[int]
         ) -> tuple[np.ndarray, np.ndarray]:
    """The part's crop (side x side x 3 uint8, the outside filled) and its mask in the crop (bool)."""
    image = cv2.warpAffine(rgb, transform, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=tuple(int(v) for v in fill))
    boxed = transform.copy()
    boxed[:, 2] += transform[:, :2] @ np.array(part.box[:2], np.float64)
    mask = cv2.warpAffine(part.mask.astype(np.float32), boxed, (side, side), flags=cv2.INTER_LINEAR) >= 0.5
    image[~mask] = np.asarray(fill, np.uint8)
    return image, mask


def part_weight(mask: np.ndarray) -> np.ndarray:
    """A part's weight in the fused map, in crop pixels: its mask dilated and feathered, in [0, 1]."""
    reach = max(1, int(round(FEATHER * mask.shape[0])))
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(grown, (0, 0), reach), 0.0, 1.0)


def part_patches(weight: np.ndarray, grid: int) -> np.ndarray:
    """(G*G,) bool: the crop's patches a part's weight reaches; only these join the per-part memory and are scored.

    The filled-in rest of a crop is the same everywhere: thousands of
    duplicates would add nothing but search time (and hnswlib finds
    duplicates poorly), and the fused map gives it no weight anyway. At
    scoring its patches count as normal (0), so that the map's smoothing
    carries nothing from them into the part.
    """
    cells = weight.reshape(grid, weight.shape[0] // grid, grid, weight.shape[1] // grid) if weight.shape[0] % grid == 0 \
        else cv2.resize(weight, (grid * 8, grid * 8), interpolation=cv2.INTER_LINEAR).reshape(grid, 8, grid, 8)
    return (cells.max(axis=(1, 3)) > REACHED).ravel()


def paste(maps: np.ndarray, transform: np.ndarray, frame: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop-space maps (k, side, side) -> the same in a target of ``size`` (h, w) over a frame of ``frame`` (h, w).

    The target covers the whole frame at another resolution (the bundle's
    input, or a display size); pixel centres are kept aligned.
    """
    (height, width), (h, w) = frame, size
    sx, sy = w / width, h / height
    to_target = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], np.float64)
    inverse = np.vstack([cv2.invertAffineTransform(transform), [0, 0, 1]])
    combined = (to_target @ inverse)[:2]
    side = maps.shape[-1]
    corners = combined @ np.array([[0, side - 1, 0, side - 1], [0, 0, side - 1, side - 1], [1, 1, 1, 1]], np.float64)
    x0, y0 = (max(0, int(math.floor(v)) - 1) for v in corners.min(axis=1))
    x1, y1 = min(w, int(math.ceil(corners[0].max())) + 2), min(h, int(math.ceil(corners[1].max())) + 2)
    out = np.zeros((len(maps), h, w), np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    shifted = combined.copy()
    shifted[:, 2] -= (x0, y0)
    for i, m in enumerate(maps):
        out[i, y0:y1, x0:x1] = cv2.warpAffine(m.astype(np.float32), shifted, (x1 - x0, y1 - y0),
                                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


# -- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartVerdict:
    """One part of a frame at scoring: where it is, its crop geometry, and the part memory's values."""

    part: Part
    transform: np.ndarray  # frame -> crop
    weight: np.ndarray  # (side, side) crop-space weight in the fused map
    patch: np.ndarray  # (G*G,) target values of its crop's patches
    image: float  # its image-level target value


@dataclass(frozen=True)
class FoundObject:
    """A part as a result lists it: its box in the frame (x0, y0, x1, y1) and its score."""

    box: tuple[int, int, int, int]
    score: float

    def to_dict(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 6)}


def count_range(counts: Sequence[int], tolerance: int) -> tuple[int, int]:
    """The part counts a normal frame may show: the enrolled ones, widened by the tolerance."""
    return max(0, min(counts) - tolerance), max(counts) + tolerance


class Scene:
    """A batch's parts at scoring, and how they change its maps and scores (module docstring's formula).

    ``parts[i]``: the verdicts of image ``i``; ``frames[i]``: its (height,
    width); ``global_patch``: (batch, G*G) the global target values ``t_g``;
    ``enrolled_weight``: the enrollment's map weight ``a``; ``allowed``: the
    part counts a normal frame may show.
    """

    def __init__(self, parts: Sequence[Sequence[PartVerdict]], frames: Sequence[tuple[int, int]],
                 global_patch: np.ndarray, enrolled_weight: float, settings: ObjectSettings, scorer,
                 allowed: tuple[int, int]):
        self.parts, self.frames, self.global_patch = [list(p) for p in parts], list(frames), global_patch
        self.gain = enrolled_weight * settings.map_weight
        self.settings, self.scorer, self.allowed = settings, scorer, allowed
        # Each part's crop map (spec section 4's map, in the crop) and weight, made once for every target size.
        self._crops = [[np.stack([scorer.input_maps(v.patch[None])[0], v.weight]) for v in image] for image in self.parts]

    def _blend(self, i: int, base: np.ndarray, global_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if not self.parts[i]:
            return base
        pasted = sum(paste(c, v.transform, self.frames[i], size) for c, v in zip(self._crops[i], self.parts[i]))
        weight = pasted[1]
        crowded = weight > 1.0  # feathered edges of neighbouring parts overlap: their maps are averaged there
        values = np.where(crowded, pasted[0] / np.maximum(weight, 1e-12), pasted[0])
        weight = np.minimum(weight, 1.0)
        return (base + self.gain * (values - weight * global_map)).astype(np.float32)

    def input_maps(self, maps: np.ndarray) -> np.ndarray:
        """(batch, S, S) fused global maps -> with each image's parts fused in."""
        side = maps.shape[-1]
        targets = self.scorer.input_maps(self.global_patch)
        return np.stack([self._blend(i, maps[i], targets[i], (side, side)) for i in range(len(maps))])

    def display_map(self, i: int, base: np.ndarray) -> np.ndarray:
        """Image ``i``'s fused global map at some size -> with its parts fused in."""
        size = base.shape
        target = self.scorer.maps_at(self.global_patch[i : i + 1], *size)[0]
        return self._blend(i, base, target, size)

    def image_probabilities(self, image: np.ndarray) -> np.ndarray:
        e = self.settings.image_weight
        worst = np.array([max((v.image for v in parts), default=0.0) for parts in self.parts], np.float32)
        has = np.array([bool(parts) for parts in self.parts])
        return np.where(has, (1 - e) * image + e * worst, image).astype(np.float32)

    def found(self, i: int) -> tuple[FoundObject, ...]:
        """Image ``i``'s parts with their own scores (module docstring)."""
        if not self.parts[i]:
            return ()
        crop_maps = np.stack([c[0] for c in self._crops[i]])
        scores = self.scorer.image_scores(crop_maps, np.array([v.image for v in self.parts[i]], np.float32))
        return tuple(FoundObject(v.part.box, float(s)) for v, s in zip(self.parts[i], scores))

    def count_ok(self, i: int) -> bool:
        count = len(self.parts[i])
        return count <= defaults.OBJECT_MAX_PARTS and self.allowed[0] <= count <= self.allowed[1]
