"""Image in, encoder input out; ground-truth masks binarised (spec section 1).

Resizing goes through Pillow because the reference resizes PIL images with
torchvision, which hands the work to Pillow: same resampler, same pixels.
The export stage and mrad-eval use this module too, so memory, queries and
metrics see identical inputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import defaults
from .bundle import Preprocess
from .errors import ImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

_RESAMPLERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_rgb(image: ImageLike) -> Image.Image:
    """Accept a path, a PIL image or an HxWx3 uint8 RGB array; return an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(
                f"image array must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}; "
                "convert it (OpenCV frames are BGR: use frame[..., ::-1])"
            )
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except FileNotFoundError as exc:
            raise ImageError(f"image not found: {path}") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageError(f"image could not be decoded: {path} ({exc}); check the file is a complete image") from exc
    raise ImageError(f"unsupported image type {type(image).__name__}: pass a path, a PIL image or an HxWx3 uint8 array")


def to_input(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB PIL image -> float32 array (3, S, S), resized and normalised."""
    side = spec.image_size
    resized = image.resize((side, side), _RESAMPLERS[spec.resample])
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def load_mask(mask: str | os.PathLike | np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """A ground-truth mask (a file or an HxW array) as booleans, binarised as the reference does.

    Binarised at its own resolution (> 0); with ``size`` (height, width),
    resized bilinearly by Pillow (as torchvision does for PIL masks) and
    binarised again (> 0.5).
    """
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2 or mask.size == 0:
            raise ImageError(f"mask array must be HxW, got shape {mask.shape}")
        raw = mask > 0
    else:
        try:
            with Image.open(mask) as opened:
                raw = np.asarray(opened.convert("L")) > 0
        except FileNotFoundError as exc:
            raise ImageError(f"mask not found: {mask}") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageError(f"mask could not be decoded: {mask} ({exc}); check the file is a complete image") from exc
    if size is None:
        return raw
    binary = Image.fromarray(raw.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(binary.resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return resized > defaults.MASK_THRESHOLD
