"""Spec section 1 on its own, against torchvision and Pillow with the spec's constants written out here."""

import numpy as np
import open_clip
import pytest
from PIL import Image
from torchvision import transforms

from mrad.runtime import defaults
from mrad.runtime.bundle import Preprocess
from mrad.runtime.preprocess import load_mask, load_rgb, to_input

# Copied from MRAD_SPEC.md section 1, not imported from the code under test.
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
