"""mrad-export: build a bundle from CLIP weights and labelled auxiliary data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from mrad.runtime import defaults
from mrad.runtime.commands.common import command

# Torch-free: --help works on a runtime-only install; the export itself imports torch.
from .options import CHECKPOINT_SUFFIXES, PRECISIONS, VARIANTS, ExportOptions, PromptOptions, TrainOptions
from .progress import export_steps

EXAMPLES = """
\b
Examples:
  # the paper's setting: ViT-L-14-336 with OpenAI weights, memory from VisA
  mrad-export --variant tf --model ViT-L-14-336 --pretrained openai \\
      --aux-data /data/visa --out bundles/visa-tf
\b
  # offline: pass the checkpoint file instead of the tag
  mrad-export --model ViT-L-14-336 --pretrained ~/ckpt/ViT-L-14-336px.pt \\
      --quick-gelu --aux-data /data/visa --out bundles/visa-tf
\b
  # MRAD-FT: train the retrieval metric (one epoch), fold it into the graph
  mrad-export --variant ft --model ViT-L-14-336 --pretrained openai \\
      --aux-data /data/visa --out bundles/visa-ft
\b
  # from the authors' released artefacts, without rebuilding or retraining
  mrad-export --variant ft --pretrained ~/ckpt/ViT-L-14-336px.pt --quick-gelu \\
      --memory-bank cache_model_visa.pt cache_patch_model_visa.pt \\
      --checkpoint mrad_ft_epoch_1.pth --out bundles/visa-ft
\b
  # MRAD-CLIP, the paper's headline variant, from the authors' checkpoint
  mrad-export --variant clip --checkpoint test_on_mvtec.pth \\
      --memory-bank cache_model_visa.pt cache_patch_model_visa.pt \\
      --pretrained ~/ckpt/ViT-L-14-336px.pt --quick-gelu --out bundles/mvtec-clip
\b
  # MRAD-CLIP trained here: 1 FT epoch, then 5 prompt epochs (a GPU helps)
  mrad-export --variant clip --model ViT-L-14-336 --pretrained openai \\
      --aux-data /data/visa --device cuda --out bundles/visa-clip
\b
  # the built-in tiny model with random weights (tests, demos)
  mrad-synth --out data/synth
  mrad-export --model tiny --pretrained none --image-size 224 \\
      --aux-data data/synth/aux --out bundles/tiny-tf
