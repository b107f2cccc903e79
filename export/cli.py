"""mrad-export: build a bundle from CLIP weights and labelled auxiliary data."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mrad.runtime.bundle import RETRIEVAL_MODES
from mrad.runtime.errors import MradError

from .build import VARIANTS, ExportOptions, export_bundle

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
  # the built-in tiny model with random weights (tests, demos)
  mrad-synth --out data/synth
  mrad-export --model tiny --pretrained none --image-size 224 \\
      --aux-data data/synth/aux --out bundles/tiny-tf
"""


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--variant", type=click.Choice(VARIANTS), default="tf", show_default=True,
              help="tf: train-free retrieval; ft: learned retrieval metric.")
@click.option("--model", default="ViT-L-14-336", show_default=True,
              help="open_clip ViT name (ViT-B-16, ViT-L-14-336, ...) or 'tiny'.")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip tag, path of a local checkpoint file, or 'none' for seeded random weights.")
@click.option("--aux-data", "aux_data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Root of labelled auxiliary data in the MVTec AD layout; repeat for several roots.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--image-size", default=518, show_default=True, type=click.IntRange(min=14),
              help="Input side S; a multiple of the patch size.")
@click.option("--include-train", is_flag=True, help="Also use <category>/train/good as normal memory entries.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="Torch device for export: auto, cpu, cuda, cuda:1 ...")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights of --pretrained none.")
@click.option("--quick-gelu/--no-quick-gelu", default=None,
              help="Force the activation; by default the tag decides (OpenAI weights use QuickGELU).")
@click.option("--retrieval", type=click.Choice(RETRIEVAL_MODES), default="exact", show_default=True,
              help="Runtime default: exact softmax over the whole memory, or top-k through the hnsw index.")
@click.option("--top-k", default=64, show_default=True, type=click.IntRange(min=1),
              help="Entries retrieved per query in hnsw mode.")
@click.option("--ef-search", default=128, show_default=True, type=click.IntRange(min=1),
              help="hnswlib search breadth in hnsw mode.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds files.")
def main(**kwargs):
    """Build an MRAD bundle: memory bank from auxiliary data, encoder traced to ONNX, memory packed as hnswlib indexes.

    The bundle directory holds manifest.json, encoder.onnx and one index plus one label array per memory level.
    Score it with mrad-run or mrad.runtime.Detector, without PyTorch.
    """
    try:
        export_bundle(ExportOptions(**kwargs), log=lambda msg: click.echo(msg, err=True))
    except MradError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
