"""MRAD-CLIP (spec section 6): the text graph, the runtime's maps and scores, training, the authors' checkpoint layout."""

import json
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mrad.export import artefacts
from mrad.export.build import export_bundle
from mrad.export.encoder import MradEncoder, QueryGraph
from mrad.export.errors import ExportError
from mrad.export.finetune import RetrievalMetric
from mrad.export.memory import build_memory
from mrad.export.models import load_image_tower
from mrad.export.options import ExportOptions, PromptOptions, TrainOptions, checkpoint_path
from mrad.export.prompting import PromptLearner, PromptTrainer, TextGraph, TextTower
from mrad.runtime import Detector
from mrad.runtime.commands import calibrate as calibrate_cli
from mrad.runtime.commands import run as run_cli
from mrad.runtime.core.alignment import region_priors, text_shares
from mrad.runtime.core.bundle import read_manifest
from mrad.runtime.errors import BundleError
from mrad.runtime.formats.mvtec import scan
from mrad.tools import bench, evaluate
from mrad.tools.reference import SpecMemory, spec_clip_scores, spec_text
from mrad.tools.synth import write_dataset

from conftest import IMAGE_SIZE, encoder_inputs
from test_no_torch import run_blocked

TEXT_TOLERANCE = 1e-5  # ONNX text graph (EOT-truncated) against PyTorch over all 77 positions: unit vectors, fp32
SCORE_TOLERANCE = 1e-5  # runtime clip scores against the PyTorch rendering of spec section 6
MAP_TOLERANCE = 1e-5
ROUND_TRIP_TOLERANCE = 1e-6  # the same layers through the authors' checkpoint layout: float32 noise only


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    aux, target = write_dataset(root / "data", size=(112, 96), normal=8, anomalous=4, train=0)
    out = root / "tiny-clip"
    export_bundle(ExportOptions(aux_data=(aux,), out=out, variant="clip", model="tiny", pretrained="none",
                                image_size=IMAGE_SIZE, device="cpu"), log=lambda _: None)
    tower = load_image_tower("tiny", "none")
    encoder = MradEncoder(tower.visual, IMAGE_SIZE).eval()
    samples = scan([aux])
    checkpoint = checkpoint_path(ExportOptions(out=out, variant="clip"))
    return {"aux": aux, "target": sorted(target.glob("*/test/*/*.png")), "out": out, "tower": tower,
            "encoder": encoder, "samples": samples, "checkpoint": checkpoint,
            "memory": build_memory(encoder, samples, read_manifest(out).preprocess, device="cpu"),
            "metric": artefacts.load_checkpoint(checkpoint), "learner": artefacts.load_prompts(checkpoint).eval()}


