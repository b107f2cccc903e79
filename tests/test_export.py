"""mrad-export: weights sources, clear errors for bad data, nothing half-written."""

import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from mrad.export import cli, models, progress
from mrad.export.options import ExportOptions
from mrad.export.errors import ExportError
from mrad.runtime.core.bundle import read_manifest

from conftest import IMAGE_SIZE


def run_export(aux, out, *extra):
    args = ["--model", "tiny", "--pretrained", "none", "--image-size", str(IMAGE_SIZE),
            "--aux-data", str(aux), "--out", str(out), "--device", "cpu", *extra]
    return CliRunner().invoke(cli.main, args)


@pytest.fixture
def aux_copy(synth_data, tmp_path):
    return shutil.copytree(synth_data[0], tmp_path / "aux")


def assert_fails_cleanly(result, out, *fragments):
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_cli_writes_a_bundle(aux_copy, tmp_path):
    out = tmp_path / "bundle"
    result = run_export(aux_copy, out)
    assert result.exit_code == 0, result.output
    assert "memory: image level 24 entries" in result.output
    said = [line.split("] ")[1] for line in result.output.splitlines() if line.startswith("[")]
    assert [line.split("] ")[0] for line in result.output.splitlines() if line.startswith("[")] == [
        f"[{n}/8" for n in range(1, 9)]  # every phase says itself as it begins, and how far the export is
    assert said[0] == "importing PyTorch and open_clip" and said[3].startswith("tracing the encoder to ONNX")
    manifest = read_manifest(out)
    assert manifest.model["weights"].startswith("random (seed 0")
    assert run_export(aux_copy, out).exit_code == 2  # refuses to overwrite silently
    assert run_export(aux_copy, out, "--overwrite").exit_code == 0


def test_wrong_layout(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "a.png")
    out = tmp_path / "bundle"
    assert_fails_cleanly(run_export(tmp_path / "flat", out), out, "MVTec AD layout")


def test_missing_mask_is_named(aux_copy, tmp_path):
    mask = next(aux_copy.glob("*/ground_truth/blob/000_mask.png"))
    mask.unlink()
    out = tmp_path / "bundle"
    assert_fails_cleanly(run_export(aux_copy, out), out, "has no mask", str(mask))


def test_unreadable_image_is_named(aux_copy, tmp_path):
    image = next(aux_copy.glob("*/test/good/001.png"))
    image.write_bytes(b"not a png at all")
    out = tmp_path / "bundle"
    assert_fails_cleanly(run_export(aux_copy, out), out, "could not be decoded", str(image))


def test_mask_of_wrong_size_is_named(aux_copy, tmp_path):
    mask = next(aux_copy.glob("*/ground_truth/scratch/001_mask.png"))
    Image.new("L", (10, 10)).save(mask)
    out = tmp_path / "bundle"
    assert_fails_cleanly(run_export(aux_copy, out), out, "must match their image", str(mask))


def test_unknown_weights_are_refused(aux_copy, tmp_path):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli.main, ["--model", "tiny", "--pretrained", "laion2b", "--aux-data",
                                           str(aux_copy), "--out", str(out)])
    assert_fails_cleanly(result, out, "neither an open_clip tag", "'none'")


def test_tag_without_network_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ExportError, match="pass its path: --pretrained /path/to/file"):
        models.load_image_tower("ViT-B-32", "openai", cache_dir=str(tmp_path / "empty-cache"))


def test_state_dict_checkpoint(tmp_path):
    reference = models.load_image_tower("tiny", "none", seed=5)
    model = open_clip.create_model("tiny", pretrained=None)
    model.visual.load_state_dict(reference.visual.state_dict())
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = models.load_image_tower("tiny", str(path))
    assert loaded.weights.startswith("file:tiny.pt sha256:")
    for (name, want), have in zip(reference.visual.state_dict().items(), loaded.visual.state_dict().values()):
        assert torch.equal(want, have), name


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, OpenAI still ships it
def test_openai_torchscript_archive(tmp_path):
    """OpenAI's released .pt files are TorchScript archives holding fp16 weights under the same names."""
    model = open_clip.create_model("tiny", pretrained=None).half().float()
    holder = nn.Module()
    for key, value in model.state_dict().items():
        if key == "attn_mask":
            continue
        *parents, leaf = key.split(".")
        module = holder
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(value.clone()))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(holder).save(str(path))
    loaded = models.load_image_tower("tiny", str(path))
    assert loaded.quick_gelu
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)


