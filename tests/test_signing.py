"""Signed bundles: a trusted key's signature is required when asked for, and rewritten checksums do not fool it."""

import json
import shutil

import pytest
from click.testing import CliRunner

from mrad.runtime import BundleError, Detector

from mrad.runtime.commands import sign as sign_cli
from mrad.runtime.files import sha256_of
from mrad.runtime.core.signing import SIGNATURE_NAME

pytest.importorskip("model_signing", reason="signing needs the 'sign' extra (model-signing)")


def key_pair(folder, name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    private_path, public_path = folder / f"{name}.pem", folder / f"{name}.pub"
    private_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


@pytest.fixture
def signed(tf_bundle, tmp_path):
    bundle = shutil.copytree(tf_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns("enrollment"))
    private, public = key_pair(tmp_path, "signer")
    result = CliRunner().invoke(sign_cli.main, ["--bundle", str(bundle), "--key", str(private)])
    assert result.exit_code == 0, result.output
    return bundle, public


def test_signed_bundle_loads_with_its_key(signed, target_images, tmp_path):
    bundle, public = signed
    assert (bundle / SIGNATURE_NAME).is_file()
    detector = Detector(bundle, provider="cpu", trusted_keys=[public])
    assert detector.signed_by == public and 0 <= detector.predict(target_images[0]).score <= 1
    checked = CliRunner().invoke(sign_cli.main, ["--bundle", str(bundle), "--verify", "--trusted-key", str(public)])
    assert checked.exit_code == 0 and "signature valid" in checked.stdout
    detector.line_memory.enroll([target_images[0]], "normal")  # the line's own memories change; the signature still holds
    Detector(bundle, provider="cpu", trusted_keys=[public])


def test_rewritten_checksums_do_not_fool_the_signature(signed, tmp_path):
    bundle, public = signed
    labels = bundle / "memory_image_labels.npy"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1
    labels.write_bytes(bytes(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["memory_image_labels.npy"] = sha256_of(labels)  # what anyone with write access can do
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    Detector(bundle, provider="cpu")  # without a trusted key, the checksums are all there is
    with pytest.raises(BundleError, match="not signed by a trusted key, or was changed after signing"):
        Detector(bundle, provider="cpu", trusted_keys=[public])


def test_other_keys_and_unsigned_bundles_are_refused(signed, tf_bundle, tmp_path):
    bundle, _ = signed
    _, stranger = key_pair(tmp_path, "stranger")
    with pytest.raises(BundleError, match="not signed by a trusted key"):
        Detector(bundle, provider="cpu", trusted_keys=[stranger])
    unsigned = shutil.copytree(tf_bundle, tmp_path / "unsigned", ignore=shutil.ignore_patterns("enrollment"))
    with pytest.raises(BundleError, match="is not signed"):
        Detector(unsigned, provider="cpu", trusted_keys=[stranger])
    Detector(unsigned, provider="cpu")  # no key required: unsigned bundles keep loading
    refused = CliRunner().invoke(sign_cli.main, ["--bundle", str(bundle), "--verify", "--trusted-key", str(stranger)])
    assert refused.exit_code == 3 and refused.stderr.startswith("error: bundle")


def test_export_signs_before_the_bundle_is_put_in_place(synth_data, tmp_path):
    from mrad.export import cli as export_cli

    from conftest import IMAGE_SIZE

    private, public = key_pair(tmp_path, "release")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_cli.main, [
        "--model", "tiny", "--pretrained", "none", "--image-size", str(IMAGE_SIZE), "--aux-data", str(synth_data[0]),
        "--out", str(out), "--device", "cpu", "--sign-key", str(private)])
    assert result.exit_code == 0, result.output
    Detector(out, provider="cpu", trusted_keys=[public])