def random_priors(dim: int, seed: int = 0) -> torch.Tensor:
    priors = F.normalize(torch.randn(4, 2, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    priors[1, 1] = 0  # an image with no anomalous patch
    priors[2, 0] = 0  # and one with no normal patch
    return priors


def onnx_text(bundle, priors: torch.Tensor) -> np.ndarray:
    graph = read_manifest(bundle).graphs["text"]
    session = ort.InferenceSession(str(bundle / graph.file), providers=["CPUExecutionProvider"])
    return session.run([graph.outputs[0].name], {graph.inputs[0].name: priors.numpy()})[0]


def test_text_graph_matches_the_full_text_tower(clip_setup):
    """The graph stops at the last EOT; the reference runs all 77 positions. Causal attention makes them equal."""
    learner, clip = clip_setup["learner"], clip_setup["tower"].clip
    priors = random_priors(learner.normal_bias.in_features)
    with torch.no_grad():
        want = spec_text(clip, learner, priors)
    got = onnx_text(clip_setup["out"], priors)
    assert TextGraph(learner, TextTower(clip)).length < clip.positional_embedding.shape[0]
    assert got.shape == (4, 2, clip.text_projection.shape[1])
    np.testing.assert_allclose(got, want.numpy(), atol=TEXT_TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)


def test_deep_prompts_are_rounded_to_float16_by_default(clip_setup):
    """The reference casts its deep prompts to float16; the bundle does the same, and that rounding shows."""
    learner, clip = clip_setup["learner"], clip_setup["tower"].clip
    assert read_manifest(clip_setup["out"]).scoring.text.deep_rounding == "float16"
    priors = random_priors(learner.normal_bias.in_features, seed=1)
    with torch.no_grad():
        rounded = spec_text(clip, learner, priors, "float16").numpy()
        kept = spec_text(clip, learner, priors, "none").numpy()
        unrounded_graph = TextGraph(learner, TextTower(clip), deep_rounding="none")(priors).numpy()
    got = onnx_text(clip_setup["out"], priors)
    # the rounding moves the features by more than the tolerance the graph keeps to the rounded rendering
    assert np.abs(got - rounded).max() < TEXT_TOLERANCE < np.abs(rounded - kept).max()
    np.testing.assert_allclose(unrounded_graph, kept, atol=TEXT_TOLERANCE)


def pytorch_shares_and_scores(clip_setup, paths, manifest):
    """Spec section 6 in PyTorch: the FT pixel shares m and each image's (score, smoothed map)."""
    metric, learner, clip, memory = clip_setup["metric"], clip_setup["learner"], clip_setup["tower"].clip, clip_setup["memory"]
    with torch.no_grad():
        graph = QueryGraph(clip_setup["encoder"], metric.image_query, metric.patch_query, project_patches=True)
        outputs = graph(encoder_inputs(paths, manifest.preprocess))
        projected = SpecMemory(metric.image_key(torch.from_numpy(memory.image_keys)),
                               torch.from_numpy(memory.image_labels).float(),
                               metric.patch_key(torch.from_numpy(memory.pixel_keys)),
                               torch.from_numpy(memory.pixel_labels).float())
        shares = torch.softmax(outputs[1] @ projected.pixel_keys.T, dim=-1) @ projected.pixel_labels
        return shares, spec_clip_scores(outputs[0], outputs[1], outputs[-1], projected,
                                        lambda priors: spec_text(clip, learner, priors), manifest.scoring.grid,
                                        IMAGE_SIZE, manifest.scoring)


@pytest.mark.parametrize("threshold", ["exported", "median share"])
def test_clip_runtime_matches_spec(clip_setup, tmp_path, threshold):
    """Scores and maps against PyTorch; at the exported 0.5 the random tiny model finds no anomalous region, at the
    median share most images have both regions: both prior paths are compared."""
    bundle, paths = clip_setup["out"], clip_setup["target"][::3]
    manifest = read_manifest(bundle)
    assert manifest.variant == "clip" and manifest.scoring.text.prior_threshold == 0.5
    assert manifest.scoring.text.temperature == 0.07
    if threshold == "median share":
        shares, _ = pytorch_shares_and_scores(clip_setup, paths, manifest)
        bundle = tmp_path / "bundle"
        shutil.copytree(clip_setup["out"], bundle)
        raw = json.loads((bundle / "manifest.json").read_text())
        raw["scoring"]["text"]["prior_threshold"] = float(shares.median())
        (bundle / "manifest.json").write_text(json.dumps(raw))
        manifest = read_manifest(bundle)
    shares, want = pytorch_shares_and_scores(clip_setup, paths, manifest)
    anomalous = (shares > manifest.scoring.text.prior_threshold).sum(dim=1)
    if threshold == "exported":
        assert (anomalous == 0).any(), "an image whose anomalous region prior is empty"
    else:
        assert ((anomalous > 0) & (anomalous < shares.shape[1])).sum() >= 2, "images with both regions"
    detector = Detector(bundle, provider="cpu", retrieval="exact")
    for result, (score, _) in zip(detector.predict_batch(paths), want):
        assert result.score == pytest.approx(score, abs=SCORE_TOLERANCE)
    for result, (_, smoothed) in zip(detector.predict_batch(paths, map_size=(IMAGE_SIZE, IMAGE_SIZE)), want):
        np.testing.assert_allclose(result.anomaly_map, smoothed, atol=MAP_TOLERANCE)


def test_region_priors_and_patch_shares_by_hand():
    projections = np.array([[[1, 0], [0, 1], [1, 1]], [[2, 0], [0, 2], [4, 4]]], dtype=np.float32)
    shares = np.array([[0.9, 0.1, 0.2], [0.1, 0.2, 0.5]], dtype=np.float32)  # 0.5 is not above the threshold
    priors = region_priors(shares, projections, threshold=0.5)
    np.testing.assert_allclose(priors[0], [[0.5, 1.0], [1.0, 0.0]])  # normal: mean of patches 1, 2
    np.testing.assert_allclose(priors[1], [[2.0, 2.0], [0.0, 0.0]])  # nothing anomalous: zeros
    text = np.array([[[1, 0], [0, 1]]] * 2, dtype=np.float32)
    got = text_shares(text, projections[:1], temperature=0.5)
    s = np.exp(np.array([[1, 0], [0, 1], [1, 1]]) / 0.5)
    s /= s.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got[0], (s[:, 1] + 1 - s[:, 0]) / 2, atol=1e-6)


def test_prompt_stage_lowers_its_loss(clip_setup):
    """Over the whole aux set, the trained prompts' loss is below that of the prompts training started from."""
    preprocess = read_manifest(clip_setup["out"]).preprocess
    tower, encoder = clip_setup["tower"], clip_setup["encoder"]
    text = TextTower(tower.clip)
    trainer = PromptTrainer(clip_setup["memory"], clip_setup["metric"], tower.visual.proj.detach(), IMAGE_SIZE,
                            encoder.grid, TrainOptions(), PromptOptions(), "cpu")
    start = PromptLearner.initial(text, "tiny", encoder.embed_dim,
                                  generator=torch.Generator().manual_seed(TrainOptions.seed))
    torch.manual_seed(0)
    before = trainer.mean_loss(TextGraph(start, text), encoder, clip_setup["samples"], preprocess)
    torch.manual_seed(0)
    after = trainer.mean_loss(TextGraph(clip_setup["learner"], text), encoder, clip_setup["samples"], preprocess)
    assert after < before, f"prompt-stage loss {before:.4f} -> {after:.4f}"
    trained = read_manifest(clip_setup["out"]).provenance["metric"]["trained"]["prompts"]
    assert trained["epochs"] == 5 and len(trained["epoch_seconds"]) == 5


def test_checkpoint_has_the_authors_layout(clip_setup):
    content = torch.load(clip_setup["checkpoint"], weights_only=True)
    assert set(content) == {"image_proj", "patch_proj", "prompt_learner", "prompt_proj"}
    learner = content["prompt_learner"]
    width = 64  # the tiny model's text width
    assert learner["ctx_pos"].shape == learner["ctx_neg"].shape == (1, 1, 12, width)
    assert [learner[f"compound_prompts_text.{i}"].shape for i in range(8)] == [(4, width)] * 8
    assert learner["token_prefix_pos"].shape == (1, 1, 1, width)
    assert learner["token_suffix_neg"].shape == (1, 1, 77 - 1 - 12, width)
    assert learner["tokenized_prompts_pos"].shape == (1, 1, 77)
    assert learner["tokenized_prompts_pos"].argmax().item() == 15  # SOT, 12 X, "object", ".", EOT
    assert learner["tokenized_prompts_neg"].argmax().item() == 16  # ... "damaged object." ...
    assert {"compound_prompt_projections.0.weight", "mlp.c_fc.weight"} <= set(learner)  # unused, loaded strictly
    assert set(content["prompt_proj"]) == {"mlp1.weight", "mlp1.bias", "mlp2.weight", "mlp2.bias"}


def test_export_from_the_checkpoint_scores_the_same(clip_setup, tmp_path):
    image_file, patch_file = tmp_path / "cache_model_synth.pt", tmp_path / "cache_patch_model_synth.pt"
    artefacts.save_memory_bank(clip_setup["memory"], image_file, patch_file)
    out = tmp_path / "from-checkpoint"
    export_bundle(ExportOptions(out=out, variant="clip", model="tiny", pretrained="none", image_size=IMAGE_SIZE,
                                memory_bank=(image_file, patch_file), checkpoint=clip_setup["checkpoint"],
                                device="cpu"), log=lambda _: None)
    assert not checkpoint_path(ExportOptions(out=out, variant="clip")).exists()  # nothing trained, nothing saved
    paths = clip_setup["target"][::4]
    original = Detector(clip_setup["out"], provider="cpu").predict_batch(paths)
    rebuilt = Detector(out, provider="cpu").predict_batch(paths)
    for a, b in zip(original, rebuilt):
        assert b.score == pytest.approx(a.score, abs=ROUND_TRIP_TOLERANCE)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=ROUND_TRIP_TOLERANCE)


