"""Heatmap overlays for people: the anomaly map coloured and blended over the image."""

from __future__ import annotations

import numpy as np

from .preprocess import ImageLike, load_rgb

# A blue -> cyan -> green -> yellow -> red ramp, enough to read a heatmap at a glance.
STRIP_ROWS = 256  # rows blended at a time
_RAMP = np.array([[0, 0, 128], [0, 160, 255], [0, 200, 80], [255, 220, 0], [220, 0, 0]], dtype=np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> HxWx3 uint8 colours."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(position.astype(np.int64), len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def overlay(image: ImageLike, anomaly_map: np.ndarray, alpha: float = 0.5, vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:
    """Blend the coloured map over the image; returns HxWx3 uint8 RGB at the image's size.

    ``vmin``/``vmax`` fix the colour scale (use the same pair for every frame
    of a line to compare frames); by default each map spans its own range.
    """
    rgb = np.asarray(load_rgb(image))
    if anomaly_map.shape != rgb.shape[:2]:
        raise ValueError(f"map of shape {anomaly_map.shape} does not fit an image of {rgb.shape[1]}x{rgb.shape[0]}")
    low = float(anomaly_map.min()) if vmin is None else vmin
    high = float(anomaly_map.max()) if vmax is None else vmax
    blended = np.empty(rgb.shape, dtype=np.uint8)
    # in strips of rows: an 81-megapixel frame's float copies would otherwise take gigabytes at once
    for top in range(0, rgb.shape[0], STRIP_ROWS):
        rows = slice(top, top + STRIP_ROWS)
        scaled = (anomaly_map[rows] - low) / (high - low) if high > low else np.zeros_like(anomaly_map[rows])
        blended[rows] = (rgb[rows].astype(np.float32) * (1 - alpha)
                         + colorize(scaled).astype(np.float32) * alpha).astype(np.uint8)
    return blended
