"""mrad-eval and mrad-bench run on a tiny bundle and print what they promise."""

import json

import numpy as np
from click.testing import CliRunner

from mrad.runtime import Detector
from mrad.runtime.formats.mvtec import scan
from mrad.tools import bench, evaluate
from mrad.tools.metrics import auroc


def test_eval_reports_every_metric(tf_bundle, synth_data, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(evaluate.main, ["--bundle", str(tf_bundle), "--data", str(synth_data[1]),
                                                "--provider", "cpu", "--retrieval", "both", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    mean = report["exact"]["mean"]
    assert set(mean) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro"}
    assert all(0.0 <= v <= 1.0 for v in mean.values())
    assert "hnsw_vs_exact" in report and "pixel aupro" in result.output

    weave = [s for s in scan([synth_data[1]]) if s.category == "weave"]
    scores = [r.score for r in Detector(tf_bundle, provider="cpu").predict_batch([s.image for s in weave])]
    labels = [s.anomalous for s in weave]
    assert report["exact"]["weave"]["image_auroc"] == auroc(labels, np.array(scores))


def test_bench_prints_stages_and_ratio(tf_bundle, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench.main, ["--bundle", str(tf_bundle), "--batch-sizes", "1,2", "--iterations", "2",
                                             "--warmup", "0", "--frame-size", "64x48", "--providers", "cpu",
                                             "--json", str(out)])
    assert result.exit_code == 0, result.output
    for expected in ("preprocess", "encode", "retrieve", "compare", "map_and_score", "p50 / p95", "ratio: mrad-edge (cpu)",
                     "GFLOP per image",
                     "hnsw moves scores", "peak memory", "GFLOP/s measured just before by a 2048x2048 fp32 matrix"):
        assert expected in result.output
    line = next(line for line in result.output.splitlines() if "GFLOP/s achieved" in line)
    achieved = float(line.split(" GFLOP/s achieved")[0].split(", ")[-1])
    share, reference = float(line.split("batch 1, ")[1].split("%")[0]), float(line.split("% of the ")[1].split(" ")[0])
    assert reference > 0 and abs(share - 100 * achieved / reference) <= 1, line  # against the reference measured here
    report = json.loads(out.read_text())
    assert report["pytorch"]["score_max_abs_diff"] < 1e-4  # the PyTorch rendering scores what the runtime scores
    assert set(report["providers"]["cpu"]) == {"load_ms", "1", "2"}


def test_eval_compares_zero_shot_with_enrolled(tf_bundle, synth_data, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(evaluate.main, ["--bundle", str(tf_bundle), "--data", str(synth_data[1]), "--provider",
                                                "cpu", "--enroll-normal", "2", "--enroll-defects", "1", "--json",
                                                str(out), "--enrollment", str(tmp_path / "unused")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) >= {"zero-shot", "enrolled"} and "zero-shot -> enrolled" in result.output
    test_images = [s for s in scan([synth_data[1]]) if s.category == "weave"]
    assert report["enrolled"]["weave"]["images"] == len(test_images) - 1, "the enrolled defect is held out"
    assert report["zero-shot"]["weave"]["images"] == report["enrolled"]["weave"]["images"]
    assert report["zero-shot"]["mean"] != report["enrolled"]["mean"]
    assert not (tmp_path / "unused").exists(), "evaluation enrolls in memory only"
    too_many = CliRunner().invoke(evaluate.main, ["--bundle", str(tf_bundle), "--data", str(synth_data[1]),
                                                  "--enroll-normal", "3"])
    assert too_many.exit_code == 2 and "has 2 train/good images" in too_many.stderr


def test_bench_against_another_bundle(tf_bundle):
    result = CliRunner().invoke(bench.main, ["--bundle", str(tf_bundle), "--batch-sizes", "1", "--iterations", "2",
                                             "--warmup", "0", "--frame-size", "64x48", "--providers", "cpu",
                                             "--no-torch", "--against", str(tf_bundle)])
    assert result.exit_code == 0, result.output
    assert "encode at batch 1, interleaved" in result.output and "scores differ by up to 0 on" in result.output


def test_bench_times_the_compare_stage_with_enrolled_frames(tf_bundle, tmp_path):
    result = CliRunner().invoke(bench.main, ["--bundle", str(tf_bundle), "--batch-sizes", "1", "--iterations", "2",
                                             "--warmup", "0", "--frame-size", "64x48", "--providers", "cpu",
                                             "--no-torch", "--enroll-shots", "2"])
    assert result.exit_code == 0, result.output
    assert "enrolled 2 synthetic normal frames" in result.output and "128 entries per scale" in result.output
    assert "searched exactly" in result.output


def test_encoder_flop_count_by_hand():
    """ViT-L-14-336 @ 518: 24 blocks of width 1024 over 1,370 tokens, about 1.26 TFLOP (the issue's own estimate)."""
    n, w, blocks = 37 * 37 + 1, 1024, 24
    by_hand = 2 * (blocks * 13 * n * w * w + (2 * blocks + 2 * (blocks - 1)) * n * n * w) / 1e9
    assert bench.encoder_gflop({"width": 1024, "layers": 24, "patch_size": 14}, 518) == by_hand
    assert 1250 < by_hand < 1265
    assert bench.encoder_gflop({"name": "no dimensions"}, 518) is None


def test_bench_station_prints_memory_and_changeover(tf_bundle):
    from click.testing import CliRunner

    from mrad.tools import bench_station

    result = CliRunner().invoke(bench_station.main, ["--bundle", str(tf_bundle), "--recipes", "3", "--frames", "24",
                                                     "--every", "3"])
    assert result.exit_code == 0, result.output
    assert "1 recipe(s): 1 encoder session(s), resident" in result.output
    assert "3 recipe(s): 1 encoder session(s), resident" in result.output
    assert "3 recipes / 1 recipe resident memory:" in result.output and "changeover: activate()" in result.output


def test_bench_says_hnsw_is_not_measured_without_hnswlib(tf_bundle, monkeypatch):
    monkeypatch.setattr(bench, "hnswlib_installed", lambda: False)
    result = CliRunner().invoke(bench.main, ["--bundle", str(tf_bundle), "--batch-sizes", "1", "--iterations", "2",
                                             "--warmup", "0", "--frame-size", "64x48", "--providers", "cpu",
                                             "--no-torch"])
    assert result.exit_code == 0, result.output
    assert "hnsw not measured (hnswlib is not installed" in result.output and "hnsw moves scores" not in result.output
