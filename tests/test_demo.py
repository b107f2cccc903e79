"""The README's main command runs end to end on built-in defaults, and ends saying what to do next."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mrad.tools import demo


def test_demo_exports_scores_and_says_what_to_try_next(tmp_path):
    result = CliRunner().invoke(demo.main, ["--out", str(tmp_path), "--image-size", "112"])
    assert result.exit_code == 0, result.output
    assert "image AUROC on the 24 target images" in result.output
    assert (tmp_path / "bundle-tiny-tf" / "manifest.json").is_file()

    after = result.output.split("Try next")[1].splitlines()
    commands = [shlex.split(line) for line in after if line.strip().startswith(("mrad-", "source "))]
    assert [c[0] for c in commands] == ["source", "mrad-run", "mrad-enroll", "mrad-run"]
    assert Path(commands[0][1]).is_file()  # the environment to enter exists, where it is said to be
    for command in commands[1:]:  # every path a command names exists
        for value in command[1:]:
            if value.startswith(str(tmp_path)):
                assert Path(value).exists(), value
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    for command in commands[1:3]:  # the last one serves the page until Ctrl-C
        ran = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": path})
        assert ran.returncode == 0, (command, ran.stderr)
    assert "measured on 6 enrolled good parts" in ran.stdout + ran.stderr  # enough to measure a threshold
