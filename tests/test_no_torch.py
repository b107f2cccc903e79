"""The runtime never imports torch: a full prediction with torch made unimportable."""

import json
import subprocess
import sys

SCRIPT = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "open_clip", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, Block())
from mrad.runtime import Detector

results = [Detector(sys.argv[1], provider="cpu", retrieval=mode).predict(sys.argv[2]) for mode in ("exact", "hnsw")]
print(json.dumps({"scores": [r.score for r in results], "shape": list(results[0].anomaly_map.shape),
                  "torch_loaded": any(m.split(".")[0] == "torch" for m in sys.modules)}))
"""


def test_prediction_without_torch(tf_bundle, target_images):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tf_bundle), str(target_images[0])],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["torch_loaded"]
    assert report["shape"] == [96, 112]
    assert all(0.0 <= s <= 1.0 for s in report["scores"])
