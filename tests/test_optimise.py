"""The encoder is saved optimised by ONNX Runtime at export; the runtime does not optimise it again."""

import collections
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mrad.export.encoder import MradEncoder, QueryGraph
from mrad.export.models import load_image_tower
from mrad.export.optimise import PORTABLE_OPS, op_counts, unportable_ops
from mrad.runtime import Detector
from mrad.runtime.core import graphs
from mrad.runtime.core.bundle import read_manifest

from conftest import IMAGE_SIZE, encoder_inputs

ONNX_TOLERANCE = 1e-5  # as tests/test_parity.py: fp32 ONNX Runtime against fp32 PyTorch, normalised outputs
FEATURE_TOLERANCE = 1e-4  # the same, on unnormalised features and tokens
SCORE_TOLERANCE = 1e-6  # the same graph on the same provider, opened at another level


def level(detector: Detector) -> ort.GraphOptimizationLevel:
    return detector.encoder.session.get_session_options().graph_optimization_level


@pytest.mark.parametrize("batch", [1, 3])
def test_optimised_graph_as_the_runtime_opens_it_matches_pytorch(tf_bundle, target_images, batch):
    manifest = read_manifest(tf_bundle)
    detector = Detector(tf_bundle, provider="cpu")
    assert level(detector) == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    encoder = MradEncoder(load_image_tower("tiny", "none", seed=0).visual, IMAGE_SIZE).eval()
    images = encoder_inputs(target_images[:batch], manifest.preprocess)
    names = list(QueryGraph.OUTPUTS)
    got = detector.encode(images.numpy(), names)
    with torch.no_grad():
        want = QueryGraph(encoder)(images)
    for name, expected in zip(names, want):
        tolerance = ONNX_TOLERANCE if name.endswith("query") else FEATURE_TOLERANCE
        np.testing.assert_allclose(got[name], expected.numpy(), atol=tolerance, err_msg=name)


def test_manifest_states_what_was_done(tf_bundle):
    encoder = read_manifest(tf_bundle).graphs["encoder"]
    counts = op_counts(tf_bundle / encoder.file)
    layers = read_manifest(tf_bundle).model["layers"]
    assert encoder.optimized["onnxruntime"] == ort.__version__ and encoder.optimized["level"] == "extended"
    assert encoder.optimized["nodes_after"] == sum(counts.values()) < encoder.optimized["nodes_before"]
    # the tiny model's QuickGELU (x * sigmoid(1.702 x)) fused in every block; attention as export/attention.py fused it
    assert encoder.optimized["contrib_ops"]["QuickGelu"] == layers
    assert encoder.optimized["contrib_ops"]["MultiHeadAttention"] == 1 + 2 * (layers - 1)
    assert counts[("", "Sigmoid")] == 0 and counts[("", "Softmax")] == 0


def test_graph_holds_only_ops_with_cpu_and_cuda_kernels_and_no_dead_nodes(tf_bundle):
    graph = onnx.load(str(tf_bundle / "encoder.onnx")).graph
    counts = collections.Counter((n.domain, n.op_type) for n in graph.node)
    assert unportable_ops(counts) == []
    assert not any(domain.startswith("com.microsoft.") for domain, _ in counts), "no NCHWc layout nodes"
    assert {key for key in counts if key[0]} <= PORTABLE_OPS
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    assert all(any(out in read for out in node.output) for node in graph.node), "every node feeds an output"
    assert [o.name for o in graph.output] == list(QueryGraph.OUTPUTS), "nothing added or dropped"


def test_unportable_ops_are_named():
    counts = collections.Counter({("", "MatMul"): 2, ("com.microsoft", "FusedGemm"): 1,
                                  ("com.microsoft.nchwc", "Conv"): 1, ("com.microsoft", "QuickGelu"): 4})
    assert unportable_ops(counts) == ["com.microsoft.nchwc:Conv", "com.microsoft:FusedGemm"]


def test_another_onnxruntime_version_optimises_at_load(tf_bundle, target_images, monkeypatch):
    want = Detector(tf_bundle, provider="cpu").predict(target_images[0]).score
    monkeypatch.setattr(graphs.ort, "__version__", "0.0.0-not-the-exporters")
    detector = Detector(tf_bundle, provider="cpu")
    assert level(detector) == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert detector.predict(target_images[0]).score == pytest.approx(want, abs=SCORE_TOLERANCE)


def test_graphs_without_the_record_and_user_options_keep_their_level(tf_bundle):
    encoder = read_manifest(tf_bundle).graphs["encoder"]
    assert graphs.default_session_options(dataclasses.replace(encoder, optimized={})).graph_optimization_level \
        == ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # bundles exported before: as they always were
    basic_only = dataclasses.replace(encoder, optimized={**encoder.optimized, "level": "basic"})
    assert graphs.default_session_options(basic_only).graph_optimization_level \
        == ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # the extended fusions are still to do
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    detector = Detector(tf_bundle, provider="cpu", session_options=options)
    assert level(detector) == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "the user's options win"
