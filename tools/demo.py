"""The main job on built-in defaults: generate data, export a bundle, score unseen categories.

Uses the built-in tiny model with seeded random weights, since pretrained CLIP
weights may not be downloadable here: the figures show the pipeline works end
to end, not what MRAD achieves with real weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from mrad.export.build import export_bundle
from mrad.export.options import ExportOptions
from mrad.runtime.commands.common import command

from .metrics import auroc
from .synth import write_dataset


GOOD_PARTS = 6  # train/good images per category: enough for mrad-enroll to measure a threshold (5 or more)
TRY_CATEGORY = "checker"


@command("demo")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(path_type=Path))
@click.option("--image-size", default=224, show_default=True)
def main(out: Path, image_size: int):
    """Generate data, export a tiny TF bundle, score the target categories with mrad-run."""
    aux, target = write_dataset(out / "data", train=GOOD_PARTS)
    click.echo(f"[1/3] generated auxiliary data in {aux} and target data in {target}")
    bundle = out / "bundle-tiny-tf"
    click.echo("[2/3] mrad-export --variant tf --model tiny --pretrained none ...")
    export_bundle(ExportOptions(aux_data=[aux], out=bundle, model="tiny", pretrained="none",
                                image_size=image_size, overwrite=True), log=click.echo)
    scores_file = out / "scores.jsonl"
    command = ["mrad-run", "--bundle", str(bundle), "--input", f"{target}/*/test", "--out", str(scores_file)]
    click.echo(f"[3/3] {' '.join(command)}")
    subprocess.run([sys.executable, "-c", "from mrad.runtime.commands.run import main; main()", *command[1:]], check=True)
    lines = [json.loads(line) for line in scores_file.read_text().splitlines()]
    records = [r for r in lines if "score" in r]
    labels = [Path(r["source"]).parent.name != "good" for r in records]
    click.echo(f"image AUROC on the {len(records)} target images: {auroc(labels, [r['score'] for r in records]):.3f} "
               "(tiny model, random weights: a pipeline check, not a quality figure)")
    click.echo(next_steps(out, bundle, aux, target, scores_file))


def next_steps(out: Path, bundle: Path, aux: Path, target: Path, scores: Path) -> str:
    """What was made and what to try with it: commands with paths that exist, from the folder the demo ran in."""
    category = target / TRY_CATEGORY
    return f"""
What the demo made, in {Path.cwd()}:
  {bundle}/  the bundle: manifest, ONNX encoder, memories (tiny model, random weights)
  {aux}/  generated textures with painted defects, MVTec AD layout: what the memory was built from
  {target}/  two categories the bundle never saw: what was scored
  {scores}  one JSON line per image, then a summary

Try next, in {Path.cwd()} (each command's --help teaches the rest):
  {activate_command()}
  mrad-run --bundle {bundle} --input {category}/test --out -
      # scores on the terminal, one JSON line per image
  mrad-enroll --bundle {bundle} --normal {category}/train/good
      # teach it {GOOD_PARTS} good parts of {TRY_CATEGORY} and measure a threshold from them (--rollback undoes)
  mrad-run --bundle {bundle} --input {category}/test --loop --web 8080
      # the operator's page: open the address it prints; Ctrl-C stops
README.md, "Your first product", goes on from here.""".rstrip()


def activate_command() -> str:
    """How to enter the environment the demo ran in, which puts mrad-run, mrad-enroll, ... on PATH."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix == sys.base_prefix or not activate.is_file():  # not a virtual environment: commands already there
        return "# the mrad-* commands are installed in this Python's environment"
    try:
        shown = activate.relative_to(Path.cwd())
    except ValueError:
        shown = activate
    return f"source {shown}\n      # enters the environment: mrad-run, mrad-enroll, mrad-export, ... on PATH"


if __name__ == "__main__":
    main()
