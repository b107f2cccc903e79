"""Image in, encoder input out; ground-truth masks binarised (spec section 1).

Resizing goes through Pillow because the reference resizes PIL images with
torchvision, which hands the work to Pillow: same resampler, same pixels.
The export stage and mrad-eval use this module too, so memory, queries and
metrics see identical inputs.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .. import defaults
from .bundle import Preprocess
from ..errors import ImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]

_RESAMPLERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_rgb(image: ImageLike, max_pixels: int = defaults.MAX_IMAGE_PIXELS) -> Image.Image:
    """Accept a path, a PIL image, an HxWx3 uint8 RGB array or an encoded file's bytes; return an RGB PIL image.

    Every mode Pillow decodes becomes 8-bit RGB by one stated rule (see
    :func:`to_8bit_rgb`) or is refused with :class:`ImageError`; so is an
    image of more than ``max_pixels`` pixels, from its header, before any
    decoding (decompression bombs), and a path that is not a regular file.
    """
    if isinstance(image, Image.Image):
        return _decoded(image, "image", max_pixels, lambda opened: to_8bit_rgb(opened, "image"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ImageError(
                f"image array must be HxWx3 uint8 RGB with H, W >= 1, got shape {image.shape} dtype {image.dtype}; "
                "convert it (OpenCV frames are BGR: use frame[..., ::-1])"
            )
        _check_pixels((image.shape[1], image.shape[0]), max_pixels, "image array")
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    if isinstance(image, (str, os.PathLike)):
        return _decoded(Path(image), f"image {image}", max_pixels, lambda opened: to_8bit_rgb(opened, str(image)))
    if isinstance(image, (bytes, bytearray, memoryview)):  # an upload (mrad-serve): the file's guards, no file
        return _decoded(io.BytesIO(image), "image", max_pixels, lambda opened: to_8bit_rgb(opened, "image"))
    raise ImageError(f"unsupported image type {type(image).__name__}: pass a path, a PIL image, an HxWx3 uint8 array "
                     "or an image file's bytes")


def _decoded(source: Image.Image | Path | io.BytesIO, what: str, max_pixels: int, read):
    """``read`` applied to ``source`` (a PIL image, or a file or bytes opened here), every way it can fail an ImageError.

    A file must be a regular file (a FIFO would block the line); the pixel
    limit is checked from the header, before anything is decoded.
    """
    try:
        if isinstance(source, Image.Image):
            _check_pixels(source.size, max_pixels, what)
            return read(source)  # a lazily opened image decodes here
        if isinstance(source, Path) and not stat.S_ISREG(os.stat(source).st_mode):
            raise ImageError(f"{what} is not a regular file")
        with Image.open(source) as opened:
            _check_pixels(opened.size, max_pixels, what)
            return read(opened)
    except (ImageError, MemoryError):
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{what} not found") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own header check, at twice its limit
        raise ImageError(f"{what} has more pixels than the limit ({exc})") from exc
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ... for bad files
        detail = str(exc).replace(repr(source), "<bytes>")  # Pillow names a file by its repr: an address for bytes
        raise ImageError(f"{what} could not be decoded ({type(exc).__name__}: {detail}); check the file is a complete "
                         "image") from exc


def _mask_values(opened: Image.Image) -> np.ndarray:
    """> 0 at the mask's own depth: a 16-bit or float mask of 0/1 keeps its ones."""
    deep = opened.mode.startswith("I") or opened.mode == "F"
    return (np.asarray(opened) if deep else np.asarray(opened.convert("L"))) > 0


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{what} is empty ({width} x {height})")
    if max(width, height) > defaults.MAX_IMAGE_SIDE:
        raise ImageError(f"{what} is {width} x {height}; sides above {defaults.MAX_IMAGE_SIDE:,} pixels are refused")
    if width * height > max_pixels:
        raise ImageError(f"{what} has {width} x {height} = {width * height:,} pixels, more than the limit of "
                         f"{max_pixels:,}; raise the limit (--max-pixels) if such frames are expected")


def to_8bit_rgb(image: Image.Image, what: str) -> Image.Image:
    """The rule for every mode Pillow decodes:

    - 8-bit modes (L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, LAB, HSV, 1): Pillow's
      own conversion to RGB; an alpha channel is dropped, not composited.
    - 16-bit grey (I;16 and its byte orders) and 32-bit integer grey (I)
      holding values in 0..65535: scaled to 8 bits over the full 16-bit range
      (value * 255 / 65535, rounded); I with values outside 0..65535 is refused.
    - 32-bit float grey (F): values in [0, 1] are scaled by 255; anything else
      (including NaN) is refused, since no range can be assumed.
    - Anything else is refused.
    """
    mode = image.mode
    if mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f"{what} is a 32-bit integer image with values {values.min():.0f}..{values.max():.0f}; "
                             "only values in 0..65535 (16-bit) are read")
        grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ImageError(f"{what} is a floating-point image with values outside [0, 1] (or NaN); scale it to "
                             "[0, 1] or to 8 bits first")
        grey = np.rint(values * 255.0).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")
    raise ImageError(f"{what} has pixel mode {mode!r}, which this runtime does not read; save it as 8- or 16-bit")


_EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass(frozen=True)
class Prepared:
    """An image made ready for the encoder ahead of scoring (``Detector.prepare``), in a reader thread, say."""

    input: np.ndarray  # (3, S, S) float32, as to_input makes it
    size: tuple[int, int]  # the image's own (height, width): its map's size
    frame: np.ndarray | None = None  # the HxWx3 uint8 RGB frame, kept when parts are to be segmented


def to_input(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB PIL image -> float32 array (3, S, S), resized and normalised."""
    side = spec.image_size
    resized = image.resize((side, side), _RESAMPLERS[spec.resample])
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def load_mask(mask: str | os.PathLike | np.ndarray, size: tuple[int, int] | None,
              image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask (a file or an HxW array) as booleans, binarised as the reference does.

    Binarised at its own resolution (> 0); with ``size`` (height, width),
    resized bilinearly by Pillow (as torchvision does for PIL masks) and
    binarised again (> 0.5). ``image_size`` (height, width): the size of the
    image it marks, which the mask must have (a mask of another size marks
    other pixels).
    """
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2 or mask.size == 0:
            raise ImageError(f"mask array must be HxW, got shape {mask.shape}")
        raw = mask > 0
    else:
        raw = _decoded(Path(mask), f"mask {mask}", defaults.MAX_IMAGE_PIXELS, _mask_values)
    if image_size is not None and raw.shape != tuple(image_size):
        shown = "array" if isinstance(mask, np.ndarray) else str(mask)
        raise ImageError(f"mask {shown} is {raw.shape[1]}x{raw.shape[0]}; its image is {image_size[1]}x{image_size[0]}: "
                         "a mask must be the size of its image")
    if size is None:
        return raw
    binary = Image.fromarray(raw.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(binary.resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return resized > defaults.MASK_THRESHOLD
