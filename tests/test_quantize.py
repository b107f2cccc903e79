"""mrad-quantize: int8 and fp16 bundles that load torch-free, state their precision, and whose fidelity figures hold."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mrad.runtime import Detector
from mrad.runtime.core.bundle import read_manifest
from mrad.export import precision
from mrad.tools import quantize

FIDELITY_TOLERANCE = 1e-6  # the recorded figures are recomputed from the same graphs and images


def derived_bundle(kind, tf_bundle, target_images, folder):
    out = folder / "bundle"
    calibration = [str(p) for p in target_images[:8]]
    args = ["--bundle", str(tf_bundle), "--out", str(out), "--images", "8", "--precision", kind]
    for path in calibration:
        args += ["--calibration", path]
    result = CliRunner().invoke(quantize.main, args)
    assert result.exit_code == 0, result.output
    return out, calibration


@pytest.fixture(scope="module")
def int8_bundle(tf_bundle, target_images, tmp_path_factory):
    return derived_bundle("int8", tf_bundle, target_images, tmp_path_factory.mktemp("int8"))


@pytest.fixture(scope="module")
def fp16_bundle(tf_bundle, target_images, tmp_path_factory):
    return derived_bundle("fp16", tf_bundle, target_images, tmp_path_factory.mktemp("fp16"))


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_derived_bundle_states_its_precision_and_fidelity(kind, request, tf_bundle):
    out, calibration = request.getfixturevalue(f"{kind}_bundle")
    graph = read_manifest(out).graphs["encoder"]
    assert graph.precision == kind and graph.fidelity["reference"] == "fp32" and graph.fidelity["images"] == 8
    assert graph.fidelity["converted"] == {"int8": "MatMuls with a weight input",
                                           "fp16": "every float tensor inside the graph; float32 in and out"}[kind]
    recomputed = precision.fidelity(Detector(tf_bundle, provider="cpu"), Detector(out, provider="cpu"),
                                   [Path(p) for p in calibration])
    for key in ("max_abs_diff", "mean_abs_diff"):
        for name, value in graph.fidelity[key].items():
            assert recomputed[key][name] == pytest.approx(value, abs=FIDELITY_TOLERANCE)
    for key in ("score_spearman", "score_max_abs_diff", "map_max_abs_diff"):
        assert recomputed[key] == pytest.approx(graph.fidelity[key], abs=FIDELITY_TOLERANCE)
    assert graph.fidelity["score_max_abs_diff"] < 0.05, f"{kind} keeps the scores close on the tiny model"


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_derived_bundle_scores_without_torch(kind, request, target_images):
    out, _ = request.getfixturevalue(f"{kind}_bundle")
    script = ("import importlib.abc, json, sys\n"
              "class Block(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] in ('torch', 'open_clip', 'onnx'):\n"
              "            raise ModuleNotFoundError(name)\n"
              "sys.meta_path.insert(0, Block())\n"
              "from mrad.runtime import Detector\n"
              "print(json.dumps(Detector(sys.argv[1], provider='cpu').predict(sys.argv[2]).score))\n")
    done = subprocess.run([sys.executable, "-c", script, str(out), str(target_images[0])], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 0.0 <= json.loads(done.stdout) <= 1.0


def test_spearman_by_hand():
    spearman = precision.spearman

    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 30.0, 20.0])) == pytest.approx(0.5)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 2.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0]), np.array([2.0])) is None
