"""The soak harness drives the real engine, accounts for every frame, and fails on a crash or memory growth."""

import json

from click.testing import CliRunner

from mrad.runtime.core.detector import Detector
from mrad.tools import soak

# 300 frames are too few for a steady RSS in a pytest process: a loose bound here, the default (5 %) is tested below.
LOOSE_RSS_GROWTH = "0.5"


def run_soak(bundle, *args):
    result = CliRunner().invoke(soak.main, ["--bundle", str(bundle), *map(str, args)])
    counts = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    return result, counts


def test_every_frame_is_accounted_for(tf_bundle, tmp_path):
    out = tmp_path / "soak.jsonl"
    result, counts = run_soak(tf_bundle, "--frames", 300, "--corrupt", 0.1, "--drop-every", 50, "--batch", 2,
                              "--size", "64x48", "--out", out, "--max-rss-growth", LOOSE_RSS_GROWTH)
    assert result.exit_code == 0, result.output
    number = {name: int(value) for name, value in counts.items() if value.isdigit()}
    assert number["frames offered"] == 300 and number["corrupt frames injected"] == 30
    assert number["scores"] + number["errors"] == number["frames offered"]
    assert number["errors"] == 30, "every corrupt frame is refused by the decoder, no good one is"
    assert number["camera drops simulated"] == 5 and number["events"] == 2 * 5 + 1
    assert number["records written"] == number["lines in out file"] == 300 + 11
    assert number["frames unaccounted for"] == 0 and number["crashes"] == 0
    assert result.stdout.splitlines()[-1] == "soak passed"

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["event"] for r in records if "event" in r] == ["camera_lost", "camera_reopened"] * 5 + ["summary"]
    assert sorted(r["frame"] for r in records if "event" not in r) == list(range(300))


def test_a_crash_is_counted_and_fails_the_soak(tf_bundle, monkeypatch):
    real = Detector.predict_batch
    calls = []

    def fails_on_the_third_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder fell over")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Detector, "predict_batch", fails_on_the_third_call)
    result, counts = run_soak(tf_bundle, "--frames", 20, "--corrupt", 0, "--size", "32x32",
                              "--max-rss-growth", LOOSE_RSS_GROWTH)
    assert result.exit_code == 1
    assert counts["crashes"] == "1" and int(counts["frames unaccounted for"]) > 0
    assert "RuntimeError: encoder fell over" in result.stderr
    assert "FAILED: an exception escaped the engine" in result.stdout and "soak failed" in result.stdout


def test_rss_growth_over_five_percent_fails_by_default(tf_bundle, monkeypatch):
    readings = iter([100.0, 100.0, 100.0, 106.0])  # start, 10 % (before and at), end
    monkeypatch.setattr(soak, "rss_mb", lambda: next(readings))
    result, counts = run_soak(tf_bundle, "--frames", 20, "--size", "32x32")
    assert result.exit_code == 1, result.output
    assert counts["rss growth after warm-up"] == "+6.00%" and counts["frames unaccounted for"] == "0"
    assert "FAILED: RSS grew 6.00% after warm-up, more than 5.00%" in result.stdout


def test_soak_reading_ahead_and_dropping(tf_bundle, tmp_path):
    """The pipelined engine under the soak: every frame scored, refused or dropped, exactly once."""
    result, counts = run_soak(tf_bundle, "--frames", 200, "--corrupt", 0.1, "--drop-every", 50, "--size", "64x48",
                              "--when-behind", "drop-oldest", "--max-rss-growth", LOOSE_RSS_GROWTH)
    assert result.exit_code == 0, result.output
    number = {name: int(value) for name, value in counts.items() if value.isdigit()}
    assert number["scores"] + number["errors"] + number["dropped"] == 200 and number["frames unaccounted for"] == 0
