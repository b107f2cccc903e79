"""The README's main command runs end to end on built-in defaults."""

from click.testing import CliRunner

from mrad.tools import demo


def test_demo_exports_and_scores(tmp_path):
    result = CliRunner().invoke(demo.main, ["--out", str(tmp_path), "--image-size", "112"])
    assert result.exit_code == 0, result.output
    assert "image AUROC on the 24 target images" in result.output
    assert (tmp_path / "bundle-tiny-tf" / "manifest.json").is_file()
