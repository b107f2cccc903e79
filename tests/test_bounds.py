"""Every input has a type, a range and a size: numbers finite, URLs and topics checked before the first
frame, files read only if regular and small, redirects not followed, secrets never shown, masks the size of
their image, parts per frame capped, a failing segmenter failing one frame."""

from __future__ import annotations

import http.server
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mrad.runtime import MradError
from mrad.runtime.commands import run as run_cli
from mrad.runtime.core.overlay import colorize, overlay
from mrad.runtime.files import DOCUMENT_BYTES, read_small_text
from mrad.runtime.formats.station import read_station
from mrad.runtime.line.control import RecipeFile
from mrad.runtime.line.policy import DecisionPolicy
from mrad.runtime.line.settings import exposure_warnings, line_settings, shown_url
from mrad.runtime.line.webhook import WebhookSink
from mrad.runtime import defaults
from mrad.runtime.memories.objects import AutoSegmenter, Background, ObjectSettings, OnnxSegmenter


def run(*args):
    return CliRunner().invoke(run_cli.main, [str(a) for a in args])


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, 1.5])
def test_a_threshold_is_a_finite_score(value):
    with pytest.raises(MradError, match="a threshold is a score between 0 and 1"):
        DecisionPolicy(value, "--threshold")


def test_threshold_nan_on_the_command_line_is_one_error_line(tf_bundle, target_images):
    result = run("--bundle", tf_bundle, "--input", target_images[0], "--threshold", "nan")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "between 0 and 1" in result.stderr


def test_threshold_nan_in_a_station_file_is_refused(tf_bundle, tmp_path):
    station = tmp_path / "station.toml"
    station.write_text(f'[[recipes]]\nname = "a"\nbundle = "{tf_bundle}"\nthreshold = nan\n')
    with pytest.raises(MradError):
        read_station(station)


@pytest.mark.parametrize("options, fragment", [
    ({"flush_timeout": math.inf}, "--flush-timeout: expected a number from 0 to 3600"),
    ({"flush_timeout": math.nan}, "--flush-timeout: expected a number"),
    ({"webhook": ("http://mes.plant/api\r\nX-Injected: 1",)}, "printable characters, without spaces"),
    ({"webhook": ("http://mes.plant:0/api",)}, "port 0"),
    ({"mqtt": ("mqtt://broker/line/#",)}, "without the wildcards"),
    ({"mqtt": ("mqtt://broker/$SYS/x",)}, "$ topic"),
    ({"webhook": tuple(f"http://h{i}/" for i in range(17))}, "at most 16"),
    ({"station": "x" * 65}, "--station"),
])
def test_settings_out_of_range_are_refused_before_the_first_frame(options, fragment):
    with pytest.raises(MradError, match=None) as refused:
        line_settings(**options)
    assert fragment in str(refused.value)


def test_secrets_of_a_url_are_never_shown():
    assert shown_url("https://user:s3cret@mes.plant:8443/api/defects?token=abc&x=1") == \
        "https://mes.plant:8443/api/defects?token=***&x=***"
    sink = WebhookSink("http://user:s3cret@127.0.0.1:9/hook?key=s3cret", retries=0)
    try:
        assert "s3cret" not in sink.name
    finally:
        sink.close(0)


def test_opcua_beyond_loopback_is_said():
    assert exposure_warnings(line_settings(opcua="opc.tcp://127.0.0.1:4840/mrad")) == []
    (said,) = exposure_warnings(line_settings(opcua="opc.tcp://0.0.0.0:4840/mrad"))
    assert "every interface" in said and "without security" in said


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are a POSIX feature")
def test_a_fifo_or_a_device_is_refused_at_once_never_waited_on(tmp_path):
    fifo = tmp_path / "line.toml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(MradError, match="not a regular file"):
        line_settings(config=fifo)
    with pytest.raises(MradError, match="not a regular file"):
        line_settings(config=Path("/dev/zero"))
    assert time.monotonic() - started < 5
    events = []
    RecipeFile(fifo, station=None, events=events.append).close()  # read at start: refused, the watcher not stuck
    assert [e["event"] for e in events] == ["recipe_refused"]


@pytest.mark.parametrize("content, fragment", [
    ("station = 'cam1'\n".encode("utf-16"), "not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
    (b"x = " + b"[" * 100_000 + b"]" * 100_000, "too deeply"),
    (b"x" * DOCUMENT_BYTES + b"x", "at most"),
])
def test_a_settings_file_that_is_no_text_or_too_big_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "line.toml"
    path.write_bytes(content)
    with pytest.raises(MradError) as refused:
        line_settings(config=path)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_read_small_text_reads_a_small_regular_file(tmp_path):
    (tmp_path / "a.toml").write_text("station = 'cam1'\n")
    assert read_small_text(tmp_path / "a.toml", "settings file") == "station = 'cam1'\n"


class _Redirecting(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_POST(self):  # noqa: N802 - the standard library's name
        type(self).hits.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/hook"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/internal")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_webhook_redirect_is_refused_not_followed():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sink = WebhookSink(f"http://127.0.0.1:{server.server_port}/hook", on="all", retries=2, backoff_s=0.01)
        sink.write({"source": "a.png", "frame": 0, "score": 0.9, "decision": "anomalous"})
        counts = sink.close(10)
    finally:
        server.shutdown()
        server.server_close()
    assert _Redirecting.hits == ["/hook"]  # tried once (a 3xx is a refusal), and /internal never reached
    assert counts["failed"] == 1 and counts["delivered"] == 0


def test_overlay_in_strips_is_the_whole_frame_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1000, 700, 3), dtype=np.uint8)
    anomaly_map = rng.random((1000, 700), dtype=np.float32)
    scaled = (anomaly_map - anomaly_map.min()) / (anomaly_map.max() - anomaly_map.min())
    whole = (image.astype(np.float32) * 0.5 + colorize(scaled).astype(np.float32) * 0.5).astype(np.uint8)
    np.testing.assert_array_equal(overlay(image, anomaly_map), whole)  # bit for bit: tolerance 0


