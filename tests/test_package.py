"""The installed package: what the wheel holds, and that the runtime imports from it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("mrad_edge-*.whl"))


def test_wheel_holds_the_three_packages_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    code = {n for n in names if not n.startswith("mrad_edge-")}
    assert {"mrad/runtime/core/detector.py", "mrad/runtime/line/station.py", "mrad/runtime/line/mqtt.py",
            "mrad/runtime/formats/schemas/station-v1.schema.json", "mrad/runtime/serve/app.py", "mrad/export/build.py",
            "mrad/tools/evaluate.py", "mrad/export/model_configs/tiny.json", "mrad/runtime/web/server.py",
            "mrad/runtime/web/static/index.html", "mrad/runtime/web/static/app.js",
            "mrad/runtime/web/static/style.css"} <= code  # the operator's page ships whole: no build step
    assert all(n.startswith(("mrad/runtime/", "mrad/export/", "mrad/tools/")) for n in code)
    assert not any("bootstrap" in n or "tests/" in n for n in names)  # set-up scripts and tests stay out
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    base = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(name in line for line in base for name in ("torch", "hnswlib", "open_clip", "paho", "asyncua", "ray",
                                                                   "aiohttp"))


def test_runtime_imports_from_the_wheel(wheel, tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-c", "import mrad.runtime; print(mrad.runtime.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(tmp_path)
