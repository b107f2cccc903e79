"""The runtime never imports torch, and needs hnswlib only for hnsw retrieval: both shown with the modules made unimportable."""

import json
import subprocess
import sys
from pathlib import Path

BLOCK = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)", name=name)

sys.meta_path.insert(0, Block())
"""

PREDICT = r"""
import json
from mrad.runtime import Detector, MradError

outcomes = {}
for mode in ("exact", "hnsw"):
    try:
        result = Detector(sys.argv[1], provider="cpu", retrieval=mode).predict(sys.argv[2])
        outcomes[mode] = {"score": result.score, "shape": list(result.anomaly_map.shape)}
    except MradError as exc:
        outcomes[mode] = {"error": str(exc)}
outcomes["loaded"] = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps(outcomes))
"""


def run_blocked(blocked, *args):
    script = f"BLOCKED = {set(blocked)!r}\n" + BLOCK + PREDICT
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_prediction_without_torch(tf_bundle, target_images):
    report = run_blocked({"torch", "open_clip", "torchvision"}, tf_bundle, target_images[0])
    assert report["loaded"] == []
    for mode in ("exact", "hnsw"):
        assert report[mode]["shape"] == [96, 112]
        assert 0.0 <= report[mode]["score"] <= 1.0


def test_exact_retrieval_without_hnswlib(tf_bundle, target_images):
    """The base install has no hnswlib (it needs a compiler): exact scores, hnsw says which extra to install."""
    report = run_blocked({"torch", "hnswlib"}, tf_bundle, target_images[0])
    assert report["loaded"] == []
    assert 0.0 <= report["exact"]["score"] <= 1.0
    assert "pip install 'mrad-edge[hnsw]'" in report["hnsw"]["error"]


def test_format1_bundle_without_hnswlib_says_why():
    bundle = Path(__file__).parent / "fixtures" / "format1-bundle"
    report = run_blocked({"torch", "hnswlib"}, bundle / "bundle", bundle / "images" / "1_checker_good.png")
    assert "mrad-edge[hnsw]" in report["exact"]["error"]  # format 1 keeps its keys only in the index


ENROLL = r"""
import json
from mrad.runtime import Detector

detector = Detector(sys.argv[1], provider="cpu", enrollment=sys.argv[2])
before = detector.predict(sys.argv[3]).score
detector.line_memory.enroll(sys.argv[4:], "normal")
after = Detector(sys.argv[1], provider="cpu", enrollment=sys.argv[2]).predict(sys.argv[3]).score
print(json.dumps({"before": before, "after": after, "loaded": sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)}))
"""


def test_enrollment_without_torch_or_hnswlib(tf_bundle, target_images, synth_data, tmp_path):
    """The line PC has the runtime install only: enrolling and scoring with the enrollment need neither."""
    normals = sorted(synth_data[1].glob("*/train/good/*.png"))
    script = "BLOCKED = {'torch', 'open_clip', 'torchvision', 'hnswlib'}\n" + BLOCK + ENROLL
    done = subprocess.run([sys.executable, "-c", script, str(tf_bundle), str(tmp_path / "enrollment"),
                           str(target_images[0]), *map(str, normals)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["after"] != report["before"]