"""


@command("mrad-export", epilog=EXAMPLES)
@click.option("--variant", type=click.Choice(VARIANTS), default="tf", show_default=True,
              help="tf: train-free retrieval; ft: learned retrieval metric; clip: ft's image branch and a patch map "
                   "from learned text prompts biased by region priors.")
@click.option("--model", default="ViT-L-14-336", show_default=True,
              help="open_clip ViT name (ViT-B-16, ViT-L-14-336, ...) or 'tiny'.")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip tag, path of a local checkpoint file, or 'none' for seeded random weights.")
@click.option("--aux-data", "aux_data", multiple=True, type=click.Path(path_type=Path),
              help="Root of labelled auxiliary data in the MVTec AD layout; repeat for several roots.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--image-size", default=defaults.IMAGE_SIZE, show_default=True, type=click.IntRange(min=14),
              help="Input side S; a multiple of the patch size.")
@click.option("--include-train", is_flag=True, help="Also use <category>/train/good as normal memory entries.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per encoder call while building the memory, and per MRAD-FT training step.")
@click.option("--device", default="auto", show_default=True, help="Torch device for export: auto, cpu, cuda, cuda:1 ...")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights of --pretrained none.")
@click.option("--quick-gelu/--no-quick-gelu", default=None,
              help="Force the activation; by default the tag decides (OpenAI weights use QuickGELU).")
@click.option("--retrieval", type=click.Choice(defaults.RETRIEVAL_MODES), default=defaults.RETRIEVAL, show_default=True,
              help="Runtime default: exact softmax over the whole memory, or top-k through the hnsw index.")
@click.option("--top-k", default=defaults.TOP_K, show_default=True, type=click.IntRange(min=1),
              help="Entries retrieved per query in hnsw mode.")
@click.option("--ef-search", default=defaults.HNSW_EF_SEARCH, show_default=True, type=click.IntRange(min=1),
              help="hnswlib search breadth in hnsw mode.")
@click.option("--image-weight", default=defaults.IMAGE_WEIGHT, show_default=True, type=click.FloatRange(0, 1),
              help="Weight k of the image-level probability in the score: (1 - k) * top-1% map mean + k * p_img.")
@click.option("--sigma", default=defaults.SIGMA, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Gaussian smoothing of the map, in input pixels.")
@click.option("--top-fraction", default=defaults.TOP_FRACTION, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True), help="Share of the map's highest values averaged into the score.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="The encoder's: int8 (CPUs; calibrated on the aux images) or fp16 (GPUs) are derived from fp32 "
                   "and their fidelity to it goes into the manifest (as mrad-quantize does); needs the 'quantize' "
                   "extra.")
@click.option("--calibration-images", default=ExportOptions.calibration_images, show_default=True,
              type=click.IntRange(min=1), help="With --precision int8/fp16: aux images to calibrate and measure on.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds files.")
@click.option("--sign-key", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Sign the bundle with this elliptic-curve private key (PEM; OpenSSF model-signing, needs the "
                   "'sign' extra); mrad-run --trusted-key PUB then refuses anything else.")
@click.option("--memory-bank", nargs=2, type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              metavar="IMAGE_FILE PATCH_FILE",
              help="Released memory (cache_model_<name>.pt cache_patch_model_<name>.pt) instead of building one.")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The authors' checkpoint of the variant asked for: ft (image_proj, patch_proj) or clip (also "
                   "prompt_learner, prompt_proj). Exported without training.")
@click.option("--ft-checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The same as --checkpoint, for --variant ft.")
@click.option("--checkpoint-out", type=click.Path(path_type=Path),
              help="Where to save the trained layers [default: beside the bundle, <out>"
                   f"{CHECKPOINT_SUFFIXES['ft']} or <out>{CHECKPOINT_SUFFIXES['clip']}].")
@click.option("--epochs", default=TrainOptions.epochs, show_default=True, type=click.IntRange(min=1))
@click.option("--learning-rate", default=TrainOptions.learning_rate, show_default=True, type=float,
              help="Adam learning rate, cosine-decayed to --min-learning-rate over all steps.")
@click.option("--min-learning-rate", default=TrainOptions.min_learning_rate, show_default=True, type=float)
@click.option("--train-seed", default=TrainOptions.seed, show_default=True, type=int,
              help="Seed of the layer initialisation and of the shuffling.")
@click.option("--pixel-drop-percentile", default=TrainOptions.pixel_drop_percentile, show_default=True,
              type=click.FloatRange(0, 1), help="Similarity dropout of the pixel branch while training.")
@click.option("--image-drop-percentile", default=TrainOptions.image_drop_percentile, show_default=True,
              type=click.FloatRange(0, 1), help="Similarity dropout of the image branch while training.")
@click.option("--image-temperature", default=TrainOptions.image_temperature, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Divides the image probabilities in the loss.")
@click.option("--prompt-epochs", default=PromptOptions.epochs, show_default=True, type=click.IntRange(min=1),
              help="clip: epochs of the prompt stage, after the FT epoch(s); Adam at --learning-rate, no decay.")
@click.option("--context-tokens", default=PromptOptions.context_tokens, show_default=True, type=click.IntRange(min=1),
              help="clip: learned context tokens of each prompt.")
@click.option("--deep-tokens", default=PromptOptions.deep_tokens, show_default=True, type=click.IntRange(min=1),
              help="clip: tokens after SOT replaced by deep prompts in the first text blocks.")
@click.option("--deep-layers", default=PromptOptions.deep_layers, show_default=True, type=click.IntRange(min=0),
              help="clip: text blocks (after the first) that receive deep prompts.")
@click.option("--prior-threshold", default=PromptOptions.prior_threshold, show_default=True,
              type=click.FloatRange(0, 1), help="clip: patches whose FT pixel share exceeds this form the anomalous "
                                                "region prior.")
@click.option("--text-temperature", default=PromptOptions.temperature, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="clip: divides patch-text similarities before "
                                                                "their softmax.")
@click.option("--deep-rounding", type=click.Choice(("float16", "none")), default=PromptOptions.deep_rounding,
              show_default=True, help="clip: round the deep prompts to float16 as the reference does, or keep "
                                      "float32.")
def main(memory_bank, epochs, learning_rate, min_learning_rate, train_seed, pixel_drop_percentile,
         image_drop_percentile, image_temperature, prompt_epochs, context_tokens, deep_tokens, deep_layers,
         prior_threshold, text_temperature, deep_rounding, **kwargs):
    """Build an MRAD bundle: memory bank from auxiliary data, encoder traced to ONNX, memory packed as hnswlib indexes.

    The bundle directory holds manifest.json, encoder.onnx (for clip also text.onnx: region priors to text features)
    and, per memory level, its keys, labels, provenance and hnswlib index. Score it with mrad-run or
    mrad.runtime.Detector, without PyTorch.
    """
    train = TrainOptions(epochs=epochs, learning_rate=learning_rate, min_learning_rate=min_learning_rate,
                         seed=train_seed, pixel_drop_percentile=pixel_drop_percentile,
                         image_drop_percentile=image_drop_percentile, image_temperature=image_temperature)
    prompts = PromptOptions(epochs=prompt_epochs, context_tokens=context_tokens, deep_tokens=deep_tokens,
                            deep_layers=deep_layers, prior_threshold=prior_threshold, temperature=text_temperature,
                            deep_rounding=deep_rounding)
    options = ExportOptions(memory_bank=memory_bank or None, train=train, prompts=prompts, **kwargs)
    for module in ("torch", "open_clip"):  # a runtime-only install: one error line, before any phase is said
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
    steps = export_steps(options, log=lambda message: click.echo(message, err=True))
    with steps("import"):  # seconds, before anything else can be said
        from .build import export_bundle

    export_bundle(options, log=steps.log, steps=steps)