def test_checkpoints_of_the_other_variant(clip_setup, tmp_path):
    ft_only = tmp_path / "mrad_ft.pth"
    artefacts.save_checkpoint(RetrievalMetric(64, 128), ft_only)
    with pytest.raises(ExportError, match="is an MRAD-FT checkpoint: --variant clip needs prompt_learner"):
        artefacts.load_prompts(ft_only)
    with pytest.raises(ExportError, match="--ft-checkpoint goes with --variant ft"):
        export_bundle(ExportOptions(out=tmp_path / "x", variant="clip", model="tiny", pretrained="none",
                                    ft_checkpoint=ft_only, memory_bank=(ft_only, ft_only)))
    # a CLIP checkpoint holds MRAD-FT's layers too: --variant ft takes it
    metric = artefacts.load_checkpoint(clip_setup["checkpoint"])
    assert torch.equal(metric.patch_query.weight, clip_setup["metric"].patch_query.weight)


def test_clip_prediction_without_torch(clip_setup):
    report = run_blocked({"torch", "open_clip", "torchvision"}, clip_setup["out"], clip_setup["target"][0])
    assert report["loaded"] == []
    assert report["exact"]["shape"] == [96, 112] and 0.0 <= report["exact"]["score"] <= 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["scoring"]["text"].update(temperature=0), "manifest.scoring.text.temperature"),
    (lambda m: m["scoring"]["text"].update(graph="encoder"), "must name a graph of its own"),
    (lambda m: m["scoring"]["text"].update(projection="image_feature"), "scoring.text.projection"),
    (lambda m: m.update(variant="ft"), "do not go together"),
    (lambda m: m["graphs"]["text"]["inputs"][0].update(shape=["batch", 3, 64]), "must take (batch, 2, 64) region priors"),
])
def test_manifest_checks_the_text_stage(clip_setup, tmp_path, edit, message):
    raw = json.loads((clip_setup["out"] / "manifest.json").read_text())
    assert raw["format_version"] == 3
    bundle = tmp_path / "bundle"
    shutil.copytree(clip_setup["out"], bundle)
    edit(raw)
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=re.escape(message)):
        read_manifest(bundle)