def test_a_defect_mask_of_another_size_is_refused(tf_bundle, target_images, tmp_path):
    from mrad.runtime import Detector, ImageError

    mask = tmp_path / "mask.png"
    Image.new("L", (10, 10), 255).save(mask)
    detector = Detector(tf_bundle, provider="cpu", enrollment=tmp_path / "enrollment")
    with pytest.raises(ImageError, match="a mask must be the size of its image"):
        detector.line_memory.enroll([target_images[0]], label="defect", masks=[mask])


def test_a_cluttered_frame_is_cut_at_the_cap_and_its_count_decides_it():
    frame = np.zeros((400, 400, 3), np.uint8)
    for y in range(8, 400, 20):  # 400 separate dots
        for x in range(8, 400, 20):
            frame[y : y + 6, x : x + 6] = 255
    segmenter = AutoSegmenter(ObjectSettings(min_area=0.0001, morphology=0.005), Background((0, 0, 0), 1.0))
    started = time.perf_counter()
    parts = segmenter.segment(frame)
    assert len(parts) == defaults.OBJECT_MAX_PARTS + 1  # stopped past the cap, not 400
    assert time.perf_counter() - started < 5


def test_a_segmenter_that_fails_or_answers_out_of_contract_fails_that_frame_in_one_line(tmp_path):
    segmenter = OnnxSegmenter.__new__(OnnxSegmenter)
    segmenter.path, segmenter.side, segmenter.settings = tmp_path / "sam.onnx", 64, ObjectSettings(points_per_side=2)
    segmenter.prompts_per_call = None

    class Failing:
        def run(self, names, feeds):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a node failed")

    class Wrong:
        def run(self, names, feeds):
            return [np.zeros((1, 1, 64, 64), np.float32), np.full((1, 1), np.nan, np.float32)]

    frame = np.zeros((48, 64, 3), np.uint8)
    for session, fragment in ((Failing(), "failed on this frame"), (Wrong(), "the contract is")):
        segmenter.session = session
        with pytest.raises(MradError, match=fragment):
            segmenter.segment(frame)



def test_a_calibration_goes_into_a_folder_made_for_it_or_says_why_not(tf_bundle, target_images, tmp_path):
    from mrad.runtime.commands import calibrate as calibrate_cli

    good = [str(p) for p in target_images if p.parent.name == "good"][:3]
    args = ["--bundle", str(tf_bundle), "--provider", "cpu", *sum((["--normal", p] for p in good), [])]
    made = CliRunner().invoke(calibrate_cli.main, args + ["--out", str(tmp_path / "new" / "sub" / "c.json")])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "new" / "sub" / "c.json").is_file()
    (tmp_path / "file").write_text("a file where a folder should be")
    refused = CliRunner().invoke(calibrate_cli.main, args + ["--out", str(tmp_path / "file" / "c.json")])
    assert refused.exit_code == 2 and refused.output.strip().splitlines()[-1].startswith("error: calibration ")


def test_a_full_disk_while_enrolling_is_one_line_and_the_version_before_stays(tf_bundle, target_images, tmp_path,
                                                                               monkeypatch):
    from mrad.runtime import Detector
    from mrad.runtime.memories import enrollment

    detector = Detector(tf_bundle, provider="cpu", enrollment=tmp_path / "enrollment")
    first = detector.line_memory.enroll(target_images[:1], label="normal")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(enrollment, "save_array", full)
    with pytest.raises(MradError, match="cannot be written .No space left on device.; the version before stays"):
        detector.line_memory.enroll(target_images[1:2], label="normal")
    assert Detector(tf_bundle, provider="cpu", enrollment=tmp_path / "enrollment").enrollment_version == first.version
    assert not list((tmp_path / "enrollment").glob(".v*.partial-*"))


def test_eval_with_masks_that_mark_nothing_skips_pixel_metrics(tf_bundle, synth_data, tmp_path):
    import shutil

    from mrad.tools import evaluate

    data = shutil.copytree(synth_data[1], tmp_path / "target")
    for mask in data.glob("*/ground_truth/*/*.png"):
        with Image.open(mask) as opened:
            Image.new("L", opened.size).save(mask)
    result = CliRunner().invoke(evaluate.main, ["--bundle", str(tf_bundle), "--data", str(data), "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mark no defective pixel" in result.output and "image auroc" in result.output
