"""Detection metrics of spec section 7, computed exactly from sorted scores.

Each curve is evaluated at every distinct score (no threshold grid), so the
figures do not depend on a sampling choice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _counts_at_thresholds(labels, scores) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Cumulative true and false positives when every distinct score, highest first, becomes the threshold."""
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("these metrics need both normal and anomalous samples")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]  # last index of each distinct score
    tp = np.cumsum(sorted_labels)[ends]
    fp = (ends + 1) - tp
    return tp, fp, positives, negatives


def auroc(labels, scores) -> float:
    """Area under the ROC curve (trapezoids: ties count half)."""
    tp, fp, positives, negatives = _counts_at_thresholds(labels, scores)
    tpr = np.r_[0.0, tp / positives]
    fpr = np.r_[0.0, fp / negatives]
    return float(np.trapezoid(tpr, fpr))


def average_precision(labels, scores) -> float:
    """Sum over thresholds of precision times recall gained (no interpolation)."""
    tp, fp, positives, _ = _counts_at_thresholds(labels, scores)
    precision = tp / (tp + fp)
    recall = np.r_[0.0, tp / positives]
    return float(np.sum(np.diff(recall) * precision))


def f1_max(labels, scores) -> float:
    """Best F1 over all thresholds."""
    tp, fp, positives, _ = _counts_at_thresholds(labels, scores)
    precision, recall = tp / (tp + fp), tp / positives
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return float(f1.max())


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, divided by ``max_fpr`` (range 0..1).

    Regions are the 8-connected components of each ground-truth mask. At a
    threshold, PRO is the mean over all regions of the share of the region
    above it, and FPR the share of normal pixels above it.
    """
    import cv2

    weights, scores, normal = [], [], []
    region_count = 0
    for mask, amap in zip(masks, maps):
        mask = np.asarray(mask, dtype=bool)
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        sizes = np.bincount(labels.ravel(), minlength=count).astype(np.float64)
        region_weight = np.where(labels > 0, 1.0 / sizes[labels], 0.0)  # 1/|region| inside, 0 outside
        region_count += count - 1
        weights.append(region_weight.ravel())
        normal.append(~mask.ravel())
        scores.append(np.asarray(amap, dtype=np.float64).ravel())
    if region_count == 0:
        raise ValueError("AUPRO needs at least one anomalous region")
    weights, scores, normal = np.concatenate(weights), np.concatenate(scores), np.concatenate(normal)
    if not normal.any():
        raise ValueError("AUPRO needs normal pixels")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    pro = np.r_[0.0, np.cumsum(weights[order])[ends] / region_count]
    fpr = np.r_[0.0, np.cumsum(normal[order])[ends] / normal.sum()]
    # Cut the curve at max_fpr, interpolating the point where it crosses.
    last = np.searchsorted(fpr, max_fpr, side="right") - 1  # fpr only grows
    cut_fpr, cut_pro = fpr[: last + 1], pro[: last + 1]
    if cut_fpr[-1] < max_fpr:
        share = (max_fpr - fpr[last]) / (fpr[last + 1] - fpr[last])
        cut_pro = np.r_[cut_pro, pro[last] + share * (pro[last + 1] - pro[last])]
        cut_fpr = np.r_[cut_fpr, max_fpr]
    return float(np.trapezoid(cut_pro, cut_fpr) / max_fpr)


def segmentation_scores(found: Sequence[np.ndarray], labels: np.ndarray) -> tuple[bool, list[float]]:
    """A segmenter's parts (full-frame boolean masks) against a label image (0 background, 1..n parts).

    Returns whether the counts agree, and per true part the IoU of the found
    part that overlaps it best (0 when none does).
    """
    ious = []
    for value in (v for v in np.unique(labels) if v != 0):
        truth = labels == value
        best = 0.0
        for mask in found:
            union = np.logical_or(truth, mask).sum()
            best = max(best, float(np.logical_and(truth, mask).sum() / union) if union else 0.0)
        ious.append(best)
    return len(found) == len(ious), ious
