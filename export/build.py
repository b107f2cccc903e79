"""The export stage end to end: weights + auxiliary data (or released artefacts) -> bundle."""

from __future__ import annotations

import datetime as dt
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import torch

from mrad.runtime import defaults
from mrad.runtime.core.bundle import HnswParams, Manifest, Preprocess, Scoring, TextScoring
from mrad.runtime.files import sha256_of
from mrad.runtime.core.memory import Memory
from mrad.runtime.formats.mvtec import Sample, scan

from . import artefacts, precision
from .encoder import MradEncoder, QueryGraph
from .errors import ExportError
from .finetune import FineTuner, RetrievalMetric
from .memory import MemoryBank, build_memory
from .models import RANDOM_WEIGHTS, load_image_tower
from .options import PRECISIONS, VARIANTS, ExportOptions, checkpoint_path
from .package import check_out_free, write_bundle
from .progress import Steps, export_steps
from .prompting import PromptLearner, PromptTrainer, TextGraph, TextTower


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExportError(f"--device {device} asked for, but this torch sees no CUDA device; use --device cpu")
    return device


def _check_options(opts: ExportOptions) -> None:
    if opts.variant not in VARIANTS:
        raise ExportError(f"unknown variant {opts.variant!r}; choose one of {', '.join(VARIANTS)}")
    if opts.ft_checkpoint and opts.variant != "ft":
        raise ExportError("--ft-checkpoint goes with --variant ft; for --variant clip pass --checkpoint")
    if opts.ft_checkpoint and opts.checkpoint:
        raise ExportError("pass --checkpoint or --ft-checkpoint, not both")
    if opts.checkpoint and opts.variant == "tf":
        raise ExportError("--checkpoint holds trained layers: it goes with --variant ft or clip (tf trains nothing)")
    trains = opts.variant != "tf" and _checkpoint(opts) is None
    if not opts.aux_data and (opts.memory_bank is None or trains):
        needed = f"to train MRAD-{opts.variant.upper()}" if trains else "to build the memory"
        raise ExportError(f"--aux-data is required {needed} (or pass --memory-bank and, for ft and clip, --checkpoint)")
    if opts.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {opts.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if opts.precision != "fp32":
        if not opts.aux_data:
            raise ExportError(f"--precision {opts.precision} calibrates and measures on the auxiliary images: "
                              "pass --aux-data")
        precision.check_tools(opts.precision)
    check_out_free(Path(opts.out), opts.overwrite)


def export_bundle(opts: ExportOptions, log=print, steps: Steps | None = None) -> Manifest:
    """Write the bundle ``opts`` asks for; ``steps`` says each phase as it begins (by default through ``log``)."""
    _check_options(opts)
    steps = steps or export_steps(opts, log)
    device = resolve_device(opts.device)
    with steps("weights"):
        tower = load_image_tower(opts.model, opts.pretrained, seed=opts.seed, quick_gelu=opts.quick_gelu)
    encoder = MradEncoder(tower.visual, opts.image_size)
    preprocess = Preprocess(image_size=opts.image_size, mean=defaults.CLIP_MEAN, std=defaults.CLIP_STD)
    samples = _aux_samples(opts)
    if samples:
        anomalous = sum(s.anomalous for s in samples)
        log(f"auxiliary data: {len(samples)} images ({len(samples) - anomalous} normal, {anomalous} anomalous) "
            f"in {len({s.category for s in samples})} categories")

    if opts.memory_bank:
        with steps("released"):
            bank = artefacts.load_memory_bank(*opts.memory_bank)
        _check_memory_dims(bank, encoder)
        source = {"memory_bank": [f"{Path(p).name} sha256:{sha256_of(Path(p))}" for p in opts.memory_bank]}
    else:
        with steps("memory"):
            bank = build_memory(encoder, samples, preprocess, batch_size=opts.batch_size, device=device)
        source = {"aux_data": [str(p) for p in opts.aux_data],
                  "aux_splits": ["test", "train/good"] if opts.include_train else ["test"]}
    log(f"memory: image level {len(bank.image_keys)} entries ({int(bank.image_labels.sum())} anomalous), "
        f"pixel level {len(bank.pixel_keys)} entries ({int(bank.pixel_labels.sum())} anomalous)")

    text = text_scoring = None
    if opts.variant == "tf":
        graph = QueryGraph(encoder.cpu())
        projections = {"image": None, "pixel": None}
    else:
        metric, learner, source["metric"] = _learned(opts, tower, encoder, samples, bank, preprocess, device, log,
                                                     steps)
        graph = QueryGraph(encoder.cpu(), metric.image_query, metric.patch_query, project_patches=learner is not None)
        projections = {"image": _arrays(metric.image_key), "pixel": _arrays(metric.patch_key)}
        if learner is not None:
            text = TextGraph(learner.cpu(), TextTower(tower.clip.cpu()),  # trained on --device, traced on the CPU
                             deep_rounding=opts.prompts.deep_rounding).eval()
            text_scoring = _text_scoring(opts, text)
    hnsw = HnswParams(M=defaults.HNSW_M, ef_construction=defaults.HNSW_EF_CONSTRUCTION, ef_search=opts.ef_search)
    memories = {
        "image": _memory("image", "image_query", "image_feature", bank.image_keys, bank.image_labels,
                         bank.image_provenance, projections["image"], hnsw),
        "pixel": _memory("pixel", "patch_query", "patch_feature", bank.pixel_keys, bank.pixel_labels,
                         bank.pixel_provenance, projections["pixel"], hnsw),
    }

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
        scoring=Scoring(grid=encoder.grid, image_weight=opts.image_weight, sigma=opts.sigma,
                        truncate=defaults.TRUNCATE, top_fraction=opts.top_fraction, retrieval=opts.retrieval,
                        top_k=opts.top_k, text=text_scoring),
        provenance={
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "aux_images": len(samples),
            **source,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
        },
    )
    if opts.precision == "fp32":
        manifest = write_bundle(opts.out, graph, memories, fields, text=text, overwrite=opts.overwrite,
                                sign_key=opts.sign_key, steps=steps)
    else:
        manifest = _derived(opts, graph, memories, fields, text, [s.image for s in samples], log, steps)
    size = sum(p.stat().st_size for p in Path(opts.out).iterdir())
    log(f"bundle written to {opts.out} ({size / 1e6:.1f} MB) in {steps.seconds:.0f} s")
    return manifest


