"""Signed bundles: a trusted key's signature is required when asked for, and rewritten checksums do not fool it."""

import json
import shutil

import pytest
from click.testing import CliRunner

from mrad.runtime import BundleError, Detector, MradError

from mrad.runtime.commands import sign as sign_cli
from mrad.runtime.files import sha256_of
from mrad.runtime.core.signing import SIGNATURE_NAME, Signer

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
    return bundle, public, private


def test_signed_bundle_loads_with_its_key(signed, target_images, tmp_path):
    bundle, public, private = signed
    assert (bundle / SIGNATURE_NAME).is_file()
    detector = Detector(bundle, provider="cpu", trusted_keys=[public])
    assert detector.signed_by == public and 0 <= detector.predict(target_images[0]).score <= 1
    checked = CliRunner().invoke(sign_cli.main, ["--bundle", str(bundle), "--verify", "--trusted-key", str(public)])
    assert checked.exit_code == 0 and "signature valid" in checked.stdout
    with pytest.raises(MradError, match="must be signed"):  # the next load would refuse an unsigned version
        detector.line_memory.enroll([target_images[0]], "normal")
    assert detector.enrollment_version is None and not (bundle / "enrollment").exists(), "a refused save changes nothing"
    signer = Detector(bundle, provider="cpu", trusted_keys=[public], signer=Signer(private))
    signer.line_memory.enroll([target_images[0]], "normal")  # the line's own memories change, signed as they are saved
    assert Detector(bundle, provider="cpu", trusted_keys=[public]).enrollment_version == 1


def test_rewritten_checksums_do_not_fool_the_signature(signed, tmp_path):
    bundle, public, _ = signed
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
    bundle, _, _ = signed
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


@pytest.mark.parametrize("sign_from, verify_from", [("relative", "relative"), ("relative", "absolute"),
                                                     ("absolute", "relative")])
def test_sign_and_verify_with_relative_paths_from_any_folder(tf_bundle, tmp_path, monkeypatch, sign_from, verify_from):
    """mrad-sign --bundle bundles/x --key k.pem, then --verify (and mrad-run --trusted-key) with either kind of path:
    a relative one once wrote a signature that its own verification refused ("Extra files found: model.sig")."""
    shutil.copytree(tf_bundle, tmp_path / "bundles" / "x", ignore=shutil.ignore_patterns("enrollment"))
    key_pair(tmp_path, "k")
    monkeypatch.chdir(tmp_path)

    def given(kind, relative):
        return relative if kind == "relative" else str(tmp_path / relative)

    done = CliRunner().invoke(sign_cli.main, ["--bundle", given(sign_from, "bundles/x"), "--key", given(sign_from, "k.pem")])
    assert done.exit_code == 0, done.output
    checked = CliRunner().invoke(sign_cli.main, ["--bundle", given(verify_from, "bundles/x"), "--verify",
                                                 "--trusted-key", given(verify_from, "k.pub")])
    assert checked.exit_code == 0 and "signature valid" in checked.stdout, checked.output
    Detector(given(verify_from, "bundles/x"), provider="cpu", trusted_keys=[given(verify_from, "k.pub")])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # another working folder: the same bundle, by a relative path too
    Detector("../bundles/x", provider="cpu", trusted_keys=["../k.pub"])
