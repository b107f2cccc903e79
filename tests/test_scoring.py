"""Map operators against PyTorch and SciPy, the libraries the reference uses."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

from mrad.runtime.core.bundle import Scoring
from mrad.runtime.core.maps import MapScorer, bilinear_matrix, gaussian_matrix
from mrad.tools.reference import spec_map, spec_score

TOLERANCE = 1e-5  # float32 results of the same linear maps


@pytest.mark.parametrize("out_size,in_size", [(518, 37), (112, 8), (37, 518), (96, 112), (7, 7), (1, 5)])
def test_bilinear_matrix_is_torch_interpolate(out_size, in_size):
    signal = np.random.default_rng(0).normal(size=in_size)
    want = F.interpolate(torch.from_numpy(signal)[None, None], size=out_size, mode="linear", align_corners=False)
    np.testing.assert_allclose(bilinear_matrix(out_size, in_size) @ signal, want[0, 0].numpy(), atol=1e-12)


@pytest.mark.parametrize("size,sigma", [(518, 4.0), (112, 4.0), (9, 4.0), (3, 4.0), (50, 1.5)])
def test_gaussian_matrix_is_scipy_reflect(size, sigma):
    signal = np.random.default_rng(1).normal(size=size)
    want = gaussian_filter1d(signal, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(gaussian_matrix(size, sigma, 4.0) @ signal, want, atol=1e-12)


SCORING = Scoring(grid=8)  # the spec's constants


def test_map_scorer_is_the_spec():
    grid, size = SCORING.grid, 112
    scorer = MapScorer(size, SCORING)
    probs = np.random.default_rng(2).uniform(size=(2, grid * grid)).astype(np.float32)
    maps = scorer.input_maps(probs)
    scores = scorer.image_scores(maps, np.array([0.3, 0.3], dtype=np.float32))
    for i in range(2):
        want_map = spec_map(torch.from_numpy(probs[i]), grid, size, SCORING)
        np.testing.assert_allclose(maps[i], want_map, atol=TOLERANCE)
        assert scores[i] == pytest.approx(spec_score(want_map, 0.3, SCORING), abs=TOLERANCE)


def test_spec_constants_are_the_defaults():
    assert (SCORING.image_weight, SCORING.sigma, SCORING.truncate, SCORING.top_fraction) == (0.7, 4.0, 4.0, 0.01)


def test_display_map_is_the_spec_map_resized():
    grid, size = SCORING.grid, 112
    scorer = MapScorer(size, SCORING)
    probs = np.random.default_rng(3).uniform(size=(1, grid * grid)).astype(np.float32)
    spec_map = torch.from_numpy(scorer.input_maps(probs)[None].astype(np.float64))
    want = F.interpolate(spec_map, size=(96, 130), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(scorer.maps_at(probs, 96, 130)[0], want, atol=TOLERANCE)
