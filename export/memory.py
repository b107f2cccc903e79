"""The two-level memory bank built from auxiliary data (spec section 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mrad.runtime.bundle import Preprocess
from mrad.runtime.preprocess import to_input

from .data import Sample, load_sample
from .encoder import MradEncoder

NORMAL, ANOMALOUS = 0, 1


@dataclass(frozen=True)
class MemoryBank:
    """Keys (normalised) and labels (0 normal, 1 anomalous) of both levels."""

    image_keys: np.ndarray
    image_labels: np.ndarray
    pixel_keys: np.ndarray
    pixel_labels: np.ndarray


@dataclass(frozen=True)
class EncodedBatch:
    image_features: torch.Tensor  # (B, D), raw
    patch_features: torch.Tensor  # (B, G*G, W), smoothed, not normalised
    labels: torch.Tensor  # (B,), 0 or 1
    masks: torch.Tensor  # (B, S, S), bool


def encode_samples(encoder: MradEncoder, samples: list[Sample], preprocess: Preprocess, batch_size: int,
                   device: str, desc: str = "encoding auxiliary images", progress: bool = True
                   ) -> Iterator[EncodedBatch]:
    """Run the frozen encoder over ``samples`` in batches, with a progress bar."""
    encoder = encoder.to(device)
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            loaded = [load_sample(s, preprocess.image_size) for s in chunk]
            images = torch.from_numpy(np.stack([to_input(image, preprocess) for image, _ in loaded]))
            with torch.no_grad():
                image_features, patch_features = encoder(images.to(device))
            yield EncodedBatch(
                image_features=image_features,
                patch_features=patch_features,
                labels=torch.tensor([int(s.anomalous) for s in chunk], device=device),
                masks=torch.from_numpy(np.stack([mask for _, mask in loaded])).to(device),
            )
            bar.update(len(chunk))


def patch_groups(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, S, S) masks -> (B, G*G) patch labels: 1 anomalous, 0 normal, -1 boundary.

    The mask is resized to the grid bilinearly (align_corners=False); only
    patches resized to exactly 1 or exactly 0 belong to a group.
    """
    small = F.interpolate(masks[:, None].float(), size=(grid, grid), mode="bilinear", align_corners=False)
    small = small.flatten(1)
    groups = torch.full_like(small, -1, dtype=torch.int64)
    groups[small == 1] = ANOMALOUS
    groups[small == 0] = NORMAL
    return groups


def build_memory(encoder: MradEncoder, samples: list[Sample], preprocess: Preprocess, batch_size: int = 8,
                 device: str = "cpu") -> MemoryBank:
    image_keys, image_labels, pixel_keys, pixel_labels = [], [], [], []
    for batch in encode_samples(encoder, samples, preprocess, batch_size, device):
        image_keys.append(F.normalize(batch.image_features, dim=-1))
        image_labels.append(batch.labels)
        groups = patch_groups(batch.masks, encoder.grid)
        for patches, image_groups in zip(batch.patch_features, groups):
            for label in (ANOMALOUS, NORMAL):  # the reference's order
                selected = patches[image_groups == label]
                if len(selected):
                    pixel_keys.append(F.normalize(selected.mean(dim=0), dim=-1)[None])
                    pixel_labels.append(torch.tensor([label]))
    return MemoryBank(
        image_keys=_numpy(torch.cat(image_keys)),
        image_labels=_numpy(torch.cat(image_labels)).astype(np.uint8),
        pixel_keys=_numpy(torch.cat(pixel_keys)),
        pixel_labels=_numpy(torch.cat(pixel_labels)).astype(np.uint8),
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
