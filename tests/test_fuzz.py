"""The fuzz harness finds what it claims to find, a small run of it passes, and the inputs it found stay fixed."""

import random
import subprocess
import sys

import numpy as np
import pytest

from mrad.runtime import BundleError, Detector, ImageError
from mrad.runtime.core.preprocess import load_rgb
from mrad.tools import fuzz

TOY_WORKER = r"""
import json, sys
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    case = json.loads(line)
    if case["do"] == "hang":
        while True:
            pass
    if case["do"] == "crash":
        import os
        os._exit(3)
    if case["do"] == "allocate":
        import resource
        limit = int(sys.argv[1]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            block = bytearray(4 * limit)
        except MemoryError:
            print(json.dumps({"outcome": "memory"}), flush=True)
            continue
    print(json.dumps({"outcome": "accepted", "score": 0.5, "map": [1, 1], "map_finite": True}), flush=True)
"""


def test_the_worker_reports_hangs_crashes_and_memory(tmp_path):
    worker = fuzz.Worker(512, tmp_path / "sentinel", script=TOY_WORKER)
    try:
        assert worker.run({"do": "hang"}, time_limit=2)["outcome"] == "hang"
        assert worker.run({"do": "crash"}, time_limit=10)["outcome"] == "crash"
        assert worker.run({"do": "allocate"}, time_limit=10)["outcome"] == "memory"
        assert worker.run({"do": "nothing"}, time_limit=10)["outcome"] == "accepted", "a new worker took over"
    finally:
        worker.stop()


@pytest.mark.parametrize("answer,stale,expected", [
    ({"outcome": "accepted", "score": float("nan"), "map": [64, 80], "map_finite": True}, False, "bad result"),
    ({"outcome": "accepted", "score": 0.4, "map": [64, 80], "map_finite": True}, True, "tampered accepted"),
    ({"outcome": "accepted", "score": 0.4, "map": [64, 81], "map_finite": True}, False, "bad result"),
    ({"outcome": "clear error", "outside_read": True}, False, "outside read"),
    ({"outcome": "accepted", "score": 0.4, "map": [64, 80], "map_finite": True}, False, "accepted"),
])
def test_verdicts(answer, stale, expected):
    assert fuzz.verdict(answer, stale, (80, 64)) == expected


def test_a_small_fuzz_run_passes(tf_bundle, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mrad.tools.fuzz", "--bundle", str(tf_bundle), "--images", "150",
                           "--bundles", "60", "--settings", "60", "--seed", "7", "--failures", str(tmp_path / "failures")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "150 image cases, 60 bundle cases, 60 settings cases" in done.stdout and "failures: 0" in done.stdout


def test_found_broken_png_chunk_is_an_image_error(tmp_path):
    """Fuzz case 0-image-47: bytes inserted into a multi-chunk PNG; Pillow raised SyntaxError through load_rgb."""
    data, suffix, what = fuzz.image_bytes(random.Random("0-image-47"))
    assert what == "LA 450x422 PNG, insert"
    import io

    from PIL import Image

    (tmp_path / "found.png").write_bytes(data)
    with pytest.raises(ImageError, match="SyntaxError"):
        load_rgb(tmp_path / "found.png")
    with pytest.raises(ImageError, match="SyntaxError"):
        load_rgb(Image.open(io.BytesIO(data)))


def test_found_huge_keys_are_refused(bundle_copy_for_fuzz):
    """Fuzz case: memory keys of 3.4e38 with their checksum updated gave NaN scores; now the load refuses them."""
    from mrad.runtime.files import sha256_of

    bundle = bundle_copy_for_fuzz
    keys = bundle / "memory_image_keys.npy"
    np.save(keys, np.full(np.load(keys).shape, 3.4e38, np.float32))
    manifest = (bundle / "manifest.json").read_text()
    import json

    raw = json.loads(manifest)
    raw["files"]["memory_image_keys.npy"] = sha256_of(keys)
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="must be unit vectors"):
        Detector(bundle, provider="cpu")


def test_non_finite_scores_are_never_returned(tf_bundle, target_images, monkeypatch):
    detector = Detector(tf_bundle, provider="cpu")
    monkeypatch.setattr(detector.pixel_memory, "anomalous_probability",
                        lambda queries, mode, top_k: np.full(len(queries), np.nan, np.float32))
    with pytest.raises(BundleError, match="gave non-finite scores"):
        detector.predict(target_images[0])


@pytest.fixture
def bundle_copy_for_fuzz(tf_bundle, tmp_path):
    import shutil

    return shutil.copytree(tf_bundle, tmp_path / "bundle")


def test_found_tiff_with_a_forged_height_is_refused(tmp_path):
    """Fuzz case 11-image-3853: a flipped byte made a 1 x 629 TIFF claim 1 x 8,389,237 pixels; the display map's
    resize matrix then asked for 14 GiB. Such sides are now refused, and no resize matrix is dense any more."""
    data, suffix, what = fuzz.image_bytes(random.Random("11-image-3853"))
    assert what == "CMYK 1x629 TIFF, flip"
    (tmp_path / "found.tiff").write_bytes(data)
    with pytest.raises(ImageError, match="sides above 65,535 pixels are refused"):
        load_rgb(tmp_path / "found.tiff")


def test_tall_maps_need_no_dense_resize_matrix():
    from mrad.runtime.core.maps import bilinear_matrix, bilinear_rows

    operator = np.random.default_rng(0).standard_normal((112, 8))
    np.testing.assert_allclose(bilinear_rows(3001, operator), bilinear_matrix(3001, 112) @ operator, atol=1e-12)


def test_hostile_station_files_give_one_line_errors_or_a_valid_station(tf_bundle):
    """A station file is a surface users (and scripts) write: every mutation of a valid one is either still valid
    or refused with one MradError line, never another exception; a refused one names where it went wrong."""
    from mrad.runtime import MradError
    from mrad.runtime.formats.station import parse_station

    rng = random.Random(0)
    parse_station(fuzz.station_sample(tf_bundle))
    outcomes = {"valid": 0, "refused": 0}
    for _ in range(400):
        sample = fuzz.station_sample(tf_bundle)
        for _ in range(rng.randint(1, 3)):
            sample, what = fuzz.mutate_station(sample, rng)
        try:
            parse_station(sample)
            outcomes["valid"] += 1
        except MradError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 600, (what, str(exc))
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200 and outcomes["valid"] > 10, outcomes