def test_large_models_keep_weights_as_external_data(monkeypatch, synth_data, tmp_path, target_images):
    """Models over protobuf's 2 GiB keep weights beside the graph; the manifest hashes both files."""
    from mrad.export import package
    from mrad.runtime import Detector

    monkeypatch.setattr(package, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "bundle"
    assert run_export(synth_data[0], out).exit_code == 0
    manifest = read_manifest(out)
    encoder = manifest.graphs["encoder"]
    assert encoder.external_data in manifest.files
    assert (out / encoder.external_data).stat().st_size > (out / encoder.file).stat().st_size
    assert 0.0 <= Detector(out, provider="cpu").predict(target_images[0]).score <= 1.0


def test_include_train_adds_normal_entries(synth_data, tmp_path):
    out = tmp_path / "bundle"
    result = run_export(synth_data[0], out, "--include-train")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.memories["image"].count == 24 + 3 * 2  # test split plus two train/good images per category
    assert manifest.provenance["aux_splits"] == ["test", "train/good"]


@pytest.mark.parametrize("stage", ["package.trace_encoder", "files.swap_in_directory"])
def test_interrupted_overwrite_leaves_the_old_bundle(aux_copy, tmp_path, monkeypatch, stage):
    from mrad.export import package
    from mrad.runtime import files
    from mrad.runtime.files import sha256_of

    out = tmp_path / "bundle"
    assert run_export(aux_copy, out).exit_code == 0
    before = {p.name: sha256_of(p) for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module, name = stage.split(".")
    monkeypatch.setattr({"package": package, "files": files}[module], name, interrupted)
    result = run_export(aux_copy, out, "--overwrite")
    assert result.exit_code != 0
    assert {p.name: sha256_of(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aux", "bundle"], "no staging or set-aside copy is left"


class RunsCode:
    """A pickle that would create a file when loaded with plain unpickling."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_that_try_to_run_code_are_refused(tmp_path, aux_copy):
    import zipfile

    from mrad.export import artefacts

    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"image_proj": RunsCode(marker)}, hostile)
    with pytest.raises(ExportError, match="could run code"):
        artefacts.load_checkpoint(hostile)
    archive = tmp_path / "hostile-openai.pt"  # looks like OpenAI's TorchScript archives, holds the same pickle
    shutil.copy(hostile, archive)
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("hostile/code/__torch__/model.py", "")
    for weights in (hostile, archive):
        result = run_export(aux_copy, tmp_path / f"out-{weights.stem}", "--pretrained", str(weights))
        assert result.exit_code == 2 and "error:" in result.output, result.output
    assert not marker.exists(), "no code from a checkpoint ran"


def test_torch_before_2_6_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(ExportError, match="CVE-2025-32434"):
        models.require_safe_torch()


def test_precision_int8_is_derived_from_fp32_and_measured(synth_data, tf_bundle, tmp_path, target_images):
    """--precision int8: the bundle written is the fp32 export quantized, its fidelity measured on the aux images."""
    from mrad.runtime import Detector

    out = tmp_path / "bundle"
    result = run_export(synth_data[0], out, "--precision", "int8", "--calibration-images", "4")
    assert result.exit_code == 0, result.output
    encoder = read_manifest(out).graphs["encoder"]
    assert encoder.precision == "int8" and encoder.fidelity["images"] == 4
    assert not list(tmp_path.glob(".bundle.*")), "the fp32 bundle it was derived from is not left behind"
    fp32, int8 = Detector(tf_bundle, provider="cpu"), Detector(out, provider="cpu")
    for image in target_images[:4]:
        assert int8.predict(image).score == pytest.approx(fp32.predict(image).score, abs=0.05)  # as mrad-quantize's


def test_derived_precision_needs_aux_images(tmp_path):
    result = CliRunner().invoke(cli.main, ["--model", "tiny", "--pretrained", "none", "--memory-bank", __file__,
                                           __file__, "--precision", "fp16", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--precision fp16 calibrates and measures on the auxiliary images" in result.output


def test_attention_is_fused_and_scores_as_traced(synth_data, tf_bundle, tmp_path, monkeypatch, target_images):
    """Every attention product, the v-v ones included, becomes one MultiHeadAttention node; outputs stay put."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from mrad.export import package, precision
    from mrad.export.attention import fuse_attention

    layers = read_manifest(tf_bundle).model["layers"]
    ops = [n.op_type for n in onnx.load(str(tf_bundle / "encoder.onnx")).graph.node]
    # block 0 has no v-v path (pruned at export, unused); every later block has both products
    assert ops.count("MultiHeadAttention") == 1 + 2 * (layers - 1) and "Softmax" not in ops
    assert precision.activation_products(tf_bundle / "encoder.onnx") == [], "int8 then quantizes weights only"

    monkeypatch.setattr(package, "fuse_encoder", lambda *args: 0)
    monkeypatch.setattr(package, "optimise_graph", lambda *args: {})  # the graph as traced, products and all
    traced = tmp_path / "traced"
    assert run_export(synth_data[0], traced).exit_code == 0
    assert len(precision.activation_products(traced / "encoder.onnx")) == 2 + 4 * (layers - 1)
    model = onnx.load(str(traced / "encoder.onnx"))
    assert fuse_attention(model, num_heads=2) == 1 + 2 * (layers - 1)  # the tiny model: width 128, heads of 64
    before = ort.InferenceSession(str(traced / "encoder.onnx"), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    for want, got in zip(before.run(None, {"image": x}), after.run(None, {"image": x})):
        np.testing.assert_allclose(got, want, atol=1e-5)  # the same arithmetic in one kernel: fp32 rounding only


@pytest.mark.parametrize("options, phases", [
    (dict(), ["import", "weights", "memory", "trace", "fuse", "optimise", "check", "index"]),
    (dict(variant="ft", sign_key=Path("k.pem")),
     ["import", "weights", "memory", "train-ft", "trace", "fuse", "optimise", "check", "index", "sign"]),
    (dict(variant="clip", memory_bank=(Path("a"), Path("b")), checkpoint=Path("c"), precision="int8"),
     ["import", "weights", "released", "checkpoint", "trace", "fuse", "optimise", "check", "text", "index", "derive"]),
    (dict(variant="clip"), ["import", "weights", "memory", "train-ft", "train-prompts", "trace", "fuse", "optimise",
                            "check", "text", "index"]),
])
def test_every_export_says_its_phases_in_order(options, phases):
    assert progress.plan(ExportOptions(out=Path("b"), **options)) == phases
    assert all(phase in progress.PHASES for phase in phases)
