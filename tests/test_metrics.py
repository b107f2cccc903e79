"""Metrics against independent computations: scikit-learn, and brute force over thresholds."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from mrad.tools.metrics import aupro, auroc, average_precision, f1_max

TOLERANCE = 1e-9  # the same sums in another order


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=300).astype(bool)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding makes ties
    return labels, scores


def test_auroc_and_ap_match_sklearn(scored):
    labels, scores = scored
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=TOLERANCE)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=TOLERANCE)


def test_f1_max_matches_sklearn_curve(scored):
    labels, scores = scored
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall + 1e-300), 0)
    assert f1_max(labels, scores) == pytest.approx(f1.max(), abs=TOLERANCE)


def test_known_answers():
    labels = np.array([0, 0, 0, 1, 1], dtype=bool)
    perfect = labels.astype(float)
    assert auroc(labels, perfect) == 1 and average_precision(labels, perfect) == 1 and f1_max(labels, perfect) == 1
    assert auroc(labels, -perfect) == 0
    constant = np.zeros(5)
    assert auroc(labels, constant) == 0.5
    assert average_precision(labels, constant) == pytest.approx(0.4)  # the share of anomalous samples
    assert f1_max(labels, constant) == pytest.approx(2 * 0.4 / 1.4)


def brute_force_aupro(masks, maps, max_fpr=0.3):
    """PRO and FPR recomputed from scratch at every distinct threshold, regions from scipy."""
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    points = [(0.0, 0.0)]
    normal_total = sum((~m).sum() for m in masks)
    for t in thresholds:
        overlaps, false_positives = [], 0
        for mask, amap in zip(masks, maps):
            above = amap >= t
            regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
            overlaps += [above[regions == r].mean() for r in range(1, count + 1)]
            false_positives += (above & ~mask).sum()
        points.append((false_positives / normal_total, np.mean(overlaps)))
    fpr, pro = map(np.array, zip(*points))
    grid_fpr = np.r_[fpr[fpr <= max_fpr], max_fpr]
    grid_pro = np.r_[pro[fpr <= max_fpr], np.interp(max_fpr, fpr, pro)]
    return np.trapezoid(grid_pro, grid_fpr) / max_fpr


def test_aupro_matches_brute_force():
    rng = np.random.default_rng(1)
    masks, maps = [], []
    for _ in range(3):
        mask = np.zeros((20, 24), dtype=bool)
        mask[3:7, 4:9] = True
        mask[12:15, 15:22] = True  # two regions of different sizes
        mask[18, 0] = True
        masks.append(mask)
        maps.append(np.round(mask * 0.6 + rng.uniform(size=mask.shape), 2))
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


def test_aupro_known_answers():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:5, 2:5] = True
    assert aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert aupro([mask], [-mask.astype(float)]) == pytest.approx(0.0)
    # one threshold takes every pixel: the curve is the diagonal, its area up to 0.3 is 0.045, divided by 0.3
    assert aupro([mask], [np.zeros((10, 10))]) == pytest.approx(0.15)
