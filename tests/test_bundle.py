"""A bundle is checked on load: checksums, format version, foreign or pickled content."""

import json
import shutil

import numpy as np
import pytest

from mrad.runtime import BundleError, Detector
from mrad.runtime.bundle import FORMAT_VERSION, MANIFEST_NAME, read_manifest
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
