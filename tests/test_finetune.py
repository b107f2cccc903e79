"""MRAD-FT: similarity dropout, training, the exported graph, released artefacts."""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrad.export import artefacts
from mrad.export.build import export_bundle
from mrad.export.encoder import MradEncoder
from mrad.export.errors import ExportError
from mrad.export.finetune import FineTuner, RetrievalMetric, above_percentile
from mrad.export.memory import build_memory, encode_samples
from mrad.export.models import load_image_tower
from mrad.export.options import ExportOptions, TrainOptions, checkpoint_path
from mrad.runtime import Detector
from mrad.runtime.core.bundle import read_manifest
from mrad.runtime.formats.mvtec import scan
from mrad.tools.reference import SpecMemory, display_map, spec_scores
from mrad.tools.synth import write_dataset

from conftest import IMAGE_SIZE, encoder_inputs

SCORE_TOLERANCE = 1e-5  # runtime exact mode against the PyTorch FT module
# Maps: the absolute bound test_parity sets for TF. Absolute, not relative to the map's range: a metric
# trained for a few steps gives projected logits of about 0.1, so FT maps are nearly flat and any
# relative-to-range figure is inflated by the small denominator, not by a larger error.
MAP_TOLERANCE = 1e-5
KEY_TOLERANCE = 1e-5  # projected keys, float32 through two routes
ROUND_TRIP_TOLERANCE = 1e-6  # same layers and memory through the released formats: float32 noise only


def test_dropout_by_hand():
    row = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 1.0, 0.4, 0.8, 0.6])
    # 80th percentile of 0.1 .. 1.0 with linear interpolation: 0.8 + 0.2 * 0.1 = 0.82
    assert above_percentile(row, 0.8).nonzero().flatten().tolist() == [2, 6]
    # 95th: 0.9 + 0.55 * 0.1 = 0.955
    assert above_percentile(row, 0.95).nonzero().flatten().tolist() == [6]


@pytest.mark.parametrize("q", [0.8, 0.95, 0.5])
def test_dropout_matches_torch_quantile(q):
    sims = torch.randn(3, 7, 33, generator=torch.Generator().manual_seed(0))
    want = sims > torch.quantile(sims, q, dim=-1, keepdim=True)
    assert torch.equal(above_percentile(sims, q), want)


def test_dropout_scales_past_2_to_the_24():
    sims = torch.rand(8 * 1369, 1600, generator=torch.Generator().manual_seed(1))
    assert sims.numel() > 2**24  # where older torch.quantile gives up
    kept_above = 1600 - 1 - math.floor(0.8 * 1599)
    assert (above_percentile(sims, 0.8).sum(dim=-1) == kept_above).all()


@pytest.fixture(scope="module")
def ft_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    aux, target = write_dataset(root / "data", size=(112, 96), normal=16, anomalous=8, train=0)
    out = root / "tiny-ft"
    export_bundle(ExportOptions(aux_data=(aux,), out=out, variant="ft", model="tiny", pretrained="none",
                                image_size=IMAGE_SIZE, device="cpu"), log=lambda _: None)
    encoder = MradEncoder(load_image_tower("tiny", "none").visual, IMAGE_SIZE).eval()
    samples = scan([aux])
    memory = build_memory(encoder, samples, read_manifest(out).preprocess, device="cpu")
    return {"aux": aux, "target": sorted(target.glob("*/test/*/*.png")), "out": out, "encoder": encoder,
            "samples": samples, "memory": memory, "checkpoint": checkpoint_path(ExportOptions(out=out))}


def mean_losses(tuner, metric, encoder, samples, preprocess):
    with torch.no_grad():
        losses = [tuner.losses(metric, b) for b in encode_samples(encoder, samples, preprocess, 8, "cpu", progress=False)]
    return np.mean([p.item() for p, _ in losses]), np.mean([i.item() for _, i in losses])


def test_one_epoch_lowers_both_losses(ft_setup):
    preprocess = read_manifest(ft_setup["out"]).preprocess
    tuner = FineTuner(ft_setup["memory"], IMAGE_SIZE, ft_setup["encoder"].grid, TrainOptions(), "cpu")
    torch.manual_seed(TrainOptions.seed)
    untrained = RetrievalMetric(ft_setup["encoder"].embed_dim, ft_setup["encoder"].width)
    trained = artefacts.load_checkpoint(ft_setup["checkpoint"])
    before = mean_losses(tuner, untrained, ft_setup["encoder"], ft_setup["samples"], preprocess)
    after = mean_losses(tuner, trained, ft_setup["encoder"], ft_setup["samples"], preprocess)
    assert after[0] < before[0], f"pixel loss {before[0]} -> {after[0]}"
    assert after[1] < before[1], f"image loss {before[1]} -> {after[1]}"


def spec_ft_results(encoder, metric, memory, paths, preprocess, scoring):
    """Spec section 5: learned similarities are inner products of projected queries and keys; then section 4.

    Returns each image's (score, smoothed S x S map).
    """
    with torch.no_grad():
        f_img, f_pat = encoder(encoder_inputs(paths, preprocess))
        projected = SpecMemory(metric.image_key(torch.from_numpy(memory.image_keys)),
                               torch.from_numpy(memory.image_labels).float(),
                               metric.patch_key(torch.from_numpy(memory.pixel_keys)),
                               torch.from_numpy(memory.pixel_labels).float())
        results = spec_scores(metric.image_query(F.normalize(f_img, dim=-1)),
                              metric.patch_query(F.normalize(f_pat, dim=-1)), projected, encoder.grid, IMAGE_SIZE,
                              scoring)
    return results


