"""The export stage end to end: weights + auxiliary data (or released artefacts) -> bundle."""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from mrad.runtime.bundle import Manifest, Preprocess, Retrieval, Scoring, sha256_of

from . import artefacts, data
from .encoder import MradEncoder, QueryGraph
from .errors import ExportError
from .finetune import FineTuner, RetrievalMetric, TrainOptions
from .memory import MemoryBank, build_memory
from .models import RANDOM_WEIGHTS, load_image_tower
from .package import check_out_free, write_bundle

VARIANTS = ("tf", "ft")
CHECKPOINT_SUFFIX = ".mrad_ft.pth"


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``mrad-export`` takes; defaults are the spec's."""

    out: Path
    aux_data: tuple[Path, ...] = ()
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
    memory_bank: tuple[Path, Path] | None = None
    ft_checkpoint: Path | None = None
    train: TrainOptions = TrainOptions()
    checkpoint_out: Path | None = None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {device} asked for, but this torch sees no CUDA device; use --device cpu")
    return device


def checkpoint_path(opts: ExportOptions) -> Path:
    """Where a trained metric is saved: beside the bundle, in the released checkpoint layout."""
    return opts.checkpoint_out or Path(opts.out).with_name(Path(opts.out).name + CHECKPOINT_SUFFIX)


def _check_options(opts: ExportOptions) -> None:
    if opts.variant not in VARIANTS:
        raise ExportError(f"unknown variant {opts.variant!r}; choose one of {', '.join(VARIANTS)}")
    if opts.ft_checkpoint and opts.variant != "ft":
        raise ExportError("--ft-checkpoint goes with --variant ft")
    trains = opts.variant == "ft" and opts.ft_checkpoint is None
    if not opts.aux_data and (opts.memory_bank is None or trains):
        needed = "to train MRAD-FT" if trains else "to build the memory"
        raise ExportError(f"--aux-data is required {needed} (or pass --memory-bank and, for ft, --ft-checkpoint)")
    check_out_free(Path(opts.out), opts.overwrite)


def export_bundle(opts: ExportOptions, log=print) -> Manifest:
    _check_options(opts)
    device = resolve_device(opts.device)
    tower = load_image_tower(opts.model, opts.pretrained, seed=opts.seed, quick_gelu=opts.quick_gelu)
    encoder = MradEncoder(tower.visual, opts.image_size)
    preprocess = Preprocess(image_size=opts.image_size, mean=tuple(OPENAI_DATASET_MEAN), std=tuple(OPENAI_DATASET_STD))
    samples = data.scan(opts.aux_data, include_train=opts.include_train) if opts.aux_data else []
    if samples:
        anomalous = sum(s.anomalous for s in samples)
        log(f"auxiliary data: {len(samples)} images ({len(samples) - anomalous} normal, {anomalous} anomalous) "
            f"in {len({s.category for s in samples})} categories")

    if opts.memory_bank:
        memory = artefacts.load_memory_bank(*opts.memory_bank)
        _check_memory_dims(memory, encoder)
        source = {"memory_bank": [f"{Path(p).name} sha256:{sha256_of(Path(p))}" for p in opts.memory_bank]}
    else:
        memory = build_memory(encoder, samples, preprocess, batch_size=opts.batch_size, device=device)
        source = {"aux_data": [str(p) for p in opts.aux_data],
                  "aux_splits": ["test", "train/good"] if opts.include_train else ["test"]}
    log(f"memory: image level {len(memory.image_keys)} entries ({int(memory.image_labels.sum())} anomalous), "
        f"pixel level {len(memory.pixel_keys)} entries ({int(memory.pixel_labels.sum())} anomalous)")

    if opts.variant == "ft":
        metric, source["metric"] = _learned_metric(opts, encoder, samples, memory, preprocess, device, log)
        graph = QueryGraph(encoder.cpu(), metric.image_query, metric.patch_query)
        image_keys, pixel_keys = _project(metric.image_key, memory.image_keys), _project(metric.patch_key, memory.pixel_keys)
    else:
        graph = QueryGraph(encoder.cpu())
        image_keys, pixel_keys = memory.image_keys, memory.pixel_keys

    fields = dict(
        variant=opts.variant,
        model={
            "name": tower.name,
            "weights": tower.weights,
            # what to pass as --pretrained to rebuild the same PyTorch model (a file: its name only)
            "pretrained": opts.pretrained if not Path(opts.pretrained).is_file() else Path(opts.pretrained).name,
            "seed": opts.seed,
            "random_weights": opts.pretrained == RANDOM_WEIGHTS,
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
            "aux_images": len(samples),
            **source,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
        },
    )
    manifest = write_bundle(opts.out, graph, image_keys, memory.image_labels, pixel_keys, memory.pixel_labels,
                            fields, overwrite=opts.overwrite)
    size = sum(p.stat().st_size for p in Path(opts.out).iterdir())
    log(f"bundle written to {opts.out} ({size / 1e6:.1f} MB)")
    return manifest


def _learned_metric(opts, encoder, samples, memory, preprocess, device, log) -> tuple[RetrievalMetric, dict]:
    if opts.ft_checkpoint:
        metric = artefacts.load_checkpoint(opts.ft_checkpoint)
        if (metric.image_query.in_features, metric.patch_query.in_features) != (encoder.embed_dim, encoder.width):
            raise ExportError(
                f"--ft-checkpoint {opts.ft_checkpoint} is for features of size {metric.image_query.in_features} "
                f"(image) and {metric.patch_query.in_features} (patch); {opts.model} gives "
                f"{encoder.embed_dim} and {encoder.width}"
            )
        return metric, {"checkpoint": f"{Path(opts.ft_checkpoint).name} sha256:{sha256_of(Path(opts.ft_checkpoint))}"}
    torch.manual_seed(opts.train.seed)
    metric = RetrievalMetric(encoder.embed_dim, encoder.width)
    tuner = FineTuner(memory, opts.image_size, encoder.grid, opts.train, device)
    report = tuner.train(metric, encoder, samples, preprocess, batch_size=opts.batch_size)
    metric.cpu()
    path = checkpoint_path(opts)
    artefacts.save_checkpoint(metric, path)
    log(f"MRAD-FT trained in {report.seconds:.1f} s over {len(report.pixel_losses)} steps: pixel loss "
        f"{report.pixel_losses[0]:.4f} -> {report.pixel_losses[-1]:.4f}, image loss "
        f"{report.image_losses[0]:.4f} -> {report.image_losses[-1]:.4f}; checkpoint saved to {path}")
    return metric, {
        "trained": {**asdict(opts.train), "batch_size": opts.batch_size, "steps": len(report.pixel_losses), "seconds": round(report.seconds, 2),
                    "first_losses": [report.pixel_losses[0], report.image_losses[0]],
                    "last_losses": [report.pixel_losses[-1], report.image_losses[-1]]},
        "checkpoint": f"{path.name} sha256:{sha256_of(path)}",
    }


def _project(layer: torch.nn.Linear, keys: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return layer(torch.from_numpy(keys)).numpy()


def _check_memory_dims(memory: MemoryBank, encoder: MradEncoder) -> None:
    dims = (memory.image_keys.shape[1], memory.pixel_keys.shape[1])
    if dims != (encoder.embed_dim, encoder.width):
        raise ExportError(f"--memory-bank keys have sizes {dims[0]} (image) and {dims[1]} (patch); the model gives "
                          f"{encoder.embed_dim} and {encoder.width}: the memory was built with another model")
