"""The MRAD encoder (spec section 2) and the graph the runtime receives.

:class:`MradEncoder` reads the weights of an open_clip ViT image tower and
never modifies it: the positional embedding resized to the input grid is a
buffer of its own, computed once.

:class:`QueryGraph` is what is traced to ONNX: encoder features turned into
retrieval queries (normalised, and for MRAD-FT passed through the learned
query layers), so the runtime only does inner-product retrieval, and the
features themselves, so the runtime can make new memory entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from mrad.runtime.defaults import SMOOTHING_KERNELS

from .errors import ExportError


class MradEncoder(nn.Module):
    """Frozen CLIP ViT with the v-v attention path.

    ``forward(images)`` returns ``(image_features, patch_features)``:
    ``image_features`` (B, D) is the final CLS token of the ordinary path times
    ``proj``, without ``ln_post`` as in the reference; ``patch_features``
    (B, G*G, W) is ``ln_post`` of the v-v stream, smoothed over 1/3/5
    neighbourhoods, not normalised.
    """

    def __init__(self, visual: VisionTransformer, image_size: int):
        super().__init__()
        _check_supported(visual)
        patch = visual.patch_size[0]
        if image_size % patch:
            raise ExportError(f"--image-size {image_size} is not a multiple of the patch size {patch}")
        self.visual = visual
        self.image_size = image_size
        self.grid = image_size // patch
        self.register_buffer("pos_embed", _resize_pos_embed(visual.positional_embedding.detach(), self.grid))

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.shape[1]

    @property
    def heads(self) -> int:
        return self.visual.transformer.resblocks[0].attn.num_heads

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features, patch_tokens = self.tokens(images)
        return image_features, smooth_patches(patch_tokens, self.grid)

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_features, patch_tokens)``: the patch features before smoothing, (B, G*G, W)."""
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, G*G, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype))

        blocks = v.transformer.resblocks
        x_ori = _standard_block(blocks[0], x)
        x_vv = x_ori
        for block in blocks[1:]:
            attn, vv = _dual_attention(block, block.ln_1(x_ori))
            x_vv = x_vv + vv
            x_ori = x_ori + attn
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))

        return x_ori[:, 0] @ v.proj, v.ln_post(x_vv)[:, 1:]


def smooth_patches(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean of 1x1, 3x3 and 5x5 average pools, zero padding counted (spec section 2.7)."""
    b, n, w = patches.shape
    maps = patches.transpose(1, 2).reshape(b, w, grid, grid)
    pooled = sum(F.avg_pool2d(maps, k, stride=1, padding=k // 2) for k in SMOOTHING_KERNELS) / len(SMOOTHING_KERNELS)
    return pooled.flatten(2).transpose(1, 2)


class QueryGraph(nn.Module):
    """Encoder plus query head: images -> (image queries, patch queries, image features, patch features, patch tokens).

    Without projections (MRAD-TF) the queries are the L2-normalised features.
    With them (MRAD-FT) the normalised features pass through the learned query
    layers, exactly as the reference applies them before the inner product.
    The features are the encoder's, unnormalised: memory entries are made
    from them. The patch tokens are the patch features before smoothing: the
    line's own memories pool them at several scales.

    With ``project_patches`` (MRAD-CLIP) a sixth output holds the smoothed
    patch features projected into the joint space and normalised (spec
    section 6.1), which the text features are compared with. Projection and
    smoothing are both linear, so projecting the smoothed features is the
    reference's smoothing of the projected ones.
    """

    OUTPUTS = ("image_query", "patch_query", "image_feature", "patch_feature", "patch_tokens")
    PROJECTION = "patch_projection"

    def __init__(self, encoder: MradEncoder, image_query: nn.Linear | None = None,
                 patch_query: nn.Linear | None = None, project_patches: bool = False):
        super().__init__()
        self.encoder = encoder
        self.image_query = image_query if image_query is not None else nn.Identity()
        self.patch_query = patch_query if patch_query is not None else nn.Identity()
        self.project_patches = project_patches

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.OUTPUTS + ((self.PROJECTION,) if self.project_patches else ())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_features, patch_tokens = self.encoder.tokens(images)
        patch_features = smooth_patches(patch_tokens, self.encoder.grid)
        outputs = (self.image_query(F.normalize(image_features, dim=-1)),
                   self.patch_query(F.normalize(patch_features, dim=-1)),
                   image_features, patch_features, patch_tokens)
        if self.project_patches:
            outputs += (F.normalize(patch_features @ self.encoder.visual.proj, dim=-1),)
        return outputs


def _standard_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    attn, _ = _dual_attention(block, block.ln_1(x))
    x = x + attn
    return x + block.mlp(block.ln_2(x))


def _dual_attention(block: ResidualAttentionBlock, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordinary q-k attention and v-v attention of one block, both through its out-projection."""
    mha = block.attn
    b, n, w = h.shape
    heads = mha.num_heads
    qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, heads, w // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d_head)
    scale = (w // heads) ** -0.5

    def attend(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax((query @ key.transpose(-2, -1)) * scale, dim=-1)
        return mha.out_proj((weights @ v).transpose(1, 2).reshape(b, n, w))

    return attend(q, k), attend(v, v)


def _resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """CLS entry unchanged; patch entries resized bilinearly (align_corners=False) to grid x grid."""
    native = int(round((pos.shape[0] - 1) ** 0.5))
    patches = pos[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    if native != grid:
        patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([pos[:1], patches.flatten(2).transpose(1, 2)[0]], dim=0)


def _check_supported(visual: nn.Module) -> None:
    problems = []
    if not isinstance(visual, VisionTransformer):
        problems.append(f"the image tower is {type(visual).__name__}, not an open_clip VisionTransformer")
    else:
        if visual.attn_pool is not None or visual.pool_type != "tok":
            problems.append("it pools with attention or averaging instead of the class token")
        if visual.patch_size[0] != visual.patch_size[1]:
            problems.append("its patches are not square")
        if visual.proj is None:
            problems.append("it has no output projection")
        for i, block in enumerate(visual.transformer.resblocks):
            if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.ls_1, nn.Identity):
                problems.append(f"block {i} is not a plain CLIP block (custom block or layer scale)")
                break
    if problems:
        raise ExportError(
            "unsupported image tower for MRAD: " + "; ".join(problems)
            + ". MRAD needs an OpenAI-layout CLIP ViT (for example ViT-B-16, ViT-L-14, ViT-L-14-336)"
        )
