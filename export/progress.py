"""The phases of an export, each said as it begins with how far the export is: ``[4/9] tracing ...``.

An export of ViT-L runs for minutes in steps that report nothing themselves (tracing, ONNX Runtime's
optimisation); a user must see which one runs and how many are left. Steps that iterate (encoding the
auxiliary images, training, calibration) add a progress bar of their own. Torch-free: mrad-export names
its first phase, importing PyTorch, before it imports it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from .options import ExportOptions

PHASES = {
    "import": "importing PyTorch and open_clip",
    "weights": "loading the weights ({model}, {pretrained})",
    "memory": "building the memory from the auxiliary images",
    "released": "reading the released memory bank",
    "train-ft": "training MRAD-FT's retrieval metric",
    "train-prompts": "training MRAD-CLIP's prompts",
    "checkpoint": "reading the checkpoint's trained layers",
    "trace": "tracing the encoder to ONNX (PyTorch's exporter; the longest step at large models)",
    "fuse": "fusing the attention products",
    "optimise": "optimising the encoder graph with ONNX Runtime",
    "check": "checking the ONNX encoder against PyTorch",
    "text": "tracing, optimising and checking the text graph",
    "index": "writing the memories and their indexes",
    "sign": "signing the bundle",
    "derive": "deriving the {precision} encoder from fp32 and measuring it",
}


def plan(opts: ExportOptions) -> list[str]:
    """The phases ``opts`` goes through, in order (keys of PHASES)."""
    trains = opts.variant != "tf" and not (opts.checkpoint or opts.ft_checkpoint)
    phases = ["import", "weights", "released" if opts.memory_bank else "memory"]
    if opts.variant != "tf":
        phases += (["train-ft"] + (["train-prompts"] if opts.variant == "clip" else [])) if trains else ["checkpoint"]
    phases += ["trace", "fuse", "optimise", "check"] + (["text"] if opts.variant == "clip" else []) + ["index"]
    if opts.precision != "fp32":
        return phases + ["derive"]  # signs the derived bundle itself
    return phases + (["sign"] if opts.sign_key else [])


class Steps:
    """Says each phase of ``phases`` as it begins (``[k/N] what``); the total time at the end."""

    def __init__(self, phases: list[str], log: Callable[[str], None], **names):
        self.phases, self.log, self.names = list(phases), log, names
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if phase in self.phases:
            number = self.phases.index(phase) + 1
            self.log(f"[{number}/{len(self.phases)}] {PHASES[phase].format(**self.names)}")
        yield

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def export_steps(opts: ExportOptions, log: Callable[[str], None]) -> Steps:
    return Steps(plan(opts), log, model=opts.model, pretrained=opts.pretrained, precision=opts.precision)


def silent() -> Steps:
    """Steps that say nothing: for callers that do not report phases."""
    return Steps([], lambda message: None)
