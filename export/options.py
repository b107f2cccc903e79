"""What mrad-export takes, and its defaults; importable without torch (for --help on a runtime-only install)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mrad.runtime import defaults

VARIANTS = ("tf", "ft", "clip")
PRECISIONS = ("fp32", "fp16", "int8")  # the encoder's; the last two derived from fp32 by mrad.export.precision
CHECKPOINT_SUFFIXES = {"ft": ".mrad_ft.pth", "clip": ".mrad_clip.pth"}


@dataclass(frozen=True)
class TrainOptions:
    """MRAD-FT training (spec section 5); defaults are the reference's."""

    epochs: int = 1
    learning_rate: float = 4e-4
    betas: tuple[float, float] = (0.5, 0.999)
    min_learning_rate: float = 1e-6
    seed: int = 111
    pixel_drop_percentile: float = 0.8
    image_drop_percentile: float = 0.95
    image_temperature: float = 0.07


@dataclass(frozen=True)
class PromptOptions:
    """MRAD-CLIP's prompts, their training stage and their use at scoring (spec section 6); the reference's defaults."""

    epochs: int = 5  # after the FT epoch(s), with the pixel projection frozen
    context_tokens: int = defaults.CLIP_CONTEXT_TOKENS
    deep_tokens: int = defaults.CLIP_DEEP_TOKENS
    deep_layers: int = defaults.CLIP_DEEP_LAYERS
    prior_threshold: float = defaults.CLIP_PRIOR_THRESHOLD
    temperature: float = defaults.CLIP_TEMPERATURE
    deep_rounding: str = defaults.CLIP_DEEP_ROUNDING


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``mrad-export`` takes; defaults are the spec's."""

    out: Path
    aux_data: tuple[Path, ...] = ()
    variant: str = "tf"
    model: str = "ViT-L-14-336"
    pretrained: str = "openai"
    image_size: int = defaults.IMAGE_SIZE
    include_train: bool = False
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    quick_gelu: bool | None = None
    image_weight: float = defaults.IMAGE_WEIGHT
    sigma: float = defaults.SIGMA
    top_fraction: float = defaults.TOP_FRACTION
    retrieval: str = defaults.RETRIEVAL
    top_k: int = defaults.TOP_K
    ef_search: int = defaults.HNSW_EF_SEARCH
    overwrite: bool = False
    sign_key: Path | None = None  # elliptic-curve private key (PEM): the bundle is signed before it is put in place
    memory_bank: tuple[Path, Path] | None = None
    checkpoint: Path | None = None  # the authors' layout, of the variant asked for (ft, or clip)
    ft_checkpoint: Path | None = None  # the same, for --variant ft only (the older option)
    train: TrainOptions = field(default_factory=TrainOptions)
    prompts: PromptOptions = field(default_factory=PromptOptions)
    checkpoint_out: Path | None = None
    precision: str = "fp32"
    calibration_images: int = 32  # int8 ranges and every derived precision's fidelity, from the aux images


def checkpoint_path(opts: ExportOptions) -> Path:
    """Where trained layers are saved: beside the bundle, in the released checkpoint layout."""
    suffix = CHECKPOINT_SUFFIXES["clip" if opts.variant == "clip" else "ft"]
    return opts.checkpoint_out or Path(opts.out).with_name(Path(opts.out).name + suffix)
