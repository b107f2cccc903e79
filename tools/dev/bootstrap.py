#!/usr/bin/env python3
"""Set up a virtual environment and run the demo or the test suite.

    python3 tools/dev/bootstrap.py demo    # export a tiny bundle from generated data and score with it
    python3 tools/dev/bootstrap.py test    # the whole test suite

Needs only Python 3.10+ and the package index. The environment lives in
.venv/ beside pyproject.toml and is reinstalled when pyproject.toml changes,
or when the system packages the line extra builds against appear (.ci/run
installs them where it may).
Standard library only: this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
STAMP = VENV / "mrad-installed.sha256"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def extras() -> str:
    """The extras to install: line (the protocols and PyGObject, for GenICam cameras) only where it can be built."""
    wanted = "export,sign,openvino,protocols,web,serve,test"
    needs = ["gobject-introspection-1.0", "cairo"]  # what PyGObject and pycairo build against
    if shutil.which("pkg-config") and subprocess.run(["pkg-config", "--exists", *needs]).returncode == 0:
        return wanted + ",line"
    print("without the line extra (GenICam cameras; its tests are skipped): it needs apt-get install "
          "gir1.2-aravis-0.8 libgirepository1.0-dev libcairo2-dev pkg-config", flush=True)
    return wanted


def ensure_environment() -> Path:
    chosen = extras()
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + chosen.encode()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == wanted and venv_python().is_file():
        return venv_python()
    if not venv_python().is_file() or subprocess.run([str(venv_python()), "-m", "pip", "--version"],
                                                     capture_output=True).returncode != 0:
        # a first set-up cut short can leave a venv without pip: made again from scratch
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.create(VENV, with_pip=True, clear=True)
    print(f"installing mrad-edge with its {chosen} extras (PyTorch is large: minutes on first run)", flush=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run(pip + ["-q", "--upgrade", "pip"], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[{chosen}]"], check=True)
    STAMP.write_text(wanted + "\n")
    return venv_python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__.strip())
        return 2
    python = str(ensure_environment())
    if argv[0] == "test":
        return subprocess.run([python, "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
    return subprocess.run([python, "-m", "mrad.tools.demo", *argv[1:]], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
