"""Spec section 1 on its own, against torchvision and Pillow with the spec's constants written out here."""

import numpy as np
import open_clip
import pytest
from PIL import Image
from torchvision import transforms

from mrad.runtime import defaults
from mrad.runtime.core.bundle import Preprocess
from mrad.runtime.core.preprocess import load_mask, load_rgb, to_input

# Copied from the spec (docs/METHOD.md section 1), not imported from the code under test.
SPEC_MEAN = (0.48145466, 0.4578275, 0.40821073)
SPEC_STD = (0.26862954, 0.26130258, 0.27577711)
TOLERANCE = 1e-6  # the same bicubic pixels, normalised in float32 in another order


def torchvision_input(image: Image.Image, side: int) -> np.ndarray:
    """The reference's image transform: bicubic resize to S x S, centre crop (a no-op), to [0, 1], normalise."""
    transform = transforms.Compose([
        transforms.Resize((side, side), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(side),
        transforms.ToTensor(),
        transforms.Normalize(SPEC_MEAN, SPEC_STD),
    ])
    return transform(image).numpy()


def test_defaults_are_the_spec_and_open_clip_constants():
    assert defaults.CLIP_MEAN == SPEC_MEAN == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert defaults.CLIP_STD == SPEC_STD == tuple(open_clip.OPENAI_DATASET_STD)


@pytest.mark.parametrize("side", [112, 518])
def test_image_preprocessing_is_the_spec(target_images, side):
    rng = np.random.default_rng(0)
    odd = Image.fromarray(rng.integers(0, 256, size=(77, 130, 3), dtype=np.uint8))  # not square, not a multiple
    spec = Preprocess(image_size=side, mean=defaults.CLIP_MEAN, std=defaults.CLIP_STD)
    for image in [Image.open(target_images[0]).convert("RGB"), odd]:
        np.testing.assert_allclose(to_input(load_rgb(image), spec), torchvision_input(image, side), atol=TOLERANCE)


def test_mask_binarisation_is_the_spec(synth_data):
    """Binarise at the mask's own size (> 0), resize bilinearly as torchvision does for PIL masks, binarise (> 0.5)."""
    path = next(synth_data[0].glob("*/ground_truth/*/*_mask.png"))
    raw = np.asarray(Image.open(path).convert("L")) > 0
    binary = Image.fromarray(raw.astype(np.uint8) * 255)
    want = transforms.ToTensor()(transforms.Resize((112, 112))(binary))[0].numpy() > 0.5
    np.testing.assert_array_equal(load_mask(path, (112, 112)), want)
    np.testing.assert_array_equal(load_mask(raw.astype(np.uint8) * 7, (112, 112)), want)  # an array: any value > 0
    assert want.any() and not want.all()


def _saved(tmp_path, array, name, **kwargs):
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(array, **kwargs).save(path)
    return path


def test_every_mode_becomes_8bit_rgb_by_the_stated_rule(tmp_path):
    from PIL import Image

    from mrad.runtime.core.preprocess import load_rgb

    ramp16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    got = np.asarray(load_rgb(_saved(tmp_path, ramp16, "deep.png")))
    np.testing.assert_array_equal(got[..., 0], np.rint(ramp16.astype(np.float64) * 255 / 65535).astype(np.uint8))
    assert got.max() == 255 and got[0, 1, 0] == 0, "scaled over the 16-bit range, not clipped at 255"
    floats = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    got = np.asarray(load_rgb(Image.fromarray(floats, mode="F")))
    np.testing.assert_array_equal(got[..., 1], np.rint(floats * 255).astype(np.uint8))
    rgba = np.dstack([np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8), np.uint8)])
    assert np.asarray(load_rgb(_saved(tmp_path, rgba, "alpha.png"))).min() == 200, "alpha dropped, not composited"
    grey = np.asarray(load_rgb(_saved(tmp_path, np.full((8, 8), 77, np.uint8), "grey.png")))
    assert grey.shape == (8, 8, 3) and (grey == 77).all()


@pytest.mark.parametrize("image,message", [
    (lambda: Image.fromarray(np.full((4, 4), 2.0, np.float32), mode="F"), "values outside \\[0, 1\\]"),
    (lambda: Image.fromarray(np.full((4, 4), np.nan, np.float32), mode="F"), "or NaN"),
    (lambda: Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I"), "only values in 0..65535"),
    (lambda: np.zeros((0, 5, 3), np.uint8), "H, W >= 1"),
    (lambda: np.zeros((4, 4, 3), np.float32), "uint8"),
])
def test_unreadable_images_are_refused(image, message):
    from mrad.runtime import ImageError
    from mrad.runtime.core.preprocess import load_rgb

    with pytest.raises(ImageError, match=message):
        load_rgb(image())


def test_pixel_limit_refuses_before_decoding(tmp_path):
    """A decompression bomb: a small file whose header promises a huge image."""
    import zlib

    from mrad.runtime import ImageError
    from mrad.runtime.core.preprocess import load_rgb

    width = height = 12000  # 144 MP of zeros compress to a few hundred KB
    rows = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)), 9)
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="more than the limit of 100,000,000"):
        load_rgb(bomb)
    with pytest.raises(ImageError, match="more than the limit of 1,000"):
        load_rgb(np.zeros((40, 40, 3), np.uint8), max_pixels=1000)


def test_only_regular_files_are_opened(tmp_path):
    import os

    from mrad.runtime import ImageError
    from mrad.runtime.core.preprocess import load_mask, load_rgb

    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(ImageError, match="not a regular file"):
        load_rgb(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_mask(fifo, None)


def test_sixteen_bit_masks_keep_their_ones(tmp_path):
    from mrad.runtime.core.preprocess import load_mask

    mask = np.zeros((8, 8), np.uint16)
    mask[2:4, 2:4] = 1
    assert load_mask(_saved(tmp_path, mask, "mask16.png"), None).sum() == 4
