"""The export stage end to end: weights + auxiliary data -> bundle."""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from mrad.runtime.bundle import Manifest, Preprocess, Retrieval, Scoring

from . import data
from .encoder import MradEncoder, QueryGraph
from .errors import ExportError
from .memory import build_memory
from .models import load_image_tower
from .package import write_bundle

VARIANTS = ("tf", "ft")


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``mrad-export`` takes; defaults are the spec's."""

    aux_data: list[Path]
    out: Path
    variant: str = "tf"
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    image_size: int = 518
    include_train: bool = False
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    quick_gelu: bool | None = None
    image_weight: float = 0.7
    sigma: float = 4.0
    top_fraction: float = 0.01
    retrieval: str = "exact"
    top_k: int = 64
    ef_search: int = 128
    overwrite: bool = False
    extra_provenance: dict = field(default_factory=dict)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {device} asked for, but this torch sees no CUDA device; use --device cpu")
    return device


def export_bundle(opts: ExportOptions, log=print) -> Manifest:
    if opts.variant not in VARIANTS:
        raise ExportError(f"unknown variant {opts.variant!r}; choose one of {', '.join(VARIANTS)}")
    if opts.variant == "ft":
        raise ExportError("--variant ft is not available yet in this build; use --variant tf")
    device = resolve_device(opts.device)
    tower = load_image_tower(opts.model, opts.pretrained, seed=opts.seed, quick_gelu=opts.quick_gelu)
    samples = data.scan(opts.aux_data, include_train=opts.include_train)
    anomalous = sum(s.anomalous for s in samples)
    log(f"auxiliary data: {len(samples)} images ({len(samples) - anomalous} normal, {anomalous} anomalous) "
        f"in {len({s.category for s in samples})} categories")
    encoder = MradEncoder(tower.visual, opts.image_size)
    preprocess = Preprocess(image_size=opts.image_size, mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD))
    memory = build_memory(encoder, samples, preprocess, batch_size=opts.batch_size, device=device)
    log(f"memory: image level {len(memory.image_keys)} entries ({int(memory.image_labels.sum())} anomalous), "
        f"pixel level {len(memory.pixel_keys)} entries ({int(memory.pixel_labels.sum())} anomalous)")

    fields = dict(
        variant=opts.variant,
        model={
            "name": tower.name,
            "weights": tower.weights,
            "random_weights": opts.pretrained == "none",
            "quick_gelu": tower.quick_gelu,
            "patch_size": tower.visual.patch_size[0],
            "width": encoder.width,
            "embed_dim": encoder.embed_dim,
            "layers": len(tower.visual.transformer.resblocks),
        },
        preprocess=preprocess,
        scoring=Scoring(image_weight=opts.image_weight, sigma=opts.sigma, truncate=4.0, top_fraction=opts.top_fraction),
        retrieval=Retrieval(default=opts.retrieval, top_k=opts.top_k, ef_search=opts.ef_search),
        provenance={
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "aux_data": [str(p) for p in opts.aux_data],
            "aux_splits": ["test", "train/good"] if opts.include_train else ["test"],
            "aux_images": len(samples),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
            **opts.extra_provenance,
        },
    )
    graph = QueryGraph(encoder.cpu())
    manifest = write_bundle(opts.out, graph, memory.image_keys, memory.image_labels, memory.pixel_keys,
                            memory.pixel_labels, fields, overwrite=opts.overwrite)
    size = sum(p.stat().st_size for p in Path(opts.out).iterdir())
    log(f"bundle written to {opts.out} ({size / 1e6:.1f} MB)")
    return manifest
