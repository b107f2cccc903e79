"""From patch probabilities to an anomaly map and an image score (spec section 4).

Both steps of the map, the bilinear G -> S resize (align_corners=False) and the
Gaussian filter (scipy's defaults: mode "reflect", truncate 4), are linear and
separable, so each is a matrix applied to rows and columns. Their product is a
small (S x G) matrix built once: ``map = A @ m @ A.T`` costs a few million
multiply-adds instead of a 518 x 518 convolution per frame.
"""

from __future__ import annotations

import numpy as np

from .bundle import Scoring

# A line camera has one frame size; a folder of mixed images a handful.
_DISPLAY_CACHE_SIZE = 16


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix of a 1-D bilinear resize, align_corners=False, no antialiasing."""
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def bilinear_rows(out_size: int, matrix: np.ndarray) -> np.ndarray:
    """``bilinear_matrix(out_size, len(matrix)) @ matrix`` without the dense (out x in) resize matrix.

    Each output row mixes two rows of ``matrix``; for a tall frame this keeps
    the work and memory at out x columns instead of out x in.
    """
    in_size = len(matrix)
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = (src - low)[:, None]
    return matrix[low] * (1.0 - frac) + matrix[high] * frac


def gaussian_matrix(size: int, sigma: float, truncate: float) -> np.ndarray:
    """(size, size) matrix of scipy.ndimage.gaussian_filter1d with mode='reflect'."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    # scipy's "reflect" repeats the edge sample (d c b a | a b c d), numpy's "symmetric".
    source = np.pad(np.arange(size), radius, mode="symmetric")
    matrix = np.zeros((size, size), dtype=np.float64)
    for k, w in enumerate(weights):
        np.add.at(matrix, (np.arange(size), source[k : k + size]), w)
    return matrix


class MapScorer:
    """Turns (batch, G*G) patch probabilities into maps and image scores."""

    def __init__(self, image_size: int, scoring: Scoring):
        self.grid = grid = scoring.grid
        self.image_size = image_size
        self.image_weight = scoring.image_weight
        self.top_count = int(image_size * image_size * scoring.top_fraction)
        gauss = gaussian_matrix(image_size, scoring.sigma, scoring.truncate)
        self._to_input = (gauss @ bilinear_matrix(image_size, grid)).astype(np.float32)
        self._display_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def input_maps(self, patch_probs: np.ndarray) -> np.ndarray:
        """(batch, G*G) -> (batch, S, S) smoothed maps, the spec's map."""
        grids = patch_probs.reshape(-1, self.grid, self.grid).astype(np.float32)
        return self._to_input @ grids @ self._to_input.T

    def image_scores(self, maps: np.ndarray, image_probs: np.ndarray) -> np.ndarray:
        """(1 - k) * mean(top 1% of map) + k * p_img, per image."""
        flat = maps.reshape(len(maps), -1)
        top = np.partition(flat, flat.shape[1] - self.top_count, axis=1)[:, -self.top_count :]
        return (1.0 - self.image_weight) * top.mean(axis=1) + self.image_weight * image_probs

    def maps_at(self, patch_probs: np.ndarray, height: int, width: int) -> np.ndarray:
        """(batch, G*G) -> (batch, height, width): the spec's map resized bilinearly to an image's size.

        Composing the display resize with the map operator keeps the work
        proportional to height * width * G, not height * width * S.
        """
        rows, cols = self._operators(height, width)
        grids = patch_probs.reshape(-1, self.grid, self.grid).astype(np.float32)
        return rows @ grids @ cols.T

    def _operators(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        key = (height, width)
        operators = self._display_cache.get(key)  # no check-then-get: other threads may clear the cache
        if operators is None:
            to_input = self._to_input.astype(np.float64)
            operators = (bilinear_rows(height, to_input).astype(np.float32),
                         bilinear_rows(width, to_input).astype(np.float32))
            if len(self._display_cache) >= _DISPLAY_CACHE_SIZE:
                self._display_cache.clear()
            self._display_cache[key] = operators
        return operators