def _derived(opts, graph, memories, fields, text, images, log, steps: Steps) -> Manifest:
    """Write the fp32 bundle aside, then the bundle asked for, derived from it and measured against it."""
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.parent) as scratch:
        reference = Path(scratch) / "bundle"
        write_bundle(reference, graph, memories, fields, text=text, steps=steps)
        with steps("derive"):
            return precision.derive(reference, out, opts.precision,
                                    precision.spread(images, opts.calibration_images), overwrite=opts.overwrite,
                                    sign_key=opts.sign_key, log=log)


def _checkpoint(opts: ExportOptions) -> tuple[Path, str] | None:
    """The checkpoint to export from, and the option that named it."""
    if opts.checkpoint:
        return Path(opts.checkpoint), "--checkpoint"
    if opts.ft_checkpoint:
        return Path(opts.ft_checkpoint), "--ft-checkpoint"
    return None


def _learned(opts, tower, encoder, samples, memory, preprocess, device, log, steps: Steps
             ) -> tuple[RetrievalMetric, PromptLearner | None, dict]:
    """MRAD-FT's layers and, for clip, the prompts: from the authors' checkpoint, or trained here and saved."""
    given = _checkpoint(opts)
    if given:
        path, option = given
        with steps("checkpoint"):
            metric = artefacts.load_checkpoint(path, option)
        if (metric.image_query.in_features, metric.patch_query.in_features) != (encoder.embed_dim, encoder.width):
            raise ExportError(
                f"{option} {path} is for features of size {metric.image_query.in_features} (image) and "
                f"{metric.patch_query.in_features} (patch); {opts.model} gives {encoder.embed_dim} and {encoder.width}"
            )
        learner = artefacts.load_prompts(path, option) if opts.variant == "clip" else None
        return metric, learner, {"checkpoint": f"{path.name} sha256:{sha256_of(path)}"}
    torch.manual_seed(opts.train.seed)
    metric = RetrievalMetric(encoder.embed_dim, encoder.width)
    tuner = FineTuner(memory, opts.image_size, encoder.grid, opts.train, device)
    # The reference decays the learning rate only when it trains MRAD-FT alone.
    with steps("train-ft"):
        report = tuner.train(metric, encoder, samples, preprocess, batch_size=opts.batch_size,
                             schedule=opts.variant == "ft")
    log(f"MRAD-FT trained in {report.seconds:.1f} s over {len(report.pixel_losses)} steps: pixel loss "
        f"{report.pixel_losses[0]:.4f} -> {report.pixel_losses[-1]:.4f}, image loss "
        f"{report.image_losses[0]:.4f} -> {report.image_losses[-1]:.4f}")
    trained = {**asdict(opts.train), "batch_size": opts.batch_size, "steps": len(report.pixel_losses),
               "seconds": round(report.seconds, 2), "first_losses": [report.pixel_losses[0], report.image_losses[0]],
               "last_losses": [report.pixel_losses[-1], report.image_losses[-1]]}
    learner = None
    if opts.variant == "clip":
        with steps("train-prompts"):
            learner, trained["prompts"] = _trained_prompts(opts, tower, encoder, samples, memory, metric,
                                                           preprocess, device, log)
    metric.cpu()
    path = checkpoint_path(opts)
    artefacts.save_checkpoint(metric, path, learner)
    log(f"checkpoint saved to {path} (the authors' layout)")
    return metric, learner, {"trained": trained, "checkpoint": f"{path.name} sha256:{sha256_of(path)}"}


