"""Trust that reaches the decision: where a trusted key is required, the bundle, the enrollment version in use and
the calibration are each signed and checked, each file on the bytes it is loaded from; unsigned lines work as before."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mrad.runtime import BundleError, Detector, MradError
from mrad.runtime.commands import calibrate as calibrate_cli
from mrad.runtime.commands import enroll as enroll_cli
from mrad.runtime.commands import sign as sign_cli
from mrad.runtime.core import detector as detector_module
from mrad.runtime.core import signing
from mrad.runtime.formats import calibration
from mrad.runtime.formats.station import RecipeConfig
from mrad.runtime.line.station import Recipe, Station

pytest.importorskip("model_signing", reason="signing needs the 'sign' extra (model-signing)")

from mrad.tools.fuzz_trust import key_pair  # after the skip: it needs the extra


@pytest.fixture
def keys(tmp_path):
    return {name: key_pair(tmp_path, name) for name in ("release", "line", "stranger")}


@pytest.fixture
def bundle(tf_bundle, tmp_path, keys):
    copy = shutil.copytree(tf_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns("enrollment", "model.sig"))
    signing.sign(copy, keys["release"][0])
    return copy


def trusted(keys):
    return [keys["release"][1], keys["line"][1]]


def images(synth_data, split):
    return sorted(str(p) for p in synth_data[1].glob(f"checker/{split}/good/*.png"))


@pytest.fixture
def line(bundle, keys, synth_data):
    """The bundle with a version enrolled and a threshold measured, both by the commands, signed by the line's key."""
    given = ["--bundle", str(bundle), "--trusted-key", str(keys["release"][1]), "--trusted-key", str(keys["line"][1]),
             "--sign-key", str(keys["line"][0])]
    enrolled = CliRunner().invoke(enroll_cli.main, given + ["--normal", images(synth_data, "train")[0],
                                                            "--normal", images(synth_data, "train")[1]])
    assert enrolled.exit_code == 0, enrolled.output
    measured = CliRunner().invoke(calibrate_cli.main, given + ["--normal", str(synth_data[1] / "checker/test/good")])
    assert measured.exit_code == 0, measured.output
    return bundle


def current(bundle):
    return bundle / "enrollment" / "v000001"


def rehash_head(bundle):
    head = json.loads((bundle / "enrollment" / "HEAD").read_text())
    head["sha256"]["1"] = hashlib.sha256((current(bundle) / "enrollment.json").read_bytes()).hexdigest()
    (bundle / "enrollment" / "HEAD").write_text(json.dumps(head))


def change_weights(bundle):
    path = current(bundle) / "enrollment.json"
    manifest = json.loads(path.read_text())
    manifest["settings"]["map_weight"] = 0.05  # the enrolled memory barely counts: defects look as zero-shot sees them
    path.write_text(json.dumps(manifest, indent=1))


def test_a_signed_line_loads_with_its_keys(line, keys):
    assert (current(line) / "enrollment.sig").is_file() and (line.with_name("bundle.calibration.json.sig")).is_file()
    recipe = Recipe.open(RecipeConfig("a", line, trusted_keys=tuple(trusted(keys))), provider="cpu")
    assert recipe.detector.enrollment_version == 1 and recipe.detector.signed_by == keys["release"][1]
    assert recipe.policy.threshold is not None and not recipe.threshold_stale


def test_changed_enrollment_weights_are_refused(line, keys):
    change_weights(line)
    with pytest.raises(BundleError, match="changed after it was written"):  # no key: HEAD's hash still catches it
        Detector(line, provider="cpu")
    rehash_head(line)  # as anyone who can write the folder could
    assert Detector(line, provider="cpu").enrollment.settings.map_weight == 0.05  # no key: hashes are all there is
    with pytest.raises(BundleError, match="enrollment version 1 .* not signed by a trusted key, or was changed"):
        Detector(line, provider="cpu", trusted_keys=trusted(keys))


def test_changed_enrollment_keys_with_every_hash_rewritten_are_refused(line, keys):
    import numpy as np

    keys_file = current(line) / "normal_image_keys.npy"
    np.save(keys_file, -np.load(keys_file))
    manifest = json.loads((current(line) / "enrollment.json").read_text())
    manifest["files"][keys_file.name] = hashlib.sha256(keys_file.read_bytes()).hexdigest()
    (current(line) / "enrollment.json").write_text(json.dumps(manifest, indent=1))
    rehash_head(line)
    Detector(line, provider="cpu")
    with pytest.raises(BundleError, match="not signed by a trusted key, or was changed after signing"):
        Detector(line, provider="cpu", trusted_keys=trusted(keys))


