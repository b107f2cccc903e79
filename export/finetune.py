"""MRAD-FT: the learned retrieval metric and its training (spec section 5).

Two pairs of linear layers reshape the similarity between a query and the
memory keys; the memory itself never changes. At export the key layers are
applied to the memory once and the query layers are folded into the ONNX
graph, so the runtime does plain inner-product retrieval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mrad.runtime.core.bundle import Preprocess
from mrad.runtime.formats.mvtec import Sample

from .encoder import MradEncoder
from .memory import EncodedBatch, MemoryBank, encode_samples
from .options import TrainOptions


class RetrievalMetric(nn.Module):
    """The four learned layers: image query/key (D -> D) and patch query/key (W -> D)."""

    def __init__(self, image_dim: int, patch_dim: int):
        super().__init__()
        self.image_query = nn.Linear(image_dim, image_dim)
        self.image_key = nn.Linear(image_dim, image_dim)
        self.patch_query = nn.Linear(patch_dim, image_dim)
        self.patch_key = nn.Linear(patch_dim, image_dim)

    def to_reference(self) -> dict[str, dict[str, torch.Tensor]]:
        """The authors' checkpoint layout: image_proj.mlp1/mlp2, patch_proj.fc.0/fc.1 (query, key)."""
        pairs = {"image_proj": {"mlp1": self.image_query, "mlp2": self.image_key},
                 "patch_proj": {"fc.0": self.patch_query, "fc.1": self.patch_key}}
        return {group: {f"{name}.{p}": getattr(layer, p).detach().cpu().clone()
                        for name, layer in layers.items() for p in ("weight", "bias")}
                for group, layers in pairs.items()}

    @classmethod
    def from_reference(cls, checkpoint: dict) -> "RetrievalMetric":
        """Build from the authors' layout; raises KeyError or ValueError when it does not fit."""
        image, patch = checkpoint["image_proj"], checkpoint["patch_proj"]
        image_dim = image["mlp1.weight"].shape[1]
        patch_dim = patch["fc.0.weight"].shape[1]
        metric = cls(image_dim, patch_dim)
        names = {"image_query": (image, "mlp1"), "image_key": (image, "mlp2"),
                 "patch_query": (patch, "fc.0"), "patch_key": (patch, "fc.1")}
        state = {f"{attr}.{p}": group[f"{prefix}.{p}"] for attr, (group, prefix) in names.items()
                 for p in ("weight", "bias")}
        metric.load_state_dict(state)
        return metric


def above_percentile(similarities: torch.Tensor, q: float) -> torch.Tensor:
    """Entries strictly above each row's ``q`` quantile (linear interpolation, as torch.quantile).

    Uses ``kthvalue``, which scales to any size: torch.quantile refuses inputs
    over 2**24 elements, and a batch of patches against a memory is far larger.
    """
    rows = similarities.reshape(-1, similarities.shape[-1])
    position = q * (rows.shape[-1] - 1)
    low, high = math.floor(position), math.ceil(position)
    low_value = rows.kthvalue(low + 1, dim=-1, keepdim=True).values
    high_value = rows.kthvalue(high + 1, dim=-1, keepdim=True).values if high != low else low_value
    threshold = low_value + (position - low) * (high_value - low_value)
    return (rows > threshold).reshape(similarities.shape)


def retrieve(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, metric_query: nn.Module,
             metric_key: nn.Module, drop_percentile: float | None = None) -> torch.Tensor:
    """Anomalous probability per query through the learned metric, with optional similarity dropout.

    ``queries`` (..., dim) and ``keys`` (N, dim) are normalised features;
    the dropout mask is computed on their unprojected cosine similarity.
    """
    sims = metric_query(queries) @ metric_key(keys).T
    if drop_percentile is not None:
        with torch.no_grad():
            dropped = above_percentile(queries @ keys.T, drop_percentile)
        sims = sims.masked_fill(dropped, float("-inf"))
    return torch.softmax(sims, dim=-1) @ labels.float()


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on probabilities (B, 2, S, S) against a binary mask (B, S, S), with label smoothing."""
    flat = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    one_hot = F.one_hot(target.reshape(-1).long(), flat.shape[1]).float()
    one_hot = one_hot.clamp(smooth / (flat.shape[1] - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary dice loss (smooth 1), averaged over the batch."""
    prob, target = prob.reshape(len(prob), -1), target.reshape(len(target), -1).float()
    dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return 1 - dice.mean()


