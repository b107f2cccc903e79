"""The PyTorch rendering of a bundle's method, run the way research code runs it.

Eager PyTorch encoder, exact softmax over the memory in torch, maps resized
with ``F.interpolate`` and smoothed with SciPy's ``gaussian_filter``: the
baseline that ``mrad-bench`` compares the runtime against, on the same
weights and memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mrad.export import artefacts
from mrad.export.encoder import MradEncoder, QueryGraph
from mrad.export.models import load_image_tower
from mrad.runtime import Detector, MradError


class TorchReference:
    """``scores(batch)`` for a (B, 3, S, S) float32 batch, on ``device``."""

    def __init__(self, detector: Detector, pretrained: str | None = None, ft_checkpoint: Path | None = None,
                 device: str = "cpu"):
        manifest = detector.manifest
        model = manifest.model
        weights = pretrained or model.get("pretrained", "")
        try:
            tower = load_image_tower(model["name"], weights, seed=model.get("seed", 0), quick_gelu=model["quick_gelu"])
        except MradError as exc:
            raise MradError(f"the PyTorch rendering needs the bundle's weights; pass --pretrained ({exc})") from exc
        encoder = MradEncoder(tower.visual, manifest.preprocess.image_size)
        image_query = patch_query = None
        if manifest.variant == "ft":
            metric = artefacts.load_checkpoint(ft_checkpoint or _beside(detector.path, manifest.provenance))
            image_query, patch_query = metric.image_query, metric.patch_query
        self.graph = QueryGraph(encoder, image_query, patch_query).eval().to(device)
        self.device = device
        self.image_keys = torch.from_numpy(detector.image_memory.keys).to(device)
        self.image_labels = torch.from_numpy(detector.image_memory.labels).to(device)
        self.pixel_keys = torch.from_numpy(detector.pixel_memory.keys).to(device)
        self.pixel_labels = torch.from_numpy(detector.pixel_memory.labels).to(device)
        self.side, self.grid = manifest.preprocess.image_size, manifest.encoder.grid
        self.scoring = manifest.scoring

    @torch.no_grad()
    def scores(self, batch: np.ndarray) -> np.ndarray:
        image_q, patch_q = self.graph(torch.from_numpy(batch).to(self.device))
        p_img = torch.softmax(image_q @ self.image_keys.T, dim=-1) @ self.image_labels
        m = torch.softmax(patch_q @ self.pixel_keys.T, dim=-1) @ self.pixel_labels
        maps = F.interpolate(m.reshape(-1, 1, self.grid, self.grid), size=(self.side, self.side), mode="bilinear",
                             align_corners=False)[:, 0].cpu().numpy()
        top = int(self.side * self.side * self.scoring.top_fraction)
        out = []
        for amap, p in zip(maps, p_img.cpu().numpy()):
            smoothed = torch.from_numpy(gaussian_filter(amap, sigma=self.scoring.sigma, truncate=self.scoring.truncate))
            top_mean = torch.topk(smoothed.flatten(), top).values.mean().item()
            out.append((1 - self.scoring.image_weight) * top_mean + self.scoring.image_weight * p)
        return np.asarray(out)


def _beside(bundle: Path, provenance: dict) -> Path:
    name = str(provenance.get("metric", {}).get("checkpoint", "")).split(" ")[0]
    path = Path(bundle).resolve().parent / name
    if not name or not path.is_file():
        raise MradError("an FT bundle's PyTorch rendering needs its checkpoint: pass --ft-checkpoint PATH")
    return path
