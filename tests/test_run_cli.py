"""mrad-run over files and folders: one JSON line per image, errors as records."""

import json
import shutil

from click.testing import CliRunner

from mrad.runtime import cli


def test_folder_with_a_corrupt_image(tf_bundle, synth_data, tmp_path):
    folder = shutil.copytree(synth_data[1] / "checker" / "test", tmp_path / "parts")
    broken = folder / "good" / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    result = CliRunner().invoke(cli.main, ["--bundle", str(tf_bundle), "--input", str(folder), "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    images = sorted(p for p in folder.rglob("*.png"))
    assert [r["source"] for r in records] == [str(p) for p in images]
    assert [r["frame"] for r in records] == list(range(len(images)))
    errors = [r for r in records if "error" in r]
    assert [r["source"] for r in errors] == [str(broken)]
    assert all(0.0 <= r["score"] <= 1.0 and r["latency_ms"] > 0 for r in records if "error" not in r)
    assert f"{len(images)} frames, 1 errors" in result.stderr


def test_bad_bundle_exit_code(tmp_path):
    result = CliRunner().invoke(cli.main, ["--bundle", str(tmp_path), "--input", str(tmp_path)])
    assert result.exit_code == cli.EXIT_BAD_BUNDLE
    assert "error: not a bundle" in result.stderr


def test_missing_input_exit_code(tf_bundle, tmp_path):
    result = CliRunner().invoke(cli.main, ["--bundle", str(tf_bundle), "--input", str(tmp_path / "nope.png")])
    assert result.exit_code == cli.EXIT_BAD_ARGUMENTS
    assert "does not exist" in result.stderr