def _trained_prompts(opts, tower, encoder, samples, memory, metric, preprocess, device, log
                     ) -> tuple[PromptLearner, dict]:
    prompts = opts.prompts
    text = TextTower(tower.clip)
    learner = PromptLearner.initial(text, opts.model, encoder.embed_dim, prompts.context_tokens, prompts.deep_tokens,
                                    prompts.deep_layers, generator=torch.Generator().manual_seed(opts.train.seed))
    graph = TextGraph(learner, text, deep_rounding=prompts.deep_rounding).to(device)
    trainer = PromptTrainer(memory, metric, tower.visual.proj.detach(), opts.image_size, encoder.grid, opts.train,
                            prompts, device)
    report = trainer.train(graph, encoder, samples, preprocess, batch_size=opts.batch_size)
    per_epoch = sum(report.epoch_seconds) / len(report.epoch_seconds)
    log(f"MRAD-CLIP prompts trained over {len(report.losses)} steps in {prompts.epochs} epochs "
        f"({per_epoch:.1f} s per epoch): loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}")
    return learner.cpu(), {**asdict(prompts), "steps": len(report.losses),
                           "epoch_seconds": [round(s, 2) for s in report.epoch_seconds],
                           "first_loss": report.losses[0], "last_loss": report.losses[-1]}


def _text_scoring(opts: ExportOptions, text: TextGraph) -> TextScoring:
    learner = text.learner
    prompts = tuple(" ".join(["X"] * learner.context_tokens) + f" {state.format(defaults.CLIP_CLASS_NAME)}."
                    for state in defaults.CLIP_STATES)
    return TextScoring(prior_threshold=opts.prompts.prior_threshold, temperature=opts.prompts.temperature,
                       prompts=prompts, context_tokens=learner.context_tokens, deep_tokens=learner.deep.shape[1],
                       deep_layers=learner.deep.shape[0], deep_rounding=text.deep_rounding)


def _aux_samples(opts: ExportOptions) -> list[Sample]:
    if not opts.aux_data:
        return []
    samples = scan(list(opts.aux_data), include_train=opts.include_train, what="--aux-data")
    if not any(s.anomalous for s in samples) or all(s.anomalous for s in samples):
        raise ExportError("auxiliary data must hold both normal (test/good) and anomalous (test/<defect>) images")
    return samples


def _arrays(layer: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    return layer.weight.detach().cpu().numpy(), layer.bias.detach().cpu().numpy()


def _memory(kind: str, query: str, feature: str, keys: np.ndarray, labels: np.ndarray, provenance: tuple[dict, ...],
            projection: tuple[np.ndarray, np.ndarray] | None, hnsw: HnswParams) -> Memory:
    dim = projection[0].shape[0] if projection is not None else keys.shape[1]
    memory = Memory(kind, query, feature, dim, projection, hnsw)
    memory.add(keys, labels, provenance)
    return memory


def _check_memory_dims(memory: MemoryBank, encoder: MradEncoder) -> None:
    dims = (memory.image_keys.shape[1], memory.pixel_keys.shape[1])
    if dims != (encoder.embed_dim, encoder.width):
        raise ExportError(f"--memory-bank keys have sizes {dims[0]} (image) and {dims[1]} (patch); the model gives "
                          f"{encoder.embed_dim} and {encoder.width}: the memory was built with another model")
