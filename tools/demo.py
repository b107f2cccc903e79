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


@command("demo")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(path_type=Path))
@click.option("--image-size", default=224, show_default=True)
def main(out: Path, image_size: int):
    """Generate data, export a tiny TF bundle, score the target categories with mrad-run."""
    aux, target = write_dataset(out / "data")
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


if __name__ == "__main__":
    main()