def test_commands_score_a_clip_bundle(clip_setup, tmp_path):
    """mrad-calibrate, mrad-run, mrad-eval and mrad-bench take a clip bundle as they take any other."""
    bundle = shutil.copytree(clip_setup["out"], tmp_path / "bundle")
    shutil.copy(clip_setup["checkpoint"], tmp_path / clip_setup["checkpoint"].name)  # for bench's PyTorch rendering
    target = clip_setup["target"][0].parents[3]
    good = target / "weave" / "test" / "good"
    calibrated = CliRunner().invoke(calibrate_cli.main, ["--bundle", str(bundle), "--normal", str(good),
                                                         "--provider", "cpu", "--quantile", "1.0"])
    assert calibrated.exit_code == 0, calibrated.output
    ran = CliRunner().invoke(run_cli.main, ["--bundle", str(bundle), "--input", str(good), "--provider", "cpu"])
    frames = [json.loads(line) for line in ran.stdout.splitlines() if '"event"' not in line]
    assert ran.exit_code == 0 and frames and all(r["decision"] == "normal" for r in frames)
    scores = [r.score for r in Detector(bundle, provider="cpu").predict_batch(sorted(good.glob("*.png")))]
    assert sorted(r["score"] for r in frames) == pytest.approx(sorted(scores), abs=1e-6)
    evaluated = CliRunner().invoke(evaluate.main, ["--bundle", str(bundle), "--data", str(target), "--provider", "cpu"])
    assert evaluated.exit_code == 0 and "pixel aupro" in evaluated.output
    report = tmp_path / "bench.json"
    benched = CliRunner().invoke(bench.main, ["--bundle", str(bundle), "--batch-sizes", "1", "--iterations", "2",
                                              "--warmup", "0", "--frame-size", "64x48", "--providers", "cpu",
                                              "--json", str(report)])
    assert benched.exit_code == 0, benched.output
    header = next(line.split() for line in benched.output.splitlines() if line.strip().startswith("batch"))
    assert header[header.index("retrieve") + 1] == "text"
    measured = json.loads(report.read_text())
    assert measured["providers"]["cpu"]["1"]["text"]["p50"] > 0
    assert measured["pytorch"]["score_max_abs_diff"] < 1e-4  # bench's PyTorch rendering of section 6 agrees
