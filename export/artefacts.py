"""The authors' released artefacts: MRAD-FT and MRAD-CLIP checkpoints and memory-bank files.

Both are torch files. They are read with ``weights_only=True``, which refuses
anything but tensors and plain containers, so no code from them runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import ExportError
from .finetune import RetrievalMetric
from .memory import MemoryBank
from .models import require_safe_torch
from .prompting import PromptLearner


def _load(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{what} {path} does not exist")
    require_safe_torch()
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ExportError(
            f"{what} {path} holds more than tensors and plain containers; it is refused because loading it "
            f"could run code. Re-save it as a dict of tensors ({exc.__class__.__name__})"
        ) from exc
    except Exception as exc:  # zip, EOF and format errors come as many types
        raise ExportError(f"{what} {path} is not a readable torch file ({exc})") from exc
    if not isinstance(content, dict):
        raise ExportError(f"{what} {path} holds a {type(content).__name__}, expected a dict")
    return content


CLIP_GROUPS = ("prompt_learner", "prompt_proj")


def load_checkpoint(path: Path, option: str = "--checkpoint") -> RetrievalMetric:
    """MRAD-FT's layers from the authors' checkpoint of either trained variant.

    ``image_proj`` (mlp1 query, mlp2 key) and ``patch_proj`` (fc.0 query, fc.1 key).
    """
    content = _load(path, option)
    try:
        return RetrievalMetric.from_reference(content)
    except (KeyError, RuntimeError, AttributeError, IndexError, TypeError) as exc:
        raise ExportError(
            f"{option} {path} is not an MRAD-FT or MRAD-CLIP checkpoint: expected image_proj.mlp1/mlp2 and "
            f"patch_proj.fc.0/fc.1 weights and biases ({type(exc).__name__}: {exc})"
        ) from exc


def load_prompts(path: Path, option: str = "--checkpoint") -> PromptLearner:
    """MRAD-CLIP's prompts (``prompt_learner``, ``prompt_proj``) from the authors' checkpoint; an FT one is named."""
    content = _load(path, option)
    if not all(group in content for group in CLIP_GROUPS):
        kind = "an MRAD-FT checkpoint" if "image_proj" in content else "not an MRAD checkpoint"
        raise ExportError(f"{option} {path} is {kind}: --variant clip needs prompt_learner and prompt_proj too "
                          "(the authors' MRAD-CLIP checkpoints, such as test_on_mvtec.pth); export this file with "
                          "--variant ft")
    try:
        return PromptLearner.from_reference(content)
    except (KeyError, RuntimeError, AttributeError, IndexError, TypeError, ValueError) as exc:
        raise ExportError(
            f"{option} {path} holds prompt_learner and prompt_proj, but not as MRAD-CLIP's reference writes them: "
            "expected ctx_pos/ctx_neg, compound_prompts_text.N, token_prefix/suffix_pos/neg, "
            f"tokenized_prompts_pos/neg and prompt_proj.mlp1/mlp2 ({type(exc).__name__}: {exc})"
        ) from exc


def save_checkpoint(metric: RetrievalMetric, path: Path, learner: PromptLearner | None = None) -> None:
    """The authors' layout: MRAD-FT's groups, and with ``learner`` MRAD-CLIP's as well."""
    content = metric.to_reference()
    if learner is not None:
        content.update(learner.to_reference())
    torch.save(content, path)


def _memory_level(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[dict, ...]]:
    content = _load(path, "--memory-bank file")
    keys, values = content.get("keys"), content.get("values")
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise ExportError(f"--memory-bank file {path} must be a dict with tensors 'keys' and 'values'")
    if keys.ndim != 2 or values.shape != (len(keys), 2):
        raise ExportError(f"--memory-bank file {path}: keys must be (N, dim) and values (N, 2), "
                          f"got {tuple(keys.shape)} and {tuple(values.shape)}")
    values = values.float()
    one_hot = ((values == 0) | (values == 1)).all() and (values.sum(dim=1) == 1).all()
    if not one_hot:
        raise ExportError(f"--memory-bank file {path}: values must be one-hot rows (normal, anomalous)")
    provenance = tuple({"source": f"{Path(path).name}#{i}"} for i in range(len(keys)))
    return keys.float().numpy(), values[:, 1].numpy().astype(np.uint8), provenance


def load_memory_bank(image_file: Path, patch_file: Path) -> MemoryBank:
    """``cache_model_<name>.pt`` (image level) and ``cache_patch_model_<name>.pt`` (pixel level)."""
    image_keys, image_labels, image_provenance = _memory_level(image_file)
    pixel_keys, pixel_labels, pixel_provenance = _memory_level(patch_file)
    return MemoryBank(image_keys, image_labels, pixel_keys, pixel_labels, image_provenance, pixel_provenance)


def save_memory_bank(memory: MemoryBank, image_file: Path, patch_file: Path) -> None:
    """Write a memory in the released layout (used by tests and to share a memory with the reference)."""
    for keys, labels, path in ((memory.image_keys, memory.image_labels, image_file),
                               (memory.pixel_keys, memory.pixel_labels, patch_file)):
        values = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), 2).float()
        torch.save({"keys": torch.from_numpy(keys), "values": values}, path)