def test_a_version_folder_that_is_a_link_is_refused(line, keys, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.move(current(line), outside)
    current(line).symlink_to(outside, target_is_directory=True)  # a validly signed version, kept outside
    for trust in ((), trusted(keys)):
        with pytest.raises(BundleError, match="is a link .* not a folder of its own"):
            Detector(line, provider="cpu", trusted_keys=trust)


def test_a_changed_calibration_is_refused(line, keys):
    path = line.with_name("bundle.calibration.json")
    document = json.loads(path.read_text())
    document["threshold"] = 0.99  # every defect passes
    path.write_text(json.dumps(document, indent=2))
    config = RecipeConfig("a", line)
    assert Recipe.open(config, provider="cpu").policy.threshold == 0.99  # no key: as before
    with pytest.raises(MradError, match="calibration .* not signed by a trusted key, or was changed after signing"):
        Recipe.open(RecipeConfig("a", line, trusted_keys=tuple(trusted(keys))), provider="cpu")
    (path.parent / (path.name + ".sig")).unlink()
    with pytest.raises(MradError, match="calibration .* is not signed"):
        Recipe.open(RecipeConfig("a", line, trusted_keys=tuple(trusted(keys))), provider="cpu")


def test_an_unsigned_version_is_refused_and_an_unsigned_save_changes_nothing(bundle, keys, synth_data):
    Detector(bundle, provider="cpu").line_memory.enroll(images(synth_data, "train"), "normal")  # unsigned
    with pytest.raises(BundleError, match="not signed .*enrollment.sig is missing.*mrad-enroll --sign-key"):
        Detector(bundle, provider="cpu", trusted_keys=trusted(keys))
    (bundle / "enrollment" / "HEAD").unlink()  # what the message offers: start from nothing
    detector = Detector(bundle, provider="cpu", trusted_keys=trusted(keys))
    for change in (lambda m: m.enroll(images(synth_data, "train"), "normal"), lambda m: m.clear(),
                   lambda m: m.change_settings(m.target_memory.settings)):
        with pytest.raises(MradError, match="must be signed"):
            change(detector.line_memory)
        assert detector.enrollment_version is None and detector.target.counts["normal/image"] == 0
    with pytest.raises(MradError, match="not among the trusted keys"):
        Detector(bundle, provider="cpu", trusted_keys=[keys["release"][1]], signer=signing.Signer(keys["line"][0]))


def test_the_encoder_swapped_after_the_check_is_refused(bundle, keys, monkeypatch):
    """The signature and the manifest are checked, then the encoder is swapped before it is loaded: the bytes
    loaded are the bytes checked, so the swap is refused (it was accepted in 2 to 4 runs of 30 before)."""
    read = detector_module.read_manifest

    def read_then_swap(*args, **kwargs):
        manifest = read(*args, **kwargs)
        encoder = bundle / manifest.graphs["encoder"].file
        encoder.write_bytes(encoder.read_bytes() + b"\0")  # another graph, as far as its sha256 goes
        return manifest

    monkeypatch.setattr(detector_module, "read_manifest", read_then_swap)
    with pytest.raises(BundleError, match="encoder.onnx does not match its sha256"):
        Detector(bundle, provider="cpu", trusted_keys=trusted(keys))


def test_rsa_and_other_keys_are_refused_in_one_line(bundle, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    for name, private in (("rsa", rsa.generate_private_key(65537, 2048)), ("ed", ed25519.Ed25519PrivateKey.generate())):
        (tmp_path / f"{name}.pem").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{name}.pub").write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        with pytest.raises(MradError, match="elliptic-curve keys on P-256, P-384 or P-521"):
            signing.Signer(tmp_path / f"{name}.pem")
        with pytest.raises(MradError, match="elliptic-curve keys on P-256, P-384 or P-521"):
            Detector(bundle, provider="cpu", trusted_keys=[tmp_path / f"{name}.pub"])
        for arguments in (["--key", str(tmp_path / f"{name}.pem")],
                          ["--verify", "--trusted-key", str(tmp_path / f"{name}.pub")]):
            done = CliRunner().invoke(sign_cli.main, ["--bundle", str(bundle)] + arguments)
            assert done.exit_code == 2 and done.stderr.count("\n") == 1 and "elliptic-curve" in done.stderr, done.output


def test_a_station_file_requires_keys_and_signs_what_the_line_enrolls(bundle, keys, synth_data, tmp_path):
    """The page enrolls through Recipe.enroll and recalibrates through Recipe.remeasure: with the station file's
    sign-key both are signed, and the station opens again with the keys it requires."""
    (tmp_path / "keys").mkdir()
    for name in ("release", "line"):
        shutil.copy(keys[name][1], tmp_path / "keys" / f"{name}.pub")
    shutil.copy(keys["line"][0], tmp_path / "keys" / "line.pem")
    station_file = tmp_path / "station.toml"
    station_file.write_text('trusted-keys = ["keys/release.pub", "keys/line.pub"]\nsign-key = "keys/line.pem"\n'
                            '[[recipes]]\nname = "a"\nbundle = "bundle"\n')
    station = Station(station_file, provider="cpu")
    recipe = station.recipe()
    recipe.enroll(images(synth_data, "train"), "normal")
    measured = recipe.remeasure(minimum=1)
    assert measured.policy is not None and (current(bundle) / "enrollment.sig").is_file()
    again = Station(station_file, provider="cpu").recipe()
    assert again.detector.enrollment_version == 1 and again.policy.threshold == measured.policy.threshold
    station_file.write_text('trusted-keys = ["keys/release.pub", "keys/line.pub"]\n'
                            '[[recipes]]\nname = "a"\nbundle = "bundle"\n')
    unsigned = Station(station_file, provider="cpu").recipe()
    with pytest.raises(MradError, match="must be signed"):
        unsigned.enroll(images(synth_data, "train"), "normal")
    with pytest.raises(MradError, match="a calibration must be signed"):
        unsigned.remeasure(minimum=1)


@pytest.mark.parametrize("module", ["mrad.runtime.commands.enroll", "mrad.runtime.commands.calibrate",
                                    "mrad.tools.evaluate", "mrad.tools.bench"])
def test_every_command_that_loads_a_bundle_takes_trusted_keys(module, bundle, keys, tmp_path):
    import importlib

    main = importlib.import_module(module).main
    extra = {"mrad.runtime.commands.enroll": ["--list"], "mrad.runtime.commands.calibrate": ["--normal", str(tmp_path), "--sign-key", str(keys["stranger"][0])],
             "mrad.tools.evaluate": ["--data", str(tmp_path)], "mrad.tools.bench": ["--providers", "cpu"]}[module]
    done = CliRunner().invoke(main, ["--bundle", str(bundle), "--trusted-key", str(keys["stranger"][1])] + extra)
    assert done.exit_code == 3 and "not signed by a trusted key" in done.stderr, done.output
    if module == "mrad.runtime.commands.enroll":
        refused = CliRunner().invoke(main, ["--bundle", str(bundle), "--trusted-key", str(keys["release"][1]),
                                            "--normal", str(tmp_path)])
        assert refused.exit_code == 2 and "must be signed" in refused.stderr, refused.output


def test_unsigned_lines_and_old_heads_work_as_before(bundle, synth_data):
    detector = Detector(bundle, provider="cpu")
    detector.line_memory.enroll(images(synth_data, "train"), "normal")
    (bundle / "enrollment" / "HEAD").write_text(json.dumps({"version": 1}))  # a HEAD written before hashes were kept
    assert Detector(bundle, provider="cpu").enrollment_version == 1
    result = calibration.calibrate([0.1, 0.2], 0.99, "exact", bundle, 1)
    calibration.save(result, bundle.with_name("x.json"))
    assert not bundle.with_name("x.json.sig").exists()
    assert calibration.load(bundle.with_name("x.json"), bundle, "exact").threshold == result.threshold


def test_the_trust_harness_accepts_no_changed_line(tf_bundle, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mrad.tools.fuzz_trust", "--bundle", str(tf_bundle), "--cases", "32",
                           "--seed", "3", "--failures", str(tmp_path / "failures")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "tampered accepted: 0" in done.stdout and "control refused: 0" in done.stdout
    assert "accepted: 4 " in done.stdout and "refused: 28 " in done.stdout and "failures: 0" in done.stdout


def test_a_graph_with_external_weights_runs_from_the_checked_bytes(tmp_path):
    """Graphs past 2 GB keep their weights in a second file: both are read once, checked, and given to ONNX Runtime
    from memory; a weights file changed after its checksum is refused."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from mrad.runtime.core.bundle import BundleFiles, Graph, TensorSpec
    from mrad.runtime.core.graphs import GraphRunner

    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "w")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "g.onnx"), save_as_external_data=True, location="g.data", size_threshold=0)
    graph = Graph(file="g.onnx", external_data="g.data", inputs=(TensorSpec("x", ("batch", 4), "float32"),),
                  outputs=(TensorSpec("y", ("batch", 4), "float32"),))
    digests = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in graph.files()}
    runner = GraphRunner(BundleFiles(tmp_path, digests), "g", graph, "cpu")
    np.testing.assert_array_equal(runner.run(["y"], {"x": np.ones((1, 4), np.float32)})["y"], [[1, 2, 3, 4]])
    (tmp_path / "g.data").write_bytes(np.full(4, 9, np.float32).tobytes())
    with pytest.raises(BundleError, match="g.data does not match its sha256"):
        GraphRunner(BundleFiles(tmp_path, digests), "g", graph, "cpu")
