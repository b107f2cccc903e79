"""Numerical fidelity of a TF bundle.

ONNX encoder against the PyTorch module; the bundle's memory and the runtime's
exact mode against spec sections 3 and 4 as written in mrad.tools.reference;
memory entries made by the runtime against those made at export.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mrad.export.encoder import MradEncoder, QueryGraph
from mrad.export.models import load_image_tower
from mrad.runtime import Detector
from mrad.runtime.core.bundle import read_manifest
from mrad.runtime.formats.mvtec import scan
from mrad.tools.reference import display_map, spec_memory, spec_scores

from conftest import IMAGE_SIZE, encoder_inputs

ONNX_TOLERANCE = 1e-5  # fp32 ONNX Runtime against fp32 PyTorch, normalised outputs
FEATURE_TOLERANCE = 1e-4  # the same, on unnormalised features and tokens (values of order 1 to 10)
SCORE_TOLERANCE = 1e-5  # runtime exact mode against the spec's formulas
MAP_TOLERANCE = 1e-5
KEY_TOLERANCE = 1e-5  # memory keys are unit vectors


@pytest.fixture(scope="module")
def encoder():
    return MradEncoder(load_image_tower("tiny", "none", seed=0).visual, IMAGE_SIZE).eval()


@pytest.fixture(scope="module")
def memory(encoder, tf_bundle, synth_data):
    preprocess = read_manifest(tf_bundle).preprocess
    return spec_memory(encoder, scan([synth_data[0]]), lambda paths: encoder_inputs(paths, preprocess))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_encoder_matches_pytorch(tf_bundle, encoder, target_images, batch):
    manifest = read_manifest(tf_bundle)
    graph = manifest.graphs["encoder"]
    session = ort.InferenceSession(str(tf_bundle / graph.file), providers=["CPUExecutionProvider"])
    images = encoder_inputs(target_images[:batch], manifest.preprocess)
    names = [o.name for o in graph.outputs]
    onnx_outputs = session.run(names, {graph.inputs[0].name: images.numpy()})
    with torch.no_grad():
        torch_outputs = QueryGraph(encoder)(images)
    assert names == list(QueryGraph.OUTPUTS)
    for name, got, want in zip(names, onnx_outputs, torch_outputs):
        tolerance = ONNX_TOLERANCE if name.endswith("query") else FEATURE_TOLERANCE
        np.testing.assert_allclose(got, want.numpy(), atol=tolerance, err_msg=name)
    assert all(diff < FEATURE_TOLERANCE for diff in graph.max_abs_diff.values())
    assert graph.checked_providers == ("CPUExecutionProvider",)


def test_memory_matches_spec(tf_bundle, memory):
    detector = Detector(tf_bundle, provider="cpu", retrieval="exact")
    np.testing.assert_allclose(detector.image_memory.keys, memory.image_keys.numpy(), atol=KEY_TOLERANCE)
    np.testing.assert_array_equal(detector.image_memory.labels, memory.image_labels.numpy())
    np.testing.assert_allclose(detector.pixel_memory.keys, memory.pixel_keys.numpy(), atol=KEY_TOLERANCE)
    np.testing.assert_array_equal(detector.pixel_memory.labels, memory.pixel_labels.numpy())
    assert memory.pixel_labels.sum() > 0, "the generated data must yield anomalous pixel entries"


def test_exact_runtime_matches_spec(tf_bundle, encoder, memory, target_images):
    manifest = read_manifest(tf_bundle)
    detector = Detector(tf_bundle, provider="cpu", retrieval="exact")
    chosen = target_images[::4]
    results = detector.predict_batch(chosen)
    with torch.no_grad():
        queries = QueryGraph(encoder)(encoder_inputs(chosen, manifest.preprocess))
    expected = spec_scores(queries[0], queries[1], memory, encoder.grid, IMAGE_SIZE, manifest.scoring)
    for result, (score, smoothed) in zip(results, expected):
        assert result.score == pytest.approx(score, abs=SCORE_TOLERANCE)
        display = display_map(smoothed, *result.anomaly_map.shape)
        assert result.anomaly_map.dtype == np.float32
        np.testing.assert_allclose(result.anomaly_map, display, atol=MAP_TOLERANCE)


def test_runtime_makes_the_entries_export_made(tf_bundle, synth_data):
    """Item 3 of the bundle format: the runtime alone turns an auxiliary image into the export's entries."""
    detector = Detector(tf_bundle, provider="cpu")
    samples = scan([synth_data[0]])
    made = {"image": [], "pixel": []}
    for sample in samples:
        entries = detector.memory_entries(sample.image, int(sample.anomalous), sample.mask)
        for name, memory in detector.memories.items():
            made[name].append((memory.keys_of(entries[name].vectors), entries[name].labels))
    for name, memory in detector.memories.items():
        keys = np.concatenate([k for k, _ in made[name]])
        labels = [label for _, chunk in made[name] for label in chunk]
        np.testing.assert_allclose(keys, memory.keys, atol=KEY_TOLERANCE, err_msg=name)
        assert labels == memory.labels.astype(int).tolist()
    sources = [row["source"] for row in detector.pixel_memory.provenance]
    assert sources[0] == samples[0].source and set(sources) == {s.source for s in samples}


def test_batch_equals_single(tf_bundle, target_images):
    detector = Detector(tf_bundle, provider="cpu")
    batch = detector.predict_batch(target_images[:4])
    for path, result in zip(target_images[:4], batch):
        single = detector.predict(path)
        assert single.score == pytest.approx(result.score, abs=1e-6)
