"""The method written plainly with PyTorch, SciPy and Pillow (spec sections 3 to 6).

This is the one rendering of the spec the tests compare the runtime with, and
the baseline ``mrad-bench`` times it against: eager PyTorch encoder, exact
softmax in torch, maps resized with ``F.interpolate`` and smoothed with
SciPy's ``gaussian_filter``. It uses none of the runtime's own numerics
(its map matrices, its memory code), so agreement means something.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from mrad.export import artefacts
from mrad.export.encoder import MradEncoder, QueryGraph
from mrad.export.models import load_image_tower
from mrad.export.prompting import PromptLearner
from mrad.runtime import Detector, MradError
from mrad.runtime.core.bundle import Scoring
from mrad.runtime.formats.mvtec import Sample


@dataclass(frozen=True)
class SpecMemory:
    """Both levels of a memory as torch tensors: keys (n, dim) and float labels (n,)."""

    image_keys: torch.Tensor
    image_labels: torch.Tensor
    pixel_keys: torch.Tensor
    pixel_labels: torch.Tensor


def spec_mask(path: Path, side: int) -> torch.Tensor:
    """Spec section 1: binarise (> 0), resize bilinearly with Pillow, binarise again (> 0.5)."""
    raw = np.asarray(Image.open(path).convert("L")) > 0
    resized = Image.fromarray(raw.astype(np.uint8) * 255).resize((side, side), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized) / 255.0 > 0.5)


def spec_memory(encoder: MradEncoder, samples: list[Sample], inputs) -> SpecMemory:
    """Spec section 3, image by image. ``inputs(paths)`` gives the encoder's input batch."""
    image_keys, image_labels, pixel_keys, pixel_labels = [], [], [], []
    side, grid = encoder.image_size, encoder.grid
    for sample in samples:
        with torch.no_grad():
            f_img, f_pat = encoder(inputs([sample.image]))
        image_keys.append(F.normalize(f_img[0], dim=0))
        image_labels.append(float(sample.anomalous))
        mask = spec_mask(sample.mask, side) if sample.anomalous else torch.zeros(side, side, dtype=torch.bool)
        small = F.interpolate(mask[None, None].float(), size=(grid, grid), mode="bilinear", align_corners=False)
        small = small.flatten()
        for label, chosen in ((1.0, small == 1), (0.0, small == 0)):
            if chosen.any():
                pixel_keys.append(F.normalize(f_pat[0][chosen].mean(0), dim=0))
                pixel_labels.append(label)
    return SpecMemory(torch.stack(image_keys), torch.tensor(image_labels), torch.stack(pixel_keys),
                      torch.tensor(pixel_labels))


def spec_map(m: torch.Tensor, grid: int, side: int, scoring: Scoring) -> np.ndarray:
    """Spec section 4: (G*G,) patch probabilities -> the smoothed (S, S) map, float64."""
    up = F.interpolate(m.double().reshape(1, 1, grid, grid), size=(side, side), mode="bilinear", align_corners=False)
    return gaussian_filter(up[0, 0].cpu().numpy(), sigma=scoring.sigma, truncate=scoring.truncate)


def spec_score(smoothed: np.ndarray, p_img: float, scoring: Scoring) -> float:
    """Spec section 4: (1 - k) * mean of the top share of the map + k * p_img."""
    top = np.sort(smoothed.ravel())[::-1][: int(smoothed.size * scoring.top_fraction)]
    return float((1 - scoring.image_weight) * top.mean() + scoring.image_weight * p_img)


def spec_scores(image_queries: torch.Tensor, patch_queries: torch.Tensor, memory: SpecMemory, grid: int, side: int,
                scoring: Scoring) -> list[tuple[float, np.ndarray]]:
    """Exact softmax retrieval over both levels, then each image's (score, smoothed map)."""
    p_img = torch.softmax(image_queries @ memory.image_keys.T, dim=-1) @ memory.image_labels
    m = torch.softmax(patch_queries @ memory.pixel_keys.T, dim=-1) @ memory.pixel_labels
    out = []
    for i in range(len(image_queries)):
        smoothed = spec_map(m[i], grid, side, scoring)
        out.append((spec_score(smoothed, p_img[i].item(), scoring), smoothed))
    return out


def spec_text(model: torch.nn.Module, learner: PromptLearner, priors: torch.Tensor,
              deep_rounding: str = "float16") -> torch.Tensor:
    """Spec section 6 steps 4-6 over all 77 positions, as the reference runs them: (B, 2, D) priors -> T (B, 2, D).

    ``model`` is the open_clip CLIP model whose text tower the prompts go through.
    """
    batch = len(priors)
    rows = []
    for i, bias_layer in enumerate((learner.normal_bias, learner.anomalous_bias)):
        ctx = learner.ctx[i][None] + bias_layer(priors[:, i])[:, None]
        rows.append(torch.cat([learner.prefix[i].expand(batch, -1, -1), ctx, learner.suffix[i].expand(batch, -1, -1)],
                              dim=1))
    x = torch.stack(rows, dim=1).flatten(0, 1) + model.positional_embedding
    deep = learner.deep.half().float() if deep_rounding == "float16" else learner.deep
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(len(x), -1, -1), x[:, 1 + deep.shape[1]:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    features = x[torch.arange(len(x)), learner.tokens.argmax(dim=-1).repeat(batch)] @ model.text_projection
    return F.normalize(features.reshape(batch, 2, -1), dim=-1)


def spec_clip_scores(image_queries: torch.Tensor, patch_queries: torch.Tensor, projections: torch.Tensor,
                     memory: SpecMemory, text, grid: int, side: int, scoring: Scoring) -> list[tuple[float, np.ndarray]]:
    """Spec section 6 steps 2-7: FT retrieval, region priors, ``text(priors)``, the patch-text map, the score.

    ``memory`` holds the FT-projected keys; ``projections`` (B, G*G, D) are
    the normalised smoothed patch projections.
    """
    settings = scoring.text
    p_img = torch.softmax(image_queries @ memory.image_keys.T, dim=-1) @ memory.image_labels
    m = torch.softmax(patch_queries @ memory.pixel_keys.T, dim=-1) @ memory.pixel_labels
    priors = []
    for i in range(len(m)):
        anomalous = m[i] > settings.prior_threshold
        region_means = [projections[i][chosen].mean(0) if chosen.any() else torch.zeros(projections.shape[-1])
                        for chosen in (~anomalous, anomalous)]
        priors.append(torch.stack(region_means))
    features = text(torch.stack(priors))
    shares = torch.softmax(projections @ features.transpose(1, 2) / settings.temperature, dim=-1)
    m_clip = (shares[..., 1] + 1 - shares[..., 0]) / 2
    out = []
    for i in range(len(image_queries)):
        smoothed = spec_map(m_clip[i], grid, side, scoring)
        out.append((spec_score(smoothed, p_img[i].item(), scoring), smoothed))
    return out


def display_map(smoothed: np.ndarray, height: int, width: int) -> np.ndarray:
    """The spec's map resized bilinearly to an image's own size, as the runtime returns it."""
    resized = F.interpolate(torch.from_numpy(smoothed)[None, None], size=(height, width), mode="bilinear",
                            align_corners=False)
    return resized[0, 0].numpy()


class TorchReference:
    """A bundle's method in eager PyTorch: ``scores(batch)`` for a (B, 3, S, S) float32 batch, on ``device``."""

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
        image_query = patch_query = self.text = None
        if manifest.variant in ("ft", "clip"):
            checkpoint = ft_checkpoint or _beside(detector.path, manifest.provenance)
            metric = artefacts.load_checkpoint(checkpoint)
            image_query, patch_query = metric.image_query, metric.patch_query
        if manifest.variant == "clip":
            learner = artefacts.load_prompts(checkpoint).eval().to(device)
            clip = tower.clip.to(device)
            self.text = functools.partial(spec_text, clip, learner, deep_rounding=manifest.scoring.text.deep_rounding)
        self.graph = QueryGraph(encoder, image_query, patch_query, project_patches=self.text is not None).eval().to(device)
        self.device = device

        def tensor(array):
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        self.memory = SpecMemory(tensor(detector.image_memory.keys), tensor(detector.image_memory.labels),
                                 tensor(detector.pixel_memory.keys), tensor(detector.pixel_memory.labels))
        self.side, self.scoring = manifest.preprocess.image_size, manifest.scoring

    @torch.no_grad()
    def scores(self, batch: np.ndarray) -> np.ndarray:
        outputs = self.graph(torch.from_numpy(batch).to(self.device))
        if self.text is not None:
            results = spec_clip_scores(outputs[0], outputs[1], outputs[-1], self.memory, self.text, self.scoring.grid,
                                       self.side, self.scoring)
        else:
            results = spec_scores(outputs[0], outputs[1], self.memory, self.scoring.grid, self.side, self.scoring)
        return np.asarray([score for score, _ in results])


def _beside(bundle: Path, provenance: dict) -> Path:
    name = str(provenance.get("metric", {}).get("checkpoint", "")).split(" ")[0]
    path = Path(bundle).resolve().parent / name
    if not name or not path.is_file():
        raise MradError("an FT or CLIP bundle's PyTorch rendering needs its checkpoint: pass --ft-checkpoint PATH")
    return path
