"""MRAD-CLIP's patch map: patch projections aligned with text features biased by region priors (spec section 6).

Between retrieval and the map pipeline, for a ``clip`` bundle:

    A = patches whose pixel-memory share m > prior_threshold, N = the others
    priors = [mean of P over N, mean of P over A]        zeros for an empty region
    T = text graph(priors)                                (2, D), normalised
    s = softmax(P T^T / temperature) per patch
    m_clip = (s_anomalous + 1 - s_normal) / 2

``P`` is the encoder's normalised, smoothed patch projection output. The image
branch (``p_img``) is MRAD-FT's, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import Manifest, TextScoring
from .graphs import Providers, open_graph


class TextAlignment:
    """The text stage of a ``clip`` bundle: its settings and the runner of its text graph."""

    def __init__(self, settings: TextScoring, runner):
        self.settings = settings
        self.runner = runner
        self._input, self._output = runner.graph.inputs[0].name, runner.graph.outputs[0].name

    @classmethod
    def open(cls, directory: Path, manifest: Manifest, provider: Providers = "auto",
             session_options=None) -> "TextAlignment | None":
        """The bundle's text stage, or None for a bundle without one (TF, FT)."""
        settings = manifest.scoring.text
        if settings is None:
            return None
        runner = open_graph(directory, settings.graph, manifest.graphs[settings.graph], provider, session_options)
        return cls(settings, runner)

    @property
    def projection(self) -> str:
        """The encoder output this stage reads."""
        return self.settings.projection

    def text_features(self, priors: np.ndarray) -> np.ndarray:
        """Run the text graph: (batch, 2, D) priors -> (batch, 2, D) normalised text features."""
        return self.runner.run([self._output], {self._input: np.ascontiguousarray(priors, dtype=np.float32)})[self._output]

    def __call__(self, patch_share: np.ndarray, projections: np.ndarray) -> np.ndarray:
        """The whole stage: pixel-memory shares and patch projections -> MRAD-CLIP's patch shares."""
        settings = self.settings
        text = self.text_features(region_priors(patch_share, projections, settings.prior_threshold))
        return text_shares(text, projections, settings.temperature)


def region_priors(patch_share: np.ndarray, projections: np.ndarray, threshold: float) -> np.ndarray:
    """(batch, patches) shares and (batch, patches, D) projections -> (batch, 2, D) [normal, anomalous] means."""
    anomalous = (patch_share > threshold).astype(np.float32)
    regions = np.stack([1.0 - anomalous, anomalous], axis=1)  # (batch, 2, patches)
    sums = regions @ projections  # (batch, 2, D)
    counts = regions.sum(axis=2, keepdims=True)
    return (sums / np.maximum(counts, 1.0)).astype(np.float32)  # an empty region sums to zeros


def text_shares(text: np.ndarray, projections: np.ndarray, temperature: float) -> np.ndarray:
    """Anomalous share per patch from its similarities to the (batch, 2, D) text features, (batch, patches)."""
    logits = projections @ text.transpose(0, 2, 1) / temperature  # (batch, patches, 2)
    logits -= logits.max(axis=2, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=2, keepdims=True)
    return ((weights[..., 1] + 1.0 - weights[..., 0]) / 2.0).astype(np.float32)
