"""A bundle is checked on load: checksums, format version, foreign or pickled content."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mrad.runtime import BundleError, Detector, MradError
from mrad.runtime.core.bundle import FORMAT_VERSION, MANIFEST_NAME, read_manifest
from mrad.runtime.files import sha256_of


@pytest.fixture
def bundle_copy(tf_bundle, tmp_path):
    return shutil.copytree(tf_bundle, tmp_path / "bundle")


def edit_manifest(bundle, change):
    path = bundle / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_describes_everything(tf_bundle):
    manifest = read_manifest(tf_bundle)
    assert manifest.variant == "tf"
    assert manifest.model["random_weights"] is True
    assert manifest.preprocess.image_size == 112 and manifest.scoring.grid == 8
    assert manifest.scoring.image_weight == 0.7 and manifest.scoring.sigma == 4.0
    assert set(manifest.named_files()) <= set(manifest.files)
    assert all(len(digest) == 64 for digest in manifest.files.values())


def test_corrupt_file_is_named(bundle_copy):
    with open(bundle_copy / "memory_pixel_keys.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\x00\xff")
    with pytest.raises(BundleError, match=r"bundle is corrupt: file memory_pixel_keys.npy sha256"):
        Detector(bundle_copy)


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match="file encoder.onnx named in the manifest is missing"):
        Detector(bundle_copy)


def test_future_format_version_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="format version .* is not supported"):
        Detector(bundle_copy)


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"name": "something else"}))
    with pytest.raises(BundleError, match="not an mrad bundle"):
        Detector(tmp_path)
    with pytest.raises(BundleError, match="has no manifest.json"):
        Detector(tmp_path / "..")
    with pytest.raises(BundleError, match="is not a directory"):
        Detector(tmp_path / "absent")


def test_unhashed_file_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["files"].pop("memory_image_labels.npy"))
    with pytest.raises(BundleError, match="without a checksum"):
        Detector(bundle_copy)


def test_pickled_labels_are_refused(bundle_copy):
    """A label file holding Python objects must be refused, never unpickled, even with a matching checksum."""
    labels = bundle_copy / "memory_image_labels.npy"
    count = len(np.load(labels))
    np.save(labels, np.array([0] * count, dtype=object), allow_pickle=True)

    edit_manifest(bundle_copy, lambda m: m["files"].update({"memory_image_labels.npy": sha256_of(labels)}))
    with pytest.raises(BundleError, match="memory_image_labels.npy"):
        Detector(bundle_copy)


FORMAT1 = Path(__file__).parent / "fixtures" / "format1-bundle"
FORMAT1_TOLERANCE = 1e-6  # the same graph and memory read through the upgrade path: float32 noise only


@pytest.mark.parametrize("mode", ["exact", "hnsw"])
def test_format1_bundle_scores_as_before(mode):
    """A bundle written by the format-1 exporter, with the scores the format-1 runtime gave (expected.json)."""
    expected = json.loads((FORMAT1 / "expected.json").read_text())[mode]
    detector = Detector(FORMAT1 / "bundle", provider="cpu", retrieval=mode)
    names = sorted(expected)
    for name, result in zip(names, detector.predict_batch([FORMAT1 / "images" / n for n in names])):
        assert result.score == pytest.approx(expected[name]["score"], abs=FORMAT1_TOLERANCE)
        assert result.image_probability == pytest.approx(expected[name]["image_probability"], abs=FORMAT1_TOLERANCE)
        assert float(result.anomaly_map.max()) == pytest.approx(expected[name]["map_max"], abs=FORMAT1_TOLERANCE)
        assert float(result.anomaly_map.mean()) == pytest.approx(expected[name]["map_mean"], abs=FORMAT1_TOLERANCE)


def test_format1_bundle_is_read_only():
    detector = Detector(FORMAT1 / "bundle", provider="cpu")
    assert detector.manifest.provenance["format_version"] == 1
    with pytest.raises(MradError, match="cannot take new entries .* export the bundle again"):
        detector.memory_entries(FORMAT1 / "images" / "1_checker_good.png", label=0)


def test_export_writes_format_3(tf_bundle):
    raw = json.loads((tf_bundle / MANIFEST_NAME).read_text())
    assert raw["format_version"] == FORMAT_VERSION == 3
    assert "text" not in raw["scoring"]  # MRAD-CLIP's only
    assert set(raw["graphs"]) == {"encoder"} and set(raw["memories"]) == {"image", "pixel"}
    encoder = raw["graphs"]["encoder"]
    assert [o["name"] for o in encoder["outputs"]] == ["image_query", "patch_query", "image_feature", "patch_feature",
                                                      "patch_tokens"]
    assert encoder["precision"] == "fp32" and encoder["checked_providers"] == ["CPUExecutionProvider"]
    for name, memory in raw["memories"].items():
        assert memory["count"] == len((tf_bundle / memory["provenance"]).read_text().splitlines())
        assert memory["hnsw"] == {"M": 16, "ef_construction": 200, "ef_search": 128}
        assert memory["feature"] in {o["name"] for o in encoder["outputs"]}


@pytest.mark.parametrize("change,message", [
    (lambda m: m["memories"]["image"].update(labels="../../etc/passwd"), "outside the bundle directory"),
    (lambda m: m["graphs"]["encoder"].update(file="/tmp/encoder.onnx"), "outside the bundle directory"),
    (lambda m: m["files"].update({"../x": "0" * 64}), "manifest.files names file '../x' outside"),
    (lambda m: m["scoring"].update(top_k="64"), "manifest.scoring.top_k: '64' is not of type 'integer'"),
    (lambda m: m["scoring"].update(top_k=True), "manifest.scoring.top_k: True is not of type 'integer'"),
    (lambda m: m["scoring"].pop("grid"), "manifest.scoring.grid: missing"),
    (lambda m: m["scoring"].update(sigma=-1.0), "manifest.scoring.sigma: -1.0 is less than or equal to"),
    (lambda m: m["preprocess"].update(std=[0.2, 0.0, 0.2]), r"manifest.preprocess.std\[1\]"),
    (lambda m: m["memories"]["pixel"].update(query="nothing"), "memory pixel reads encoder outputs"),
    (lambda m: m["memories"]["image"].update(colour="blue"), "manifest.memories.image.colour: unknown key"),
    (lambda m: m["memories"]["image"].update(dim=7), "memory image has dim 7 but its queries"),
    (lambda m: m["scoring"].update(top_fraction=1e-9), "leaves no map value to average"),
    (lambda m: m["scoring"].update(grid=9), "not a multiple of scoring.grid 9"),
    (lambda m: m["memories"]["image"].update(count=10 ** 12), "manifest.memories.image.count"),
    # found by the fuzz harness (seed 13, an FT bundle): a deleted memory gave a KeyError at the first prediction
    (lambda m: m["memories"].pop("image"), "manifest.memories.image: missing"),
    (lambda m: m["memories"]["image"].update(kind="pixel"), "memory image must be of kind 'image'"),
    # found by the fuzz harness (seed 14): a named feature axis reached the enrollment's arithmetic (TypeError)
    (lambda m: m["graphs"]["encoder"]["outputs"][4].update(shape=["batch", 64, "x"]), "named axis past the batch"),
])
def test_manifest_values_are_checked(bundle_copy, change, message):
    edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match=message):
        Detector(bundle_copy)


def test_nan_in_a_manifest_is_refused(bundle_copy):
    text = (bundle_copy / "manifest.json").read_text().replace('"sigma": 4.0', '"sigma": NaN')
    (bundle_copy / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="NaN is not a number a manifest may hold"):
        Detector(bundle_copy)


def test_links_out_of_the_bundle_and_special_files_are_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.npy"
    labels = bundle_copy / "memory_image_labels.npy"
    outside.write_bytes(labels.read_bytes())
    labels.unlink()
    labels.symlink_to(outside)
    with pytest.raises(BundleError, match="leads outside the bundle directory"):
        Detector(bundle_copy)
    labels.unlink()
    os.mkfifo(labels)  # opening it would block forever
    with pytest.raises(BundleError, match="is not a regular file"):
        Detector(bundle_copy)
    with pytest.raises(BundleError, match="is not a regular file"):
        Detector(bundle_copy, verify=False)
    manifest = bundle_copy / "manifest.json"
    elsewhere = tmp_path / "elsewhere.json"
    manifest.rename(elsewhere)
    manifest.symlink_to(elsewhere)
    with pytest.raises(BundleError, match="manifest.json leads outside the bundle directory"):
        Detector(bundle_copy)


def test_memory_arrays_must_match_the_manifest(bundle_copy):
    keys = bundle_copy / "memory_image_keys.npy"
    np.save(keys, np.load(keys)[:, :10])
    edit_manifest(bundle_copy, lambda m: m["files"].update({"memory_image_keys.npy": sha256_of(keys)}))
    with pytest.raises(BundleError, match="keys of memory_image_keys.npy must be"):
        Detector(bundle_copy)
