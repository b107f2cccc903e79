"""Numerical fidelity of a TF bundle.

ONNX encoder against the PyTorch module, and the runtime's exact mode against
spec sections 3 and 4 written out with PyTorch, SciPy and Pillow.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from mrad.export.data import scan
from mrad.export.encoder import MradEncoder, QueryGraph
from mrad.export.models import load_image_tower
from mrad.runtime import Detector
from mrad.runtime.bundle import read_manifest

from conftest import IMAGE_SIZE, encoder_inputs

ONNX_TOLERANCE = 1e-5  # fp32 ONNX Runtime against fp32 PyTorch, normalised outputs
SCORE_TOLERANCE = 1e-5  # runtime exact mode against the spec's formulas
MAP_TOLERANCE = 1e-5
KEY_TOLERANCE = 1e-5  # memory keys are unit vectors


@pytest.fixture(scope="module")
def encoder():
    return MradEncoder(load_image_tower("tiny", "none", seed=0).visual, IMAGE_SIZE).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_encoder_matches_pytorch(tf_bundle, encoder, target_images, batch):
    manifest = read_manifest(tf_bundle)
    session = ort.InferenceSession(str(tf_bundle / manifest.encoder.file), providers=["CPUExecutionProvider"])
    images = encoder_inputs(target_images[:batch], manifest.preprocess)
    onnx_image, onnx_patch = session.run(None, {manifest.encoder.input: images.numpy()})
    with torch.no_grad():
        torch_image, torch_patch = QueryGraph(encoder)(images)
    np.testing.assert_allclose(onnx_image, torch_image.numpy(), atol=ONNX_TOLERANCE)
    np.testing.assert_allclose(onnx_patch, torch_patch.numpy(), atol=ONNX_TOLERANCE)


def spec_mask(path, size):
    raw = np.asarray(Image.open(path).convert("L")) > 0
    resized = Image.fromarray(raw.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized) / 255.0 > 0.5)


def spec_memory(encoder, aux_root, manifest):
    """Spec section 3: image keys and pixel keys with their labels, in scan order."""
    image_keys, image_labels, pixel_keys, pixel_labels = [], [], [], []
    g = encoder.grid
    for sample in scan([aux_root]):
        with torch.no_grad():
            f_img, f_pat = encoder(encoder_inputs([sample.image], manifest.preprocess))
        image_keys.append(F.normalize(f_img[0], dim=0))
        image_labels.append(int(sample.anomalous))
        mask = spec_mask(sample.mask, IMAGE_SIZE) if sample.anomalous else torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
        small = F.interpolate(mask[None, None].float(), size=(g, g), mode="bilinear", align_corners=False).flatten()
        for label, chosen in ((1, small == 1), (0, small == 0)):
            if chosen.any():
                pixel_keys.append(F.normalize(f_pat[0][chosen].mean(0), dim=0))
                pixel_labels.append(label)
    return torch.stack(image_keys), torch.tensor(image_labels), torch.stack(pixel_keys), torch.tensor(pixel_labels)


def spec_score(encoder, path, memory, manifest):
    """Spec section 4: exact softmax retrieval, bilinear map, Gaussian filter, top-1% fusion."""
    image_keys, image_labels, pixel_keys, pixel_labels = memory
    s, g = IMAGE_SIZE, encoder.grid
    with torch.no_grad():
        f_img, f_pat = encoder(encoder_inputs([path], manifest.preprocess))
    p_img = torch.softmax(F.normalize(f_img, dim=-1) @ image_keys.T, dim=-1) @ image_labels.float()
    m = torch.softmax(F.normalize(f_pat[0], dim=-1) @ pixel_keys.T, dim=-1) @ pixel_labels.float()
    up = F.interpolate(m.reshape(1, 1, g, g), size=(s, s), mode="bilinear", align_corners=False)
    smoothed = gaussian_filter(up[0, 0].double().numpy(), sigma=4)
    top = np.sort(smoothed.ravel())[::-1][: int(s * s * 0.01)]
    score = 0.3 * top.mean() + 0.7 * p_img.item()
    height, width = np.asarray(Image.open(path)).shape[:2]
    display = F.interpolate(torch.from_numpy(smoothed)[None, None], size=(height, width), mode="bilinear",
                            align_corners=False)[0, 0].numpy()
    return score, display


def test_memory_matches_spec(tf_bundle, encoder, synth_data):
    manifest = read_manifest(tf_bundle)
    image_keys, image_labels, pixel_keys, pixel_labels = spec_memory(encoder, synth_data[0], manifest)
    detector = Detector(tf_bundle, provider="cpu", retrieval="exact")
    np.testing.assert_allclose(detector.image_memory.keys, image_keys.numpy(), atol=KEY_TOLERANCE)
    np.testing.assert_array_equal(detector.image_memory.labels, image_labels.numpy())
    np.testing.assert_allclose(detector.pixel_memory.keys, pixel_keys.numpy(), atol=KEY_TOLERANCE)
    np.testing.assert_array_equal(detector.pixel_memory.labels, pixel_labels.numpy())
    assert pixel_labels.sum() > 0, "the generated data must yield anomalous pixel entries"


def test_exact_runtime_matches_spec(tf_bundle, encoder, synth_data, target_images):
    manifest = read_manifest(tf_bundle)
    memory = spec_memory(encoder, synth_data[0], manifest)
    detector = Detector(tf_bundle, provider="cpu", retrieval="exact")
    chosen = target_images[::4]
    results = detector.predict_batch(chosen)
    for path, result in zip(chosen, results):
        score, display = spec_score(encoder, path, memory, manifest)
        assert result.score == pytest.approx(score, abs=SCORE_TOLERANCE)
        assert result.anomaly_map.shape == display.shape
        assert result.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(result.anomaly_map, display, atol=MAP_TOLERANCE)


def test_batch_equals_single(tf_bundle, target_images):
    detector = Detector(tf_bundle, provider="cpu")
    batch = detector.predict_batch(target_images[:4])
    for path, result in zip(target_images[:4], batch):
        single = detector.predict(path)
        assert single.score == pytest.approx(result.score, abs=1e-6)
