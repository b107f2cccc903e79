"""Every command ends a user mistake in one error line with a documented exit code, and teaches with --help."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mrad.export import cli as export_cli
from mrad.runtime import MradError
from mrad.runtime.commands import calibrate as calibrate_cli
from mrad.runtime.commands import common as cli
from mrad.runtime.commands import enroll as enroll_cli
from mrad.runtime.commands import run as run_cli
from mrad.runtime.commands import sign as sign_cli
from mrad.tools import bench, evaluate, synth

COMMANDS = [run_cli.main, calibrate_cli.main, enroll_cli.main, sign_cli.main, export_cli.main, evaluate.main, bench.main, synth.main]

WITHOUT_TORCH = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip", "torchvision", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
module, attribute = sys.argv[1].split(":")
sys.argv = [module] + sys.argv[2:]
getattr(__import__(module, fromlist=[attribute]), attribute)()
"""


def without_torch(entry_point: str, *args):
    """Run a command as on a runtime-only install: torch and friends cannot be imported."""
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, entry_point, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def assert_one_error_line(result, code, fragment):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_help_teaches(command):
    text = CliRunner().invoke(command, ["--help"]).output
    assert "Exit codes: 0 done" in text
    assert "Examples:" in text or command.name == "mrad-synth"


def test_eval_on_a_folder_without_manifest(tmp_path):
    result = CliRunner().invoke(evaluate.main, ["--bundle", str(tmp_path), "--data", str(tmp_path)])
    assert_one_error_line(result, cli.EXIT_BAD_BUNDLE, "has no manifest.json")


def test_eval_on_data_in_another_layout(tf_bundle, tmp_path):
    result = CliRunner().invoke(evaluate.main, ["--bundle", str(tf_bundle), "--data", str(tmp_path), "--provider", "cpu"])
    assert_one_error_line(result, cli.EXIT_BAD_ARGUMENTS, "MVTec AD layout")


def test_library_functions_raise_the_error_family(tmp_path):
    with pytest.raises(MradError, match="unknown categories"):
        synth.write_dataset(tmp_path, aux=("marble",))


def test_export_help_and_error_without_torch(synth_data, tmp_path):
    helped = without_torch("mrad.export.cli:main", "--help")
    assert helped.returncode == 0 and "--variant" in helped.stdout, helped.stderr
    failed = without_torch("mrad.export.cli:main", "--model", "tiny", "--pretrained", "none",
                           "--aux-data", synth_data[0], "--out", tmp_path / "b")
    assert failed.returncode == cli.EXIT_BAD_ARGUMENTS
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: mrad-export needs ")
    assert lines[0].endswith("""part of the 'export' extra: pip install "mrad-edge[export]\"""")


def test_bench_without_torch_skips_the_comparison(tf_bundle, tmp_path):
    out = tmp_path / "bench.json"
    done = without_torch("mrad.tools.bench:main", "--bundle", tf_bundle, "--batch-sizes", "1", "--iterations", 1,
                         "--warmup", 0, "--frame-size", "64x48", "--providers", "cpu", "--json", out)
    assert done.returncode == 0, done.stderr
    assert "PyTorch comparison is skipped" in done.stdout
    report = json.loads(out.read_text())
    assert "pytorch" not in report and set(report["providers"]["cpu"]["1"]) >= {"encode", "total"}


LIBRARY_NOISE = r"""
import logging, sys, warnings
from mrad.runtime.commands.common import command

@command("noisy")
def main():
    logging.warning("a library's advice")  # as open_clip and ONNX Runtime's quantizer do, on the root logger
    warnings.warn("a library's deprecation")
    print("the command's own output")

main()
"""


def test_library_noise_stays_out_of_the_terminal_unless_verbose():
    quiet = subprocess.run([sys.executable, "-c", LIBRARY_NOISE], capture_output=True, text=True, timeout=60)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "the command's own output\n", "")
    verbose = subprocess.run([sys.executable, "-c", LIBRARY_NOISE, "--verbose"], capture_output=True, text=True,
                             timeout=60)
    assert "a library's advice" in verbose.stderr and "a library's deprecation" in verbose.stderr
