"""MRAD-CLIP's text side (spec section 6): learned prompts biased by region priors, through CLIP's text tower.

:class:`PromptLearner` holds what the reference trains and releases: the
context vectors of the normal and the anomalous prompt, the deep prompts of
the first text blocks, the fixed token embeddings around them, and the two
bias layers (``prompt_proj``) that turn an image's region priors into shifts
of the context. :class:`TextGraph` is what is traced to ONNX: region priors
(batch, 2, D) in, the two normalised text features (batch, 2, D) out. The
prompts are fixed, so tokenisation happens here, at export; the runtime needs
no tokenizer.

The text tower's attention is causal, so the feature pooled at a prompt's EOT
token depends only on the tokens up to it. The graph therefore runs the
shortest sequence that still holds every EOT (17 positions) instead of all 77:
the same result (tests/test_clip.py compares it with the full length; at
ViT-L-14-336 the two graphs gave identical features) in a third of the time
(36.8 against 107.6 ms on 2 cores).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mrad.runtime import defaults
from mrad.runtime.core.bundle import Preprocess
from mrad.runtime.formats.mvtec import Sample

from .encoder import MradEncoder
from .errors import ExportError
from .finetune import RetrievalMetric, dice_loss, focal_loss, retrieve
from .memory import EncodedBatch, MemoryBank, encode_samples
from .options import PromptOptions, TrainOptions

# Shapes the reference's prompt learner also holds, though its forward never uses them; they are written into
# saved checkpoints so that the authors' code loads them strictly.
_UNUSED_PROJECTION_OUT = 896
_UNUSED_MLP_WIDTH = 768


class TextTower(nn.Module):
    """CLIP's text transformer from token embeddings on: positions, blocks, ``ln_final``, EOT pooling, projection."""

    def __init__(self, model: nn.Module):
        super().__init__()
        missing = [n for n in ("token_embedding", "positional_embedding", "transformer", "ln_final",
                               "text_projection", "attn_mask") if getattr(model, n, None) is None]
        if missing or getattr(model, "text_pool_type", "argmax") != "argmax":
            raise ExportError("MRAD-CLIP needs a CLIP model with an OpenAI-layout text tower (token embedding, causal "
                              f"mask, EOT pooling, text projection); this one lacks {', '.join(missing) or 'EOT pooling'}")
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.blocks = model.transformer.resblocks
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask.clone(), persistent=False)
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def width(self) -> int:
        return self.positional_embedding.shape[1]

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    def forward(self, tokens: torch.Tensor, eot: torch.Tensor, deep: list[torch.Tensor]) -> torch.Tensor:
        """``tokens`` (n, L, width) embedded prompts -> (n, D) features at the ``eot`` positions (n,), not normalised.

        ``deep[i]`` (k, width) replaces the k tokens after SOT before block i + 1.
        """
        length = tokens.shape[1]
        x = tokens + self.positional_embedding[:length]
        mask = self.attn_mask[:length, :length]
        for i, block in enumerate(self.blocks):
            if 1 <= i <= len(deep):
                prompt = deep[i - 1].expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + prompt.shape[1]:]], dim=1)
            x = block(x, attn_mask=mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection


def tokenize_prompts(model_name: str, context_tokens: int, class_name: str = defaults.CLIP_CLASS_NAME,
                     states: tuple[str, ...] = defaults.CLIP_STATES) -> torch.Tensor:
    """The reference's prompts, ``X``*n followed by each state of ``class_name`` and a full stop, as CLIP BPE ids."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_name)
    prefix = " ".join(["X"] * context_tokens)
    return tokenizer([f"{prefix} {state.format(class_name)}." for state in states])


class PromptLearner(nn.Module):
    """The learned prompts and bias layers of MRAD-CLIP, in the reference's layout.

    ``ctx`` (2, n, width): context of the normal and the anomalous prompt.
    ``deep`` (layers, k, width): deep prompts. ``prefix`` (2, 1, width) and
    ``suffix`` (2, L-1-n, width): fixed token embeddings (SOT; class words,
    EOT, padding). ``tokens`` (2, L): the token ids, whose argmax is each
    prompt's EOT. ``normal_bias`` and ``anomalous_bias``: ``prompt_proj``'s
    ``mlp1`` and ``mlp2``, D -> width.
    """

    def __init__(self, ctx: torch.Tensor, deep: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor,
                 tokens: torch.Tensor, embed_dim: int):
        super().__init__()
        width = ctx.shape[-1]
        self.ctx = nn.Parameter(ctx.clone().float())
        self.deep = nn.Parameter(deep.clone().float())
        self.register_buffer("prefix", prefix.clone().float())
        self.register_buffer("suffix", suffix.clone().float())
        self.register_buffer("tokens", tokens.clone().long())
        self.normal_bias = nn.Linear(embed_dim, width)
        self.anomalous_bias = nn.Linear(embed_dim, width)

    @property
    def context_tokens(self) -> int:
        return self.ctx.shape[1]

    @property
    def eot(self) -> torch.Tensor:
        return self.tokens.argmax(dim=-1)

    @classmethod
    def initial(cls, text: TextTower, model_name: str, embed_dim: int, context_tokens: int = defaults.CLIP_CONTEXT_TOKENS,
                deep_tokens: int = defaults.CLIP_DEEP_TOKENS, deep_layers: int = defaults.CLIP_DEEP_LAYERS,
                generator: torch.Generator | None = None) -> "PromptLearner":
        """A learner before training: context and deep prompts drawn from N(0, 0.02), as the reference does."""
        tokens = tokenize_prompts(model_name, context_tokens)
        if tokens.shape[1] != text.context_length:
            raise ExportError(f"the tokenizer of {model_name} makes {tokens.shape[1]} tokens, its text tower takes "
                              f"{text.context_length}")
        with torch.no_grad():
            embedded = text.token_embedding(tokens).float()
        width = text.width
        ctx = torch.randn(2, context_tokens, width, generator=generator) * 0.02
        deep = torch.randn(deep_layers, deep_tokens, width, generator=generator) * 0.02
        learner = cls(ctx, deep, embedded[:, :1], embedded[:, 1 + context_tokens:], tokens, embed_dim)
        learner.normal_bias.reset_parameters()
        learner.anomalous_bias.reset_parameters()
        return learner

    def prompts(self, priors: torch.Tensor) -> torch.Tensor:
        """Region priors (B, 2, D) [normal, anomalous] -> embedded prompts (B, 2, L, width), context shifted."""
        bias = torch.stack([self.normal_bias(priors[:, 0]), self.anomalous_bias(priors[:, 1])], dim=1)
        ctx = self.ctx.unsqueeze(0) + bias.unsqueeze(2)
        batch = priors.shape[0]
        return torch.cat([self.prefix.expand(batch, -1, -1, -1), ctx, self.suffix.expand(batch, -1, -1, -1)], dim=2)

    # -- the authors' checkpoint layout ------------------------------------------------------------

    def to_reference(self) -> dict[str, dict[str, torch.Tensor]]:
        """``prompt_learner`` and ``prompt_proj`` as the reference saves them (loadable strictly by its code)."""
        width, depth = self.ctx.shape[-1], self.deep.shape[0]
        learner = {
            "ctx_pos": self.ctx[0][None, None], "ctx_neg": self.ctx[1][None, None],
            **{f"compound_prompts_text.{i}": self.deep[i] for i in range(depth)},
            "token_prefix_pos": self.prefix[0][None, None], "token_suffix_pos": self.suffix[0][None, None],
            "token_prefix_neg": self.prefix[1][None, None], "token_suffix_neg": self.suffix[1][None, None],
            "tokenized_prompts_pos": self.tokens[0][None, None].int(),
            "tokenized_prompts_neg": self.tokens[1][None, None].int(),
        }
        unused = {}  # never read by the reference's forward, but part of its state dict
        for i in range(depth):
            unused[f"compound_prompt_projections.{i}.weight"] = torch.zeros(_UNUSED_PROJECTION_OUT, width)
            unused[f"compound_prompt_projections.{i}.bias"] = torch.zeros(_UNUSED_PROJECTION_OUT)
        unused.update({"mlp.c_fc.weight": torch.zeros(4 * _UNUSED_MLP_WIDTH, _UNUSED_MLP_WIDTH),
                       "mlp.c_fc.bias": torch.zeros(4 * _UNUSED_MLP_WIDTH),
                       "mlp.c_proj.weight": torch.zeros(_UNUSED_MLP_WIDTH, 4 * _UNUSED_MLP_WIDTH),
                       "mlp.c_proj.bias": torch.zeros(_UNUSED_MLP_WIDTH)})
        bias = {f"{name}.{p}": getattr(layer, p) for name, layer in (("mlp1", self.normal_bias),
                                                                      ("mlp2", self.anomalous_bias))
                for p in ("weight", "bias")}
        return {"prompt_learner": _plain({**learner, **unused}), "prompt_proj": _plain(bias)}

    @classmethod
    def from_reference(cls, checkpoint: dict) -> "PromptLearner":
        """Build from the authors' layout; raises KeyError, ValueError or RuntimeError when it does not fit."""
        learner, bias = checkpoint["prompt_learner"], checkpoint["prompt_proj"]
        depth = len([k for k in learner if k.startswith("compound_prompts_text.")])
        deep = torch.stack([learner[f"compound_prompts_text.{i}"] for i in range(depth)])
        ctx = torch.cat([learner["ctx_pos"].reshape(1, *learner["ctx_pos"].shape[-2:]),
                         learner["ctx_neg"].reshape(1, *learner["ctx_neg"].shape[-2:])])
        prefix = torch.stack([learner["token_prefix_pos"].reshape(1, -1), learner["token_prefix_neg"].reshape(1, -1)])
        width = prefix.shape[-1]
        suffix = torch.stack([learner["token_suffix_pos"].reshape(-1, width),
                              learner["token_suffix_neg"].reshape(-1, width)])
        tokens = torch.stack([learner["tokenized_prompts_pos"].reshape(-1), learner["tokenized_prompts_neg"].reshape(-1)])
        if ctx.shape[-1] != width or deep.shape[-1] != width or tokens.shape[1] != 1 + ctx.shape[1] + suffix.shape[1]:
            raise ValueError(f"prompt shapes do not agree: context {tuple(ctx.shape)}, deep {tuple(deep.shape)}, "
                             f"prefix {tuple(prefix.shape)}, suffix {tuple(suffix.shape)}, tokens {tuple(tokens.shape)}")
        embed_dim = bias["mlp1.weight"].shape[1]
        result = cls(ctx, deep, prefix, suffix, tokens, embed_dim)
        result.normal_bias.load_state_dict({"weight": bias["mlp1.weight"], "bias": bias["mlp1.bias"]})
        result.anomalous_bias.load_state_dict({"weight": bias["mlp2.weight"], "bias": bias["mlp2.bias"]})
        return result


class TextGraph(nn.Module):
    """Region priors (B, 2, D) -> normalised text features (B, 2, D): what the runtime's text graph computes.

    ``length``: positions run through the tower; by default the shortest that
    holds every EOT (exact, the mask being causal). ``deep_rounding``
    "float16" rounds the deep prompts as the reference does, "none" keeps them.
    """

    def __init__(self, learner: PromptLearner, text: TextTower, length: int | None = None,
                 deep_rounding: str = defaults.CLIP_DEEP_ROUNDING):
        super().__init__()
        if deep_rounding not in ("float16", "none"):
            raise ExportError(f"deep prompt rounding must be 'float16' or 'none', got {deep_rounding!r}")
        if learner.ctx.shape[-1] != text.width:
            raise ExportError(f"the prompts are {learner.ctx.shape[-1]} wide, the text tower {text.width}: "
                              "the checkpoint was trained for another model")
        if learner.tokens.shape[1] != text.context_length:
            raise ExportError(f"the prompts hold {learner.tokens.shape[1]} tokens, the text tower takes "
                              f"{text.context_length}: the checkpoint was trained for another model")
        self.learner, self.text = learner, text
        self.length = length or int(learner.eot.max()) + 1
        self.deep_rounding = deep_rounding

    def forward(self, priors: torch.Tensor) -> torch.Tensor:
        prompts = self.learner.prompts(priors)[:, :, : self.length]
        batch, count = prompts.shape[:2]
        deep = self.learner.deep
        if self.deep_rounding == "float16":
            deep = deep.half().float()
        deep = [deep[i] for i in range(min(len(deep), len(self.text.blocks) - 1))]
        eot = self.learner.eot.repeat(batch)
        features = self.text(prompts.reshape(batch * count, self.length, -1), eot, deep)
        return F.normalize(features.reshape(batch, count, -1), dim=-1)


def _plain(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in group.items()}


@dataclass
class PromptReport:
    losses: list[float] = field(default_factory=list)  # per step
    epoch_seconds: list[float] = field(default_factory=list)


class PromptTrainer:
    """MRAD-CLIP's second stage (spec section 6): the prompts and their bias layers learn, all else frozen.

    Region priors come from the trained MRAD-FT pixel branch with similarity
    dropout on, as in the reference; the loss is focal on the two-channel
    patch-text map resized to S x S, dice on its anomalous channel against the
    mask and dice on its normal channel against the mask's complement.
    """

    def __init__(self, memory: MemoryBank, metric: RetrievalMetric, projection: torch.Tensor, image_size: int,
                 grid: int, train: TrainOptions, prompts: PromptOptions, device: str):
        self.train_opts, self.prompt_opts = train, prompts
        self.device = device
        self.image_size, self.grid = image_size, grid
        self.metric = metric.to(device).eval()
        for param in self.metric.parameters():
            param.requires_grad_(False)
        self.projection = projection.to(device)
        self.pixel_keys = torch.from_numpy(memory.pixel_keys).to(device)
        self.pixel_labels = torch.from_numpy(memory.pixel_labels).to(device)

    def priors(self, patches: torch.Tensor, projections: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """(B, 2, D) [normal, anomalous] mean projections of the regions the FT pixel branch finds."""
        with torch.no_grad():
            share = retrieve(patches, self.pixel_keys, self.pixel_labels, self.metric.patch_query,
                             self.metric.patch_key, self.train_opts.pixel_drop_percentile if dropout else None)
            anomalous = (share > self.prompt_opts.prior_threshold).float()
            regions = torch.stack([1 - anomalous, anomalous], dim=1)  # (B, 2, N)
            return (regions @ projections) / regions.sum(dim=2, keepdim=True).clamp(min=1)

    def loss(self, graph: TextGraph, batch: EncodedBatch, dropout: bool = True) -> torch.Tensor:
        patches = F.normalize(batch.patch_features, dim=-1)
        projections = F.normalize(batch.patch_features @ self.projection, dim=-1)
        text = graph(self.priors(patches, projections, dropout))  # (B, 2, D)
        shares = torch.softmax(projections @ text.transpose(1, 2) / self.prompt_opts.temperature, dim=-1)
        two_channel = shares.transpose(1, 2).reshape(-1, 2, self.grid, self.grid)
        maps = F.interpolate(two_channel, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        target = batch.masks.float()
        return focal_loss(maps, target) + dice_loss(maps[:, 1], target) + dice_loss(maps[:, 0], 1 - target)

    def mean_loss(self, graph: TextGraph, encoder: MradEncoder, samples: list[Sample], preprocess: Preprocess,
                  batch_size: int = 8) -> float:
        """The loss over every sample (dropout on, as in training), without learning: to see training work."""
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in encode_samples(encoder, samples, preprocess, batch_size, self.device, progress=False):
                total += self.loss(graph, batch).item() * len(batch.samples)
                count += len(batch.samples)
        return total / count

    def train(self, graph: TextGraph, encoder: MradEncoder, samples: list[Sample], preprocess: Preprocess,
              batch_size: int = 8) -> PromptReport:
        opts = self.train_opts
        generator = torch.Generator().manual_seed(opts.seed + 1)  # the FT stage used the seed's own order
        graph.to(self.device).train()
        optimiser = torch.optim.Adam(graph.learner.parameters(), lr=opts.learning_rate, betas=opts.betas)
        per_epoch = math.ceil(len(samples) / batch_size)
        report = PromptReport()
        with tqdm(total=self.prompt_opts.epochs * per_epoch, desc="training MRAD-CLIP prompts", unit="step") as bar:
            for _ in range(self.prompt_opts.epochs):
                started = time.perf_counter()
                order = torch.randperm(len(samples), generator=generator).tolist()
                for batch in encode_samples(encoder, [samples[i] for i in order], preprocess, batch_size,
                                            self.device, progress=False):
                    loss = self.loss(graph, batch)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    report.losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                report.epoch_seconds.append(time.perf_counter() - started)
        graph.eval()
        return report