@dataclass
class TrainReport:
    pixel_losses: list[float] = field(default_factory=list)
    image_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class FineTuner:
    """Computes MRAD-FT losses over a fixed memory; trains a :class:`RetrievalMetric`."""

    def __init__(self, memory: MemoryBank, image_size: int, grid: int, opts: TrainOptions, device: str):
        self.opts = opts
        self.device = device
        self.image_size, self.grid = image_size, grid
        self.image_keys = torch.from_numpy(memory.image_keys).to(device)
        self.image_labels = torch.from_numpy(memory.image_labels).to(device)
        self.pixel_keys = torch.from_numpy(memory.pixel_keys).to(device)
        self.pixel_labels = torch.from_numpy(memory.pixel_labels).to(device)

    def losses(self, metric: RetrievalMetric, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel loss, image loss) of one encoded batch, with similarity dropout as in training."""
        opts = self.opts
        patches = F.normalize(batch.patch_features, dim=-1)
        anomalous = retrieve(patches, self.pixel_keys, self.pixel_labels, metric.patch_query, metric.patch_key,
                             opts.pixel_drop_percentile)
        two_channel = torch.stack([1 - anomalous, anomalous], dim=1).reshape(-1, 2, self.grid, self.grid)
        maps = F.interpolate(two_channel, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        target = batch.masks.float()
        pixel = focal_loss(maps, target) + dice_loss(maps[:, 1], target)

        images = F.normalize(batch.image_features, dim=-1)
        p_img = retrieve(images, self.image_keys, self.image_labels, metric.image_query, metric.image_key,
                         opts.image_drop_percentile)
        logits = torch.stack([1 - p_img, p_img], dim=-1) / opts.image_temperature
        image = F.cross_entropy(logits, batch.labels.long())
        return pixel, image

    def train(self, metric: RetrievalMetric, encoder: MradEncoder, samples: list[Sample], preprocess: Preprocess,
              batch_size: int = 8, schedule: bool = True) -> TrainReport:
        """Train ``metric``; ``schedule``: cosine-decay the learning rate over all steps (MRAD-FT alone does)."""
        opts = self.opts
        generator = torch.Generator().manual_seed(opts.seed)
        metric.to(self.device).train()
        optimiser = torch.optim.Adam(metric.parameters(), lr=opts.learning_rate, betas=opts.betas)
        steps = opts.epochs * math.ceil(len(samples) / batch_size)
        decay = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps, eta_min=opts.min_learning_rate)
                 if schedule else None)
        report = TrainReport()
        with tqdm(total=steps, desc="training MRAD-FT", unit="step") as bar:
            for _ in range(opts.epochs):
                order = torch.randperm(len(samples), generator=generator).tolist()
                shuffled = [samples[i] for i in order]
                for batch in encode_samples(encoder, shuffled, preprocess, batch_size, self.device, progress=False):
                    pixel, image = self.losses(metric, batch)
                    optimiser.zero_grad()
                    (pixel + image).backward()
                    optimiser.step()
                    if decay is not None:
                        decay.step()
                    report.pixel_losses.append(pixel.item())
                    report.image_losses.append(image.item())
                    bar.update()
                    bar.set_postfix(pixel=f"{pixel.item():.4f}", image=f"{image.item():.4f}")
        metric.eval()
        report.seconds = bar.format_dict["elapsed"]
        return report
