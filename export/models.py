"""One factory: an open_clip model name plus weights -> a frozen image tower.

Weights come from an open_clip ``pretrained`` tag (downloaded into the open_clip
cache, or found there), from a local checkpoint file, or, only when asked for by
name with ``none``, from a seeded random initialisation.
"""

from __future__ import annotations

import os
import re
import socket
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from mrad.runtime.files import sha256_of

from .errors import ExportError

RANDOM_WEIGHTS = "none"
TINY_MODEL = "tiny"
HUB_HOST = "huggingface.co"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)


@dataclass(frozen=True)
class LoadedTower:
    visual: torch.nn.Module
    name: str
    weights: str  # human-readable origin, recorded in the manifest
    quick_gelu: bool
    clip: torch.nn.Module  # the whole frozen CLIP model: MRAD-CLIP also needs its text tower


SAFE_TORCH = (2, 6)


def load_image_tower(name: str, pretrained: str, seed: int = 0, quick_gelu: bool | None = None,
                     cache_dir: str | None = None) -> LoadedTower:
    """Build ``name`` with ``pretrained`` weights and return its frozen, eval-mode image tower.

    ``pretrained``: an open_clip tag (``openai``), a checkpoint file, or ``none``
    for random weights drawn with ``seed``. ``quick_gelu`` defaults to what the
    tag says (OpenAI weights use QuickGELU); for a local file of OpenAI weights
    pass ``True`` or use the ``-quickgelu`` model name.
    """
    if name not in open_clip.list_models():
        raise ExportError(
            f"unknown model {name!r}; use an open_clip ViT name such as ViT-L-14-336 or ViT-B-16, "
            f"or '{TINY_MODEL}' for the built-in test model"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    path = Path(pretrained)
    if pretrained == RANDOM_WEIGHTS:
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=bool(quick_gelu))
        weights = f"random (seed {seed}, asked for with --pretrained {RANDOM_WEIGHTS})"
    elif pretrained in tags:
        model = _from_tag(name, pretrained, quick_gelu, cache_dir)
        weights = f"open_clip:{pretrained}"
    elif path.is_file():
        model = _from_file(name, path, quick_gelu)
        weights = f"file:{path.name} sha256:{sha256_of(path)}"
    else:
        known = ", ".join(tags) if tags else "none published"
        raise ExportError(
            f"--pretrained {pretrained!r} is neither an open_clip tag for {name} ({known}), an existing "
            f"checkpoint file, nor '{RANDOM_WEIGHTS}' (random weights, for tests only)"
        )
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    visual = model.visual
    gelu = isinstance(visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    return LoadedTower(visual=visual, name=name, weights=weights, quick_gelu=gelu, clip=model)


def _from_tag(name: str, tag: str, quick_gelu: bool | None, cache_dir: str | None) -> torch.nn.Module:
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    force = tag_cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu
    try:
        # Without a route to the hub, look in the cache only: the hub client would
        # otherwise retry for about a minute before giving up.
        with _hub_offline(not _hub_reachable()):
            return open_clip.create_model(name, pretrained=tag, force_quick_gelu=force, cache_dir=cache_dir)
    except RuntimeError as exc:
        raise ExportError(
            f"weights for {name} '{tag}' are not in the open_clip cache and could not be downloaded. "
            f"Without network, fetch {tag_cfg.get('url') or tag_cfg.get('hf_hub')} on another machine, copy it "
            f"here and pass its path: --pretrained /path/to/file (cause: {exc})"
        ) from exc


def require_safe_torch() -> None:
    """Refuse torch releases whose ``weights_only`` loading can be bypassed (CVE-2025-32434, fixed in 2.6).

    From 2.6 on ``torch.load`` also defaults to ``weights_only=True``, which
    covers the plain ``torch.load`` that open_clip's OpenAI loader falls back to.
    """
    release = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if release < SAFE_TORCH:
        raise ExportError(f"torch {torch.__version__} can be made to run code while loading a checkpoint "
                          f"(CVE-2025-32434); install torch>={'.'.join(map(str, SAFE_TORCH))}")


def _from_file(name: str, path: Path, quick_gelu: bool | None) -> torch.nn.Module:
    """A state-dict checkpoint (open_clip, safetensors) or one of OpenAI's TorchScript archives."""
    require_safe_torch()
    if _is_torchscript_archive(path):
        # OpenAI's released .pt files: TorchScript, read without unpickling Python objects.
        try:
            model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
        except Exception as exc:  # a damaged or hostile archive; its fallback loads weights only
            raise ExportError(f"checkpoint {path} is not a loadable OpenAI archive, or holds more than weights "
                              f"({type(exc).__name__}: {exc})") from exc
        expected = open_clip.create_model(name, pretrained=None, force_quick_gelu=True).visual
        _check_same_architecture(name, path, expected, model.visual)
        return model
    try:
        return open_clip.create_model(name, pretrained=str(path), force_quick_gelu=bool(quick_gelu))
    except Exception as exc:  # open_clip raises many types for a file that does not fit
        raise ExportError(f"checkpoint {path} could not be loaded into {name}: {exc}") from exc


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in entry for entry in archive.namelist())


def _check_same_architecture(name: str, path: Path, expected: torch.nn.Module, loaded: torch.nn.Module) -> None:
    want = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    heads = (expected.transformer.resblocks[0].attn.num_heads, loaded.transformer.resblocks[0].attn.num_heads)
    if want != have or heads[0] != heads[1]:
        raise ExportError(f"checkpoint {path} holds a different architecture than {name}; pass the matching --model")


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot: let the hub client try
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    import huggingface_hub.constants as hub

    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved

