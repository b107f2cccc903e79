"""The encoder follows spec section 2, checked against an independent rendering."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrad.export.encoder import MradEncoder, smooth_patches
from mrad.export.models import load_image_tower

from conftest import IMAGE_SIZE

TOLERANCE = 1e-5  # fp32, same operations in a different order


@pytest.fixture(scope="module")
def visual():
    return load_image_tower("tiny", "none", seed=3).visual


def spec_encoder(visual, images, grid):
    """Spec section 2 written plainly, using open_clip's own block for the standard path."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1)
    pos = visual.positional_embedding
    native = int((pos.shape[0] - 1) ** 0.5)
    patch_pos = pos[1:].T.reshape(1, -1, native, native)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bilinear", align_corners=False, antialias=False)
    x = visual.ln_pre(x + torch.cat([pos[:1], patch_pos.reshape(-1, grid * grid).T]))

    blocks = visual.transformer.resblocks
    x_ori = blocks[0](x)  # block 0: open_clip's standard CLIP block
    x_vv = x_ori
    for block in blocks[1:]:
        h = block.ln_1(x_ori)
        mha = block.attn
        width = h.shape[-1]
        heads = mha.num_heads
        v = F.linear(h, mha.in_proj_weight[2 * width :], mha.in_proj_bias[2 * width :])
        v = v.reshape(len(h), -1, heads, width // heads).transpose(1, 2)
        vv = torch.softmax(v @ v.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1) @ v
        x_vv = x_vv + mha.out_proj(vv.transpose(1, 2).reshape(h.shape))
        x_ori = x_ori + mha(h, h, h, need_weights=False)[0]
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
    image = x_ori[:, 0] @ visual.proj  # no ln_post on the CLS token, as the reference
    patches = visual.ln_post(x_vv)[:, 1:]
    return image, patches


def box_mean_zero_padded(maps: np.ndarray, k: int) -> np.ndarray:
    """k x k mean with zero padding counted, by explicit sums."""
    r = k // 2
    padded = np.pad(maps, [(0, 0), (0, 0), (r, r), (r, r)])
    out = np.zeros_like(maps)
    for dy in range(k):
        for dx in range(k):
            out += padded[:, :, dy : dy + maps.shape[2], dx : dx + maps.shape[3]]
    return out / (k * k)


def test_encoder_matches_spec_rendering(visual):
    encoder = MradEncoder(visual, IMAGE_SIZE)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        image, patches = encoder(images)
        want_image, raw_patches = spec_encoder(visual, images, encoder.grid)
    g = encoder.grid
    maps = raw_patches.transpose(1, 2).reshape(2, -1, g, g).numpy()
    want_patches = sum(box_mean_zero_padded(maps, k) for k in (1, 3, 5)) / 3
    assert torch.allclose(image, want_image, atol=TOLERANCE)
    np.testing.assert_allclose(patches.transpose(1, 2).reshape(2, -1, g, g).numpy(), want_patches, atol=TOLERANCE)


def test_ordinary_path_is_clip(visual):
    """At the native size, the ordinary path's CLS token is open_clip's own transformer output."""
    native = visual.image_size[0]
    encoder = MradEncoder(visual, native)
    images = torch.randn(1, 3, native, native)
    with torch.no_grad():
        image, _ = encoder(images)
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(1, 1, -1), x], dim=1) + visual.positional_embedding
        tokens = visual.transformer(visual.ln_pre(x))
    assert torch.allclose(image, tokens[:, 0] @ visual.proj, atol=TOLERANCE)


def test_encoder_leaves_the_model_untouched(visual):
    before = visual.positional_embedding.detach().clone()
    encoder = MradEncoder(visual, IMAGE_SIZE)
    with torch.no_grad():
        encoder(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert torch.equal(visual.positional_embedding, before)
    assert encoder.pos_embed.shape == (encoder.grid**2 + 1, encoder.width)


def test_smoothing_by_hand():
    ones = torch.ones(1, 25, 1)  # a 5 x 5 grid of ones
    smoothed = smooth_patches(ones, 5).reshape(5, 5)
    corner = (1 + 4 / 9 + 9 / 25) / 3  # zero padding counted in each average
    assert smoothed[0, 0].item() == pytest.approx(corner, abs=1e-6)
    assert smoothed[2, 2].item() == pytest.approx(1.0, abs=1e-6)


def test_image_size_must_fit_patches(visual):
    from mrad.export.errors import ExportError

    with pytest.raises(ExportError, match="multiple of the patch size 14"):
        MradEncoder(visual, 100)