def test_ft_runtime_matches_pytorch(ft_setup):
    manifest = read_manifest(ft_setup["out"])
    assert manifest.variant == "ft"
    assert manifest.memories["image"].dim == manifest.memories["pixel"].dim == ft_setup["encoder"].embed_dim
    metric = artefacts.load_checkpoint(ft_setup["checkpoint"])
    paths = ft_setup["target"][::9]
    want = spec_ft_results(ft_setup["encoder"], metric, ft_setup["memory"], paths, manifest.preprocess,
                           manifest.scoring)
    results = Detector(ft_setup["out"], provider="cpu", retrieval="exact").predict_batch(paths)
    assert [r.score for r in results] == pytest.approx([score for score, _ in want], abs=SCORE_TOLERANCE)
    for result, (_, smoothed) in zip(results, want):
        np.testing.assert_allclose(result.anomaly_map, display_map(smoothed, *result.anomaly_map.shape),
                                   atol=MAP_TOLERANCE)


def test_runtime_makes_ft_entries_through_the_key_layer(ft_setup):
    """FT keys are the learned key layer applied to each entry; the bundle carries that layer as arrays."""
    detector = Detector(ft_setup["out"], provider="cpu")
    assert all(spec.key_projection is not None for spec in detector.manifest.memories.values())
    made = {"image": [], "pixel": []}
    for sample in ft_setup["samples"][:6]:
        entries = detector.memory_entries(sample.image, int(sample.anomalous), sample.mask)
        for name, memory in detector.memories.items():
            made[name].append(memory.keys_of(entries[name].vectors))
    for name, memory in detector.memories.items():
        keys = np.concatenate(made[name])
        np.testing.assert_allclose(keys, memory.keys[: len(keys)], atol=KEY_TOLERANCE, err_msg=name)


def test_released_artefacts_round_trip(ft_setup, tmp_path):
    image_file, patch_file = tmp_path / "cache_model_synth.pt", tmp_path / "cache_patch_model_synth.pt"
    artefacts.save_memory_bank(ft_setup["memory"], image_file, patch_file)
    out = tmp_path / "from-artefacts"
    export_bundle(ExportOptions(out=out, variant="ft", model="tiny", pretrained="none", image_size=IMAGE_SIZE,
                                memory_bank=(image_file, patch_file), ft_checkpoint=ft_setup["checkpoint"],
                                device="cpu"), log=lambda _: None)
    assert not checkpoint_path(ExportOptions(out=out)).exists()  # nothing trained, nothing saved
    paths = ft_setup["target"][::5]
    original = Detector(ft_setup["out"], provider="cpu").predict_batch(paths)
    rebuilt = Detector(out, provider="cpu").predict_batch(paths)
    for a, b in zip(original, rebuilt):
        assert b.score == pytest.approx(a.score, abs=ROUND_TRIP_TOLERANCE)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=ROUND_TRIP_TOLERANCE)


def test_checkpoint_uses_the_released_layout(ft_setup):
    content = torch.load(ft_setup["checkpoint"], weights_only=True)
    assert set(content) == {"image_proj", "patch_proj"}
    assert set(content["image_proj"]) == {"mlp1.weight", "mlp1.bias", "mlp2.weight", "mlp2.bias"}
    assert set(content["patch_proj"]) == {"fc.0.weight", "fc.0.bias", "fc.1.weight", "fc.1.bias"}
    assert content["patch_proj"]["fc.0.weight"].shape == (64, 128)  # W -> D for the tiny model


def test_files_with_code_are_refused(tmp_path):
    path = tmp_path / "mrad_ft.pth"
    torch.save({"image_proj": argparse.Namespace(weight=1)}, path)
    with pytest.raises(ExportError, match="refused because loading it could run code"):
        artefacts.load_checkpoint(path)
    torch.save({"keys": torch.zeros(3, 4), "values": torch.ones(3, 2)}, path)
    with pytest.raises(ExportError, match="one-hot"):
        artefacts.load_memory_bank(path, path)


def test_ft_needs_aux_data_or_a_checkpoint(tmp_path):
    with pytest.raises(ExportError, match="--aux-data is required to train MRAD-FT"):
        export_bundle(ExportOptions(out=tmp_path / "b", variant="ft", model="tiny", pretrained="none",
                                    memory_bank=(tmp_path / "a.pt", tmp_path / "b.pt")))


def test_ft_onnx_graph_matches_pytorch(ft_setup):
    import onnxruntime as ort

    from mrad.export.encoder import QueryGraph

    manifest = read_manifest(ft_setup["out"])
    metric = artefacts.load_checkpoint(ft_setup["checkpoint"])
    graph = QueryGraph(ft_setup["encoder"], metric.image_query, metric.patch_query).eval()
    images = encoder_inputs(ft_setup["target"][:3], manifest.preprocess)
    encoder = manifest.graphs["encoder"]
    session = ort.InferenceSession(str(ft_setup["out"] / encoder.file), providers=["CPUExecutionProvider"])
    onnx_image, onnx_patch = session.run(["image_query", "patch_query"], {encoder.inputs[0].name: images.numpy()})
    with torch.no_grad():
        torch_image, torch_patch = graph(images)[:2]
    np.testing.assert_allclose(onnx_image, torch_image.numpy(), atol=1e-5)  # fp32, projected queries
    np.testing.assert_allclose(onnx_patch, torch_patch.numpy(), atol=1e-5)
