"""The memory bank (spec section 3): auxiliary images through the frozen encoder into labelled keys.

The encoder runs in PyTorch here (on a GPU when there is one); turning its
features into entries is the runtime's own code (:mod:`mrad.runtime.core.memory`),
so entries made at export and entries made on the line are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mrad.runtime.core.bundle import Preprocess
from mrad.runtime.core.memory import entry_vectors, normalize, patch_groups
from mrad.runtime.formats.mvtec import Sample
from mrad.runtime.core.preprocess import load_mask, load_rgb, to_input

from .encoder import MradEncoder


@dataclass(frozen=True)
class MemoryBank:
    """Normalised keys, labels (0 normal, 1 anomalous) and provenance of both levels."""

    image_keys: np.ndarray
    image_labels: np.ndarray
    pixel_keys: np.ndarray
    pixel_labels: np.ndarray
    image_provenance: tuple[dict, ...]
    pixel_provenance: tuple[dict, ...]


@dataclass(frozen=True)
class EncodedBatch:
    samples: list[Sample]
    image_features: torch.Tensor  # (B, D), raw
    patch_features: torch.Tensor  # (B, G*G, W), smoothed, not normalised
    labels: torch.Tensor  # (B,), 0 or 1
    masks: torch.Tensor  # (B, S, S), bool


def load_sample(sample: Sample, image_size: int) -> tuple[Image.Image, np.ndarray]:
    """The RGB image and the (S, S) boolean mask of one auxiliary sample."""
    image = load_rgb(sample.image)
    mask = (load_mask(sample.mask, (image_size, image_size)) if sample.mask is not None
            else np.zeros((image_size, image_size), dtype=bool))
    return image, mask


def encode_samples(encoder: MradEncoder, samples: list[Sample], preprocess: Preprocess, batch_size: int,
                   device: str, progress: bool = True) -> Iterator[EncodedBatch]:
    """Run the frozen encoder over ``samples`` in batches, with a progress bar."""
    encoder = encoder.to(device)
    with tqdm(total=len(samples), desc="encoding auxiliary images", unit="img", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            loaded = [load_sample(s, preprocess.image_size) for s in chunk]
            images = torch.from_numpy(np.stack([to_input(image, preprocess) for image, _ in loaded]))
            with torch.no_grad():
                image_features, patch_features = encoder(images.to(device))
            yield EncodedBatch(
                samples=chunk,
                image_features=image_features,
                patch_features=patch_features,
                labels=torch.tensor([int(s.anomalous) for s in chunk], device=device),
                masks=torch.from_numpy(np.stack([mask for _, mask in loaded])).to(device),
            )
            bar.update(len(chunk))


def build_memory(encoder: MradEncoder, samples: list[Sample], preprocess: Preprocess, batch_size: int = 8,
                 device: str = "cpu") -> MemoryBank:
    image = ([], [], [])  # vectors, labels, provenance
    pixel = ([], [], [])
    for batch in encode_samples(encoder, samples, preprocess, batch_size, device):
        image_features = batch.image_features.cpu().numpy()
        patch_features = batch.patch_features.cpu().numpy()
        for i, sample in enumerate(batch.samples):
            origin = {"source": sample.source, "category": sample.category, "defect": sample.defect}
            label = int(sample.anomalous)
            groups = patch_groups(batch.masks[i].cpu().numpy(), encoder.grid)
            for level, kind, feature in ((image, "image", image_features[i]), (pixel, "pixel", patch_features[i])):
                vectors, labels = entry_vectors(kind, feature, label, groups)
                level[0].append(vectors)
                level[1].extend(labels)
                level[2].extend({**origin, "region": _region(kind, entry)} for entry in labels)
    return MemoryBank(
        image_keys=normalize(np.concatenate(image[0])),
        image_labels=np.asarray(image[1], np.uint8),
        pixel_keys=normalize(np.concatenate(pixel[0])),
        pixel_labels=np.asarray(pixel[1], np.uint8),
        image_provenance=tuple(image[2]),
        pixel_provenance=tuple(pixel[2]),
    )


def _region(kind: str, label: int) -> str:
    """Which part of the image an entry stands for."""
    if kind == "image":
        return "whole image"
    return "anomalous patches" if label else "normal patches"
