"""mrad-run and mrad-calibrate: every frame exactly once, as a result or an error record."""

import json
import time
import shutil
import signal
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mrad.runtime.line.sinks import Sink
from mrad.runtime import Detector
from mrad.runtime.commands import calibrate as calibrate_cli
from mrad.runtime.commands import common as cli
from mrad.runtime.commands import run as run_cli
from mrad.runtime.line import sources


def run(*args):
    return CliRunner().invoke(run_cli.main, [str(a) for a in args])


def split(output):
    records = [json.loads(line) for line in output.splitlines()]
    frames = [r for r in records if "event" not in r]
    events = [r for r in records if "event" in r]
    assert events[-1]["event"] == "summary"
    return frames, events


def write_video(path, images, fps=5):
    first = np.asarray(Image.open(images[0]).convert("RGB"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (first.shape[1], first.shape[0]))
    for image in images:
        writer.write(np.asarray(Image.open(image).convert("RGB"))[..., ::-1].copy())
    writer.release()
    return path


def test_folder_with_a_corrupt_image(tf_bundle, synth_data, tmp_path):
    folder = shutil.copytree(synth_data[1] / "checker" / "test", tmp_path / "parts")
    broken = folder / "good" / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    result = run("--bundle", tf_bundle, "--input", folder, "--provider", "cpu", "--save-maps", tmp_path / "maps")
    assert result.exit_code == 0, result.output
    frames, events = split(result.stdout)
    images = sorted(folder.rglob("*.png"))
    assert [r["source"] for r in frames] == [str(p) for p in images]
    assert [r["frame"] for r in frames] == list(range(len(images)))
    assert [r["source"] for r in frames if "error" in r] == [str(broken)]
    for record in frames:
        if "error" not in record:
            assert 0.0 <= record["score"] <= 1.0 and record["latency_ms"] > 0 and "decision" not in record
            assert Image.open(record["map"]).size == Image.open(record["source"]).size
    summary = events[-1]
    assert summary["frames"] == len(images) and summary["errors"] == 1
    assert summary["threshold"].startswith("none")
    assert f"{len(images)} frames, 1 errors" in result.stderr


def test_video_file(tf_bundle, target_images, tmp_path):
    video = write_video(tmp_path / "shift.avi", target_images[:7])
    result = run("--bundle", tf_bundle, "--input", video, "--provider", "cpu", "--batch", 3)
    assert result.exit_code == 0, result.output
    frames, _ = split(result.stdout)
    assert [r["frame"] for r in frames] == list(range(7))
    assert all(r["source"] == str(video) and "score" in r for r in frames)


class FakeCapture:
    """A camera that delivers frames, drops out, refuses one reopening, then comes back."""

    def __init__(self, script, frame):
        self.script, self.frame = script, frame
        self.opened = script["opens"].pop(0) if script["opens"] else False
        self.left = script["frames_per_session"] if self.opened else 0

    def isOpened(self):
        return self.opened

    def read(self):
        if self.left == 0:
            return False, None
        self.left -= 1
        return True, self.frame

    def release(self):
        pass


def fake_camera(monkeypatch, opens, frames_per_session=4):
    frame = np.full((48, 64, 3), 128, dtype=np.uint8)
    script = {"opens": list(opens), "frames_per_session": frames_per_session}
    monkeypatch.setattr(sources, "_open_capture", lambda spec: FakeCapture(script, frame))
    slept = []
    monkeypatch.setattr(sources, "_sleep", lambda seconds, stop=None: slept.append(seconds) or False)
    return slept


def test_camera_that_drops_out_and_comes_back(tf_bundle, monkeypatch):
    slept = fake_camera(monkeypatch, opens=[True, False, True, True])
    result = run("--bundle", tf_bundle, "--camera", "0", "--provider", "cpu", "--max-frames", 10)
    assert result.exit_code == 0, result.output
    frames, events = split(result.stdout)
    assert [r["frame"] for r in frames] == list(range(10))
    assert all("score" in r for r in frames)
    kinds = [e["event"] for e in events]
    assert kinds == ["camera_lost", "camera_reopened", "camera_lost", "camera_reopened", "summary"]
    assert slept == [0.5, 1.0, 0.5]  # backoff doubles while the camera stays away


@pytest.mark.parametrize("batch", [1, 3])
def test_camera_that_never_comes_back(tf_bundle, monkeypatch, batch):
    fake_camera(monkeypatch, opens=[True])
    result = run("--bundle", tf_bundle, "--camera", "0", "--provider", "cpu", "--reconnect-timeout", 5,
                 "--batch", batch)
    assert result.exit_code == cli.EXIT_INPUT_FAILED
    frames, events = split(result.stdout)
    assert [r["frame"] for r in frames] == [0, 1, 2, 3]  # what came before the loss is kept
    assert "lost and not back after 5.0 s" in result.stderr


def test_camera_that_never_opens(tf_bundle, monkeypatch):
    fake_camera(monkeypatch, opens=[False])
    result = run("--bundle", tf_bundle, "--camera", "rtsp://nowhere", "--provider", "cpu")
    assert result.exit_code == cli.EXIT_INPUT_FAILED
    assert result.stdout == ""  # no record, no summary: the run never started
    assert result.stderr == "error: camera 'rtsp://nowhere' could not be opened; check the index, URL or pipeline\n"


def test_a_camera_that_is_not_there_is_one_line_on_stderr_and_nothing_else(tf_bundle, tmp_path):
    """OpenCV's own warnings about the missing device stay out of the terminal unless --verbose."""
    command = [sys.executable, "-c", "from mrad.runtime.commands.run import main; main()", "--bundle", str(tf_bundle),
               "--camera", "99", "--out", str(tmp_path / "scores.jsonl")]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert quiet.returncode == cli.EXIT_INPUT_FAILED
    assert quiet.stderr == "error: camera '99' could not be opened; check the index, URL or pipeline\n"
    assert quiet.stdout == "" and not (tmp_path / "scores.jsonl").exists()  # refused before any output was made
    verbose = subprocess.run(command + ["--verbose"], capture_output=True, text=True, timeout=60)
    assert verbose.returncode == cli.EXIT_INPUT_FAILED
    assert verbose.stderr.endswith("error: camera '99' could not be opened; check the index, URL or pipeline\n")


def test_sigterm_stops_cleanly(tf_bundle, target_images, tmp_path):
    """SIGTERM ends a run with every line flushed (a long recording stands in for a camera)."""
    video = write_video(tmp_path / "long.avi", target_images[:3] * 200)
    process = subprocess.Popen(
        [sys.executable, "-c", "from mrad.runtime.commands.run import main; main()", "--bundle", str(tf_bundle),
         "--camera", str(video), "--provider", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [process.stdout.readline() for _ in range(4)]
    process.send_signal(signal.SIGTERM)
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    records = [json.loads(line) for line in lines + rest.splitlines() if line.strip()]
    assert records[-1]["event"] == "summary" and records[-1]["stopped_by"] == "SIGTERM"
    frames = [r["frame"] for r in records if "event" not in r]
    assert frames == list(range(len(frames))) and len(frames) >= 3
    assert records[-1]["frames"] == len(frames)


def test_a_recording_given_as_camera_ends_at_its_last_frame(tf_bundle, target_images, tmp_path):
    video = write_video(tmp_path / "short.avi", target_images[:3])
    result = run("--bundle", tf_bundle, "--camera", video, "--provider", "cpu")
    frames, events = split(result.stdout)
    assert result.exit_code == 0 and len(frames) == 3 and [e["event"] for e in events] == ["summary"]


def test_a_camera_started_mid_stream(target_images, tmp_path, monkeypatch):
    """frames(start), as a restarted mrad-serve reader asks: a recording skips to that frame, a live camera numbers
    its next frame so."""
    video = write_video(tmp_path / "short.avi", target_images[:5])
    everything = list(sources.Camera(str(video)).frames())
    resumed = list(sources.Camera(str(video)).frames(3))
    assert [f.index for f in resumed] == [3, 4]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(resumed, everything[3:]))
    fake_camera(monkeypatch, opens=[True])
    live = sources.Camera("0", reconnect_timeout=0).frames(7)
    assert [next(live).index for _ in range(2)] == [7, 8]


def test_a_stop_ends_the_wait_for_a_lost_camera():
    """The real waits, with a 600 s reconnect timeout: a stop must end them at once."""
    from mrad.runtime.line.engine import Stop

    script = {"opens": [True], "frames_per_session": 2}  # two frames, then the camera stays away
    stop = Stop()

    def on_event(record):
        if record["event"] == "camera_lost":
            stop.request("test")

    camera = sources.Camera("0", reconnect_timeout=600, events=on_event, stop=stop,
                            open_capture=lambda spec: FakeCapture(script, np.zeros((8, 8, 3), np.uint8)))
    started = time.monotonic()
    assert len(list(camera.frames())) == 2
    assert time.monotonic() - started < 5


def test_two_runs_on_one_out_are_refused(tf_bundle, target_images, tmp_path):
    from mrad.runtime.files import open_exclusive

    out = tmp_path / "line.jsonl"
    with open_exclusive(out) as first:
        first.write(b'{"frame": 0}\n')
        second = run("--bundle", tf_bundle, "--input", target_images[0], "--out", out)
        assert second.exit_code == cli.EXIT_BAD_ARGUMENTS and "being written by another process" in second.stderr
        assert out.read_bytes() == b'{"frame": 0}\n', "the refused run destroyed nothing"
    maps = tmp_path / "maps"
    from mrad.runtime.files import lock_folder

    with lock_folder(maps):
        busy = run("--bundle", tf_bundle, "--input", target_images[0], "--save-maps", maps)
        assert busy.exit_code == cli.EXIT_BAD_ARGUMENTS and "being written by another process" in busy.stderr


def test_outputs_that_cannot_be_written_are_counted_not_fatal(tf_bundle, target_images, tmp_path, monkeypatch):
    full = run("--bundle", tf_bundle, "--input", target_images[0], "--input", target_images[1], "--provider", "cpu",
               "--out", "/dev/full")  # every write: "No space left on device"
    assert full.exit_code == cli.EXIT_OUTPUT_FAILED, full.output
    assert "2 outputs could not be written (first: JsonLines: [Errno 28] No space left on device)" in full.stderr
    assert "Traceback" not in full.stderr

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mrad.runtime.line.engine.atomic_file", no_space)
    result = run("--bundle", tf_bundle, "--input", target_images[0], "--provider", "cpu", "--save-maps", tmp_path / "m")
    frames, events = split(result.stdout)
    assert result.exit_code == cli.EXIT_OUTPUT_FAILED
    assert "heatmap could not be written" in frames[0]["map_error"] and "score" in frames[0]
    assert events[-1]["output_errors"] == 1


def test_sigkill_mid_stream_leaves_complete_lines_and_images(tf_bundle, target_images, tmp_path):
    video = write_video(tmp_path / "long.avi", target_images[:3] * 100)
    out, maps = tmp_path / "line.jsonl", tmp_path / "maps"
    process = subprocess.Popen(
        [sys.executable, "-c", "from mrad.runtime.commands.run import main; main()", "--bundle", str(tf_bundle),
         "--input", str(video), "--provider", "cpu", "--out", str(out), "--save-maps", str(maps)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(3000):  # bounded: until some records are out, at most about 30 s
        if out.is_file() and out.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.01)
    process.kill()
    process.wait(timeout=30)
    process.stderr.close()
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the file ends with a complete line"
    records = [json.loads(line) for line in lines[:-1]]
    assert len(records) >= 20 and all("score" in r for r in records)
    pictures = sorted(maps.glob("*.png"))
    assert len(pictures) >= len(records)
    for picture in pictures:
        with Image.open(picture) as image:
            image.load()  # a truncated PNG raises here


def test_calibrate_then_decide(tf_bundle, synth_data, tmp_path):
    bundle = shutil.copytree(tf_bundle, tmp_path / "bundle")
    good = synth_data[1] / "weave" / "test" / "good"
    calibrate = CliRunner().invoke(calibrate_cli.main, ["--bundle", str(bundle), "--normal", str(good),
                                                        "--provider", "cpu", "--quantile", "1.0"])
    assert calibrate.exit_code == 0, calibrate.output
    stored = json.loads((tmp_path / "bundle.calibration.json").read_text())
    assert stored["threshold"] == pytest.approx(max(stored["scores"]))
    result = run("--bundle", bundle, "--input", good, "--provider", "cpu")
    frames, events = split(result.stdout)
    assert all(r["decision"] == "normal" for r in frames)  # the maximum of known-good flags none of them
    assert events[-1]["threshold"].endswith("bundle.calibration.json")
    forced = run("--bundle", bundle, "--input", good, "--provider", "cpu", "--threshold", 0)
    assert all(r["decision"] == "anomalous" for r in split(forced.stdout)[0])
    other_mode = run("--bundle", bundle, "--input", good, "--provider", "cpu", "--retrieval", "hnsw")
    assert other_mode.exit_code == cli.EXIT_BAD_ARGUMENTS
    assert "measured with retrieval 'exact'" in other_mode.stderr
    enrolled = Detector(bundle, provider="cpu")
    enrolled.line_memory.enroll(sorted((synth_data[1] / "weave" / "train" / "good").glob("*.png")), "normal")
    stale = run("--bundle", bundle, "--input", good, "--provider", "cpu")  # the enrollment changed: it still runs
    assert stale.exit_code == 0 and stale.stderr.count("threshold_stale") == 1  # said once
    stale_frames = split(stale.stdout)[0]
    assert stale_frames and all(r["threshold_stale"] and r["decision"] for r in stale_frames)
    assert all(r["scored_by"]["enrollment"] == 1 for r in stale_frames)
    again = CliRunner().invoke(calibrate_cli.main, ["--bundle", str(bundle), "--normal", str(good), "--provider", "cpu"])
    assert again.exit_code == 0 and "enrollment version 1" in again.stderr
    evidence = run("--bundle", bundle, "--input", good, "--provider", "cpu", "--evidence", "--max-frames", 1)
    record = split(evidence.stdout)[0][0]
    assert evidence.exit_code == 0 and record["evidence"]["enrolled"]["image"]["normal"]["source"].endswith(".png")
    assert {"image", "patch"} == set(record["evidence"]["zero_shot"])


def test_threads_give_the_serial_results(tf_bundle, target_images):
    detector = Detector(tf_bundle, provider="cpu")
    serial = [detector.predict(p).score for p in target_images]
    concurrent = [None] * len(target_images)

    def work(offset):
        for i in range(offset, len(target_images), 4):
            concurrent[i] = detector.predict(target_images[i]).score

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert concurrent == serial


def test_result_dict_and_overlay(tf_bundle, target_images):
    from mrad.runtime.core.overlay import overlay

    result = Detector(tf_bundle, provider="cpu").predict(target_images[0])
    as_dict = result.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    picture = overlay(target_images[0], result.anomaly_map)
    assert picture.shape == (96, 112, 3) and picture.dtype == np.uint8


def test_bad_bundle_exit_code(tmp_path):
    result = run("--bundle", tmp_path, "--input", tmp_path)
    assert result.exit_code == cli.EXIT_BAD_BUNDLE
    assert "error: not a bundle" in result.stderr


def test_bad_arguments_exit_code(tf_bundle, tmp_path):
    missing = run("--bundle", tf_bundle, "--input", tmp_path / "nope.png")
    assert missing.exit_code == cli.EXIT_BAD_ARGUMENTS and "does not exist" in missing.stderr
    none = run("--bundle", tf_bundle)
    assert none.exit_code == cli.EXIT_BAD_ARGUMENTS and "pass --input, --camera or --genicam" in none.stderr
    twice = run("--bundle", tf_bundle, "--camera", "rtsp://a", "--input", tmp_path, "--camera", "rtsp://a")
    assert twice.exit_code == cli.EXIT_BAD_ARGUMENTS and "rtsp://a given twice" in twice.stderr
    off = run("--bundle", tf_bundle, "--input", tmp_path, "--camera", "0", "--when-behind", "off")
    assert off.exit_code == cli.EXIT_BAD_ARGUMENTS and "--when-behind off reads one source only" in off.stderr
    lonely = run("--bundle", tf_bundle, "--camera", "0", "--concurrent")
    assert lonely.exit_code == cli.EXIT_BAD_ARGUMENTS and "--concurrent is for several --input" in lonely.stderr


@pytest.mark.parametrize("command", [run_cli.main, calibrate_cli.main])
def test_help_teaches_with_examples(command):
    text = CliRunner().invoke(command, ["--help"]).output
    assert "Examples:" in text and "--bundle" in text


def test_display_without_a_gui_is_a_clear_error(tf_bundle, target_images, monkeypatch):
    def no_gui(*args):
        raise cv2.error("The function is not implemented")

    monkeypatch.setattr(cv2, "namedWindow", no_gui)
    result = run("--bundle", tf_bundle, "--input", target_images[0], "--provider", "cpu", "--display")
    assert result.exit_code == cli.EXIT_BAD_ARGUMENTS
    assert "install opencv-python in place of opencv-python-headless" in result.stderr


class ListSink(Sink):
    needs_picture = True

    def __init__(self):
        self.records, self.pictures = [], []

    def write(self, record, picture=None):
        self.records.append(record)
        self.pictures.append(picture)


def test_line_engine_without_a_command_line(tf_bundle, target_images):
    """The engine mrad-run drives, driven directly: one record per frame, pictures for sinks that want them."""
    from mrad.runtime.line.engine import LineEngine, Stop

    detector = Detector(tf_bundle, provider="cpu")
    sink = ListSink()
    engine = LineEngine(detector, [sink], threshold=0.0, batch=2)
    summary = engine.run(sources.file_frames([str(p) for p in target_images[:5]]))
    frames = [r for r in sink.records if "event" not in r]
    assert [r["frame"] for r in frames] == list(range(5)) and all(r["decision"] == "anomalous" for r in frames)
    assert [p.shape for p in sink.pictures[:5]] == [(96, 112, 3)] * 5 and sink.pictures[5] is None
    assert sink.records[-1]["event"] == "summary" and summary["frames"] == 5 and summary["threshold"] == "--threshold"

    stop = Stop()
    stop.request("operator")
    stopped = LineEngine(detector, [ListSink()], stop=stop).run(sources.file_frames([str(target_images[0])]))
    assert stopped["frames"] == 0 and stopped["stopped_by"] == "operator"


def test_a_malformed_frame_in_a_batch_fails_alone(tf_bundle, target_images):
    """A camera SDK's bad buffer reaches the engine: that frame gets an error record, its batch-mates their scores."""
    from mrad.runtime.line.engine import LineEngine
    from mrad.runtime.line.sources import Frame

    good = [np.asarray(Image.open(p).convert("RGB")) for p in target_images[:3]]
    frames = [Frame("sdk", 0, "t", image=good[0]), Frame("sdk", 1, "t", image=np.zeros((4, 4), np.float32)),
              Frame("sdk", 2, "t", image=good[1]), Frame("sdk", 3, "t", image=good[2])]
    sink = ListSink()
    summary = LineEngine(Detector(tf_bundle, provider="cpu"), [sink], batch=4).run(iter(frames))
    records = [r for r in sink.records if "event" not in r]
    assert [("score" in r, "error" in r) for r in records] == [(True, False), (False, True), (True, False),
                                                                (True, False)]
    assert "HxWx3 uint8" in records[1]["error"] and summary["errors"] == 1


@pytest.mark.parametrize("damage,message", [
    ('"threshold": NaN', "NaN is not a threshold"),
    ('"threshold": null', "threshold: null is not a finite number"),
    ('"threshold": "0.5"', "threshold: '0.5' is not a finite number"),
    ('"quantile": 7', "quantile: 7 is not in [0, 1]"),
    ('"enrollment": true', "enrollment: true is not a version number"),
    ('"format_version": 9', "format_version: 9 is not supported"),
])
def test_a_damaged_calibration_is_refused(tf_bundle, target_images, tmp_path, damage, message):
    from mrad.runtime.formats import calibration

    path = tmp_path / "cal.json"
    calibration.save(calibration.calibrate([0.1, 0.2], 0.99, "exact", tf_bundle), path)
    text = path.read_text()
    key = damage.split(":")[0]
    start = text.index(key)
    end = text.index("\n", start)
    path.write_text(text[:start] + damage + ("," if text[end - 1] == "," else "") + text[end:])
    result = run("--bundle", tf_bundle, "--input", target_images[0], "--calibration", path)
    assert result.exit_code == cli.EXIT_BAD_ARGUMENTS and message in result.stderr, result.stderr


def test_max_pixels_refuses_large_frames_as_error_records(tf_bundle, target_images):
    result = run("--bundle", tf_bundle, "--input", target_images[0], "--provider", "cpu", "--max-pixels", 100)
    frames, _ = split(result.stdout)
    assert result.exit_code == 0 and "more than the limit of 100" in frames[0]["error"]


@pytest.mark.parametrize("policy", ["queue", "drop-oldest"])
def test_reading_ahead_accounts_for_every_frame(tf_bundle, target_images, policy):
    """A source far faster than scoring: queue scores every frame, drop-oldest keeps up by dropping."""
    import threading

    from mrad.runtime.line.engine import LineEngine
    from mrad.runtime.line.sources import Frame

    image = np.asarray(Image.open(target_images[0]).convert("RGB"))
    all_read = threading.Event()

    def source():
        for i in range(40):
            yield Frame("fast", i, "t", image=image)
        all_read.set()

    class SlowFirst(ListSink):
        """Holds the first record until the source has given everything (dropping must happen, whatever the load)."""

        def write(self, record, picture=None):
            if policy == "drop-oldest" and not all_read.is_set():
                all_read.wait(timeout=30)
            super().write(record, picture)

    sink = SlowFirst()
    summary = LineEngine(Detector(tf_bundle, provider="cpu"), [sink], batch=1, when_behind=policy,
                         queue_size=2).run(source())
    records = [r for r in sink.records if "event" not in r]
    assert sorted(r["frame"] for r in records) == list(range(40)), "each frame exactly once"
    dropped = [r for r in records if "dropped" in r]
    assert summary["frames"] == 40 and summary["dropped"] == len(dropped)
    if policy == "queue":
        assert not dropped and all("score" in r for r in records)
    else:
        assert len(dropped) >= 40 - 2 - 1 and all("score" in r for r in records if "dropped" not in r)
        assert "behind" in dropped[0]["dropped"]


def test_a_stop_with_frames_read_ahead_owes_them_records(tf_bundle, target_images):
    import threading

    from mrad.runtime.line.engine import LineEngine, Stop
    from mrad.runtime.line.sources import Frame

    image = np.asarray(Image.open(target_images[0]).convert("RGB"))
    stop = Stop()
    sink = ListSink()
    read_ahead = threading.Event()

    def source():
        for i in range(10):
            yield Frame("fast", i, "t", image=image)
            if i == 3:
                read_ahead.set()

    class StopAfterFirst(ListSink):
        def write(self, record, picture=None):
            if "score" in record:
                read_ahead.wait(timeout=30)  # frames 1 to 3 are queued by now, whatever the load
                stop.request("test")

    summary = LineEngine(Detector(tf_bundle, provider="cpu"), [sink, StopAfterFirst()], batch=1, when_behind="queue",
                         queue_size=4, stop=stop).run(source())
    records = [r for r in sink.records if "event" not in r]
    indexes = [r["frame"] for r in records]
    assert indexes == list(range(len(indexes))) and summary["stopped_by"] == "test"
    assert len(records) >= 4 and all("run stopped" in r["dropped"] for r in records[1:])


def test_a_failing_source_is_never_silent_when_read_ahead(tf_bundle, target_images):
    from mrad.runtime.line.engine import LineEngine
    from mrad.runtime.line.sources import Frame

    image = np.asarray(Image.open(target_images[0]).convert("RGB"))

    def broken():
        yield Frame("sdk", 0, "t", image=image)
        raise RuntimeError("the camera SDK failed")

    with pytest.raises(RuntimeError, match="camera SDK failed"):
        LineEngine(Detector(tf_bundle, provider="cpu"), [ListSink()], when_behind="queue").run(broken())


def test_reading_ahead_preprocesses_in_the_reader_thread(tf_bundle, target_images):
    """The scoring thread only encodes: frames arrive decoded and preprocessed, and score as predict does."""
    import threading

    from mrad.runtime.line.engine import LineEngine
    from mrad.runtime.line.sources import Frame

    detector = Detector(tf_bundle, provider="cpu")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in target_images[:3]]
    prepared_in = []
    prepare = detector.prepare

    def watched(image):
        prepared_in.append(threading.current_thread().name)
        return prepare(image)

    detector.prepare = watched
    frames = [Frame("a", i, "t", image=image) for i, image in enumerate(images)]
    frames.append(Frame("a", 3, "t", image=np.zeros((0, 4, 3), np.uint8)))
    sink = ListSink()
    LineEngine(detector, [sink], when_behind="queue").run(iter(frames))
    records = [r for r in sink.records if "event" not in r]
    assert prepared_in == ["mrad-read-ahead"] * 4
    for record, image in zip(records, images):
        assert record["score"] == pytest.approx(Detector(tf_bundle, provider="cpu").predict(image).score, abs=1e-6)
    assert "H, W >= 1" in records[3]["error"], "a frame that cannot be preprocessed fails alone, with its reason"


class FakeClock:
    """Seconds that pass only when a test says so: deadlines checked without timing flakiness."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class SlowDetector:
    """Scores every frame 0.5, taking ``seconds`` of the fake clock per encoder call."""

    def __init__(self, clock, seconds, before=lambda: None):
        self.clock, self.seconds, self.before = clock, seconds, before

    def prepare(self, image):
        from mrad.runtime.core.preprocess import Prepared

        return Prepared(np.zeros((3, 8, 8), np.float32), image.shape[:2])

    def predict_batch(self, images, evidence=False):
        from mrad.runtime.core.preprocess import Prepared
        from mrad.runtime.core.result import Result

        self.before()
        self.clock.now += self.seconds
        sizes = [image.size if isinstance(image, Prepared) else image.shape[:2] for image in images]
        return [Result(0.5, np.zeros(size, np.float32), 0.5) for size in sizes]


def deadline_outcomes(records):
    """Per frame: scored in time, scored late, or late and not scored."""
    return [("late " if r.get("late") else "") + ("scored" if "score" in r else "unscored")
            for r in records if "event" not in r]


def test_a_deadline_measured_from_reading_counts_waiting_for_batch_mates():
    """A camera every 20 ms, batches of 4, 15 ms per batch, 50 ms deadline: the oldest of each batch is past it
    before scoring (not scored), the next one once scored (kept, marked late)."""
    from mrad.runtime.line.engine import LineEngine
    from mrad.runtime.line.sources import Frame

    clock = FakeClock()

    def camera():
        for i in range(8):
            clock.now += 0.020
            yield Frame("cam", i, "t", image=np.zeros((8, 8, 3), np.uint8))

    sink = ListSink()
    summary = LineEngine(SlowDetector(clock, 0.015), [sink], batch=4, deadline_ms=50, clock=clock).run(camera())
    assert deadline_outcomes(sink.records) == ["late unscored", "late scored", "scored", "scored"] * 2
    records = [r for r in sink.records if "event" not in r]
    assert [r["frame"] for r in records] == list(range(8)), "one record per frame, in order"
    assert records[0]["age_ms"] == pytest.approx(60) and records[1]["age_ms"] == pytest.approx(55)
    assert records[1]["score"] == 0.5 and "late" not in records[2]
    assert (summary["frames"], summary["late"], summary["late_unscored"], summary["deadline_ms"]) == (8, 4, 2, 50)


def test_a_deadline_with_frames_queued_ahead():
    """Six frames read ahead at once, 20 ms per frame, 50 ms deadline: three decided (the third late), three
    already past it when they reach the head of the queue."""
    from mrad.runtime.line.engine import LineEngine
    from mrad.runtime.line.sources import Frame

    clock, all_read = FakeClock(), threading.Event()

    def camera():
        for i in range(6):
            yield Frame("cam", i, "t", image=np.zeros((8, 8, 3), np.uint8))
        all_read.set()

    detector = SlowDetector(clock, 0.020, before=lambda: all_read.wait(timeout=30))  # time runs once all are queued
    sink = ListSink()
    summary = LineEngine(detector, [sink], batch=1, when_behind="queue", queue_size=6, deadline_ms=50,
                         clock=clock).run(camera())
    assert deadline_outcomes(sink.records) == ["scored", "scored", "late scored"] + ["late unscored"] * 3
    assert (summary["frames"], summary["late"], summary["late_unscored"]) == (6, 4, 3)


def test_deadline_from_the_command_line(tf_bundle, target_images):
    tight = run("--bundle", tf_bundle, "--input", target_images[0], "--input", target_images[1], "--provider", "cpu",
                "--deadline-ms", "1e-6")  # a nanosecond: no frame can be scored within it
    frames, events = split(tight.stdout)
    assert tight.exit_code == 0, tight.output
    assert all(r["late"] is True and "score" not in r for r in frames) and len(frames) == 2
    assert events[-1]["late_unscored"] == 2 and "2 past the deadline (2 of them unscored)" in tight.stderr
    loose = run("--bundle", tf_bundle, "--input", target_images[0], "--provider", "cpu", "--deadline-ms", 1e9)
    frames, events = split(loose.stdout)
    assert "late" not in frames[0] and "score" in frames[0] and events[-1]["late"] == 0
    assert "past the deadline" not in loose.stderr
    assert run("--bundle", tf_bundle, "--input", target_images[0], "--deadline-ms", 0).exit_code == cli.EXIT_BAD_ARGUMENTS


# -- several sources at once --------------------------------------------------------------------------------------


def by_source(frames):
    """Each source's frame numbers, in the order its records came."""
    numbers = {}
    for record in frames:
        numbers.setdefault(record["source"], []).append(record["frame"])
    return numbers


def test_recordings_read_concurrently_each_numbered_on_its_own(tf_bundle, target_images, tmp_path):
    videos = [write_video(tmp_path / f"cam{k}.avi", target_images[:n]) for k, n in enumerate((3, 5, 7))]
    result = run("--bundle", tf_bundle, *(a for v in videos for a in ("--input", v)), "--concurrent",
                 "--provider", "cpu", "--batch", 2, "--queue-size", 1)
    assert result.exit_code == 0, result.output
    frames, events = split(result.stdout)
    assert by_source(frames) == {str(videos[0]): [0, 1, 2], str(videos[1]): list(range(5)),
                                 str(videos[2]): list(range(7))}
    assert all("score" in r for r in frames)
    summary = events[-1]
    assert summary["frames"] == 15 and summary["stopped_by"] is None
    assert {name: counts["frames"] for name, counts in summary["sources"].items()} == {
        str(videos[0]): 3, str(videos[1]): 5, str(videos[2]): 7}
    assert f"{videos[2]}: 7" in result.stderr

    one_after_another = run("--bundle", tf_bundle, "--input", videos[0], "--input", videos[1], "--provider", "cpu")
    frames, events = split(one_after_another.stdout)
    assert [r["frame"] for r in frames] == list(range(8)), "without --concurrent: one source, numbered on"
    assert list(events[-1]["sources"]) == [f"{videos[0]} + {videos[1]}"]


def test_each_concurrent_recording_loops_on_its_own(tf_bundle, target_images, tmp_path):
    short, long = write_video(tmp_path / "short.avi", target_images[:2]), write_video(tmp_path / "long.avi",
                                                                                       target_images[:3])
    result = run("--bundle", tf_bundle, "--input", short, "--input", long, "--concurrent", "--loop",
                 "--max-frames", 7, "--provider", "cpu")
    assert result.exit_code == 0, result.output
    frames, events = split(result.stdout)
    assert by_source(frames) == {str(short): list(range(7)), str(long): list(range(7))}  # --max-frames per source
    assert events[-1]["frames"] == 14


def fake_cameras(monkeypatch, scripts, frames_per_session=3):
    """Cameras by spec, each with its own script (see FakeCapture); any other spec is opened for real."""
    frame = np.full((48, 64, 3), 128, dtype=np.uint8)
    real = sources._open_capture
    scripts = {spec: {"opens": list(opens), "frames_per_session": frames_per_session}
               for spec, opens in scripts.items()}
    monkeypatch.setattr(sources, "_open_capture",
                        lambda spec: FakeCapture(scripts[spec], frame) if spec in scripts else real(spec))
    monkeypatch.setattr(sources, "_sleep", lambda seconds, stop=None: False)


def test_a_dead_camera_among_live_ones_stops_only_itself(tf_bundle, target_images, tmp_path, monkeypatch):
    fake_cameras(monkeypatch, {"rtsp://flaky": [True, False, True], "rtsp://dead": [False]})
    a, b = write_video(tmp_path / "a.avi", target_images[:4]), write_video(tmp_path / "b.avi", target_images[:6])
    result = run("--bundle", tf_bundle, "--camera", "rtsp://flaky", "--camera", "rtsp://dead", "--input", a,
                 "--input", b, "--concurrent", "--provider", "cpu", "--batch", 3, "--reconnect-timeout", 5)
    assert result.exit_code == cli.EXIT_INPUT_FAILED, result.output
    frames, events = split(result.stdout)
    assert by_source(frames) == {"rtsp://flaky": list(range(6)), str(a): list(range(4)), str(b): list(range(6))}
    assert all("score" in r for r in frames)
    flaky = [e["event"] for e in events if e.get("source") == "rtsp://flaky"]
    assert flaky == ["camera_lost", "camera_reopened", "camera_lost", "source_failed"]  # reconnected once, then gone
    dead = [e for e in events if e.get("source") == "rtsp://dead"]
    assert [e["event"] for e in dead] == ["source_failed"] and "could not be opened" in dead[0]["error"]
    summary = events[-1]["sources"]
    assert {name: counts["frames"] for name, counts in summary.items()} == {
        str(a): 4, str(b): 6, "rtsp://flaky": 6, "rtsp://dead": 0}
    assert "not back after 5.0 s" in summary["rtsp://flaky"]["failed"] and "failed" not in summary[str(a)]
    assert "could not be opened" in result.stderr and "lost and not back" in result.stderr
    assert "rtsp://dead: 0 (failed)" in result.stderr


class FakeDetector:
    """Scores every frame 0.5 at once; remembers which sources each encoder call held."""

    def __init__(self):
        self.calls = []

    def prepare(self, image):
        from mrad.runtime.core.preprocess import Prepared

        return Prepared(np.zeros((3, 8, 8), np.float32), image.shape[:2])

    def predict_batch(self, images, evidence=False):
        from mrad.runtime.core.result import Result

        self.calls.append(len(images))
        return [Result(0.5, np.zeros(image.size, np.float32), 0.5) for image in images]


def frame_of(source, index):
    from mrad.runtime.line.sources import Frame

    return Frame(source, index, "t", image=np.zeros((8, 8, 3), np.uint8))


def test_a_fast_source_does_not_starve_a_slow_one():
    """A source that always has frames queued and one whose frames come rarely: each frame of the slow one is
    scored next after it arrives (taken in turn), not behind the fast one's queue."""
    from mrad.runtime.line.engine import LineEngine

    arrived = [threading.Event() for _ in range(5)]
    due = [threading.Event() for _ in range(5)]

    def fast():
        for i in range(60):
            yield frame_of("fast", i)

    def slow():
        for k in range(5):
            due[k].wait(timeout=30)
            yield frame_of("slow", k)
            arrived[k].set()  # the reader asks for the next frame only once this one is queued

    class Pacing(ListSink):
        """Lets the slow source's k-th frame come after the fast one's 10 (k + 1)-th record, and waits until it is
        queued: from there, a fair engine scores it next."""

        needs_picture = False

        def write(self, record, picture=None):
            super().write(record, picture)
            fast_seen = sum(r.get("source") == "fast" for r in self.records)
            if record.get("source") == "fast" and fast_seen % 10 == 0 and fast_seen // 10 <= 5:
                k = fast_seen // 10 - 1
                due[k].set()
                arrived[k].wait(timeout=30)

    sink = Pacing()
    summary = LineEngine(FakeDetector(), [sink], batch=1, when_behind="queue", queue_size=4).run(
        {"fast": fast(), "slow": slow()})
    order = [r["source"] for r in sink.records if "event" not in r]
    assert by_source(r for r in sink.records if "event" not in r) == {"fast": list(range(60)), "slow": list(range(5))}
    slow_at = [i for i, source in enumerate(order) if source == "slow"]
    fast_before = [order[:i].count("fast") for i in slow_at]
    assert all(10 * (k + 1) <= n <= 10 * (k + 1) + 1 for k, n in enumerate(fast_before)), fast_before
    assert summary["sources"] == {"fast": dict(frames=60, errors=0, dropped=0, late=0, anomalous=0),
                                  "slow": dict(frames=5, errors=0, dropped=0, late=0, anomalous=0)}


def test_a_fast_source_drops_only_its_own_frames():
    """drop-oldest with a source far faster than scoring: it drops, the slow source beside it loses nothing."""
    from mrad.runtime.line.engine import LineEngine

    all_read = threading.Event()
    scored = [threading.Event() for _ in range(3)]

    def fast():
        for i in range(40):
            yield frame_of("fast", i)
        all_read.set()

    def slow():
        for k in range(3):
            if k:
                scored[k - 1].wait(timeout=30)
            yield frame_of("slow", k)

    class HeldUp(ListSink):
        """Holds the first record until the fast source has given everything (it must drop, whatever the load)."""

        def write(self, record, picture=None):
            all_read.wait(timeout=30)
            super().write(record, picture)
            if record.get("source") == "slow" and "score" in record:
                scored[record["frame"]].set()

    sink = HeldUp()
    summary = LineEngine(FakeDetector(), [sink], batch=1, when_behind="drop-oldest", queue_size=2).run(
        {"fast": fast(), "slow": slow()})
    records = [r for r in sink.records if "event" not in r]
    assert sorted(r["frame"] for r in records if r["source"] == "fast") == list(range(40)), "each frame exactly once"
    assert [(r["frame"], "score" in r) for r in records if r["source"] == "slow"] == [(0, True), (1, True), (2, True)]
    dropped = sum("dropped" in r for r in records)
    assert dropped >= 40 - 2 - 1 and summary["sources"]["fast"]["dropped"] == dropped == summary["dropped"]
    assert summary["sources"]["slow"]["dropped"] == 0 and summary["frames"] == 43


def test_a_source_lost_for_good_leaves_the_others_running():
    from mrad.runtime.line.engine import LineEngine
    from mrad.runtime.errors import SourceError

    reported = threading.Event()

    def lost():
        yield frame_of("lost", 0)
        yield frame_of("lost", 1)
        raise SourceError("camera 'lost' lost and not back after 5.0 s of retries")

    def live():
        for i in range(6):
            if i == 2:
                reported.wait(timeout=30)  # frames 2 to 5 come only once the other source's loss was reported
            yield frame_of("live", i)

    class Watching(ListSink):
        def write(self, record, picture=None):
            super().write(record, picture)
            if record.get("event") == "source_failed":
                reported.set()

    sink = Watching()
    engine = LineEngine(FakeDetector(), [sink], batch=3, when_behind="queue")
    summary = engine.run({"lost": lost(), "live": live()})
    frames = [r for r in sink.records if "event" not in r]
    assert by_source(frames) == {"lost": [0, 1], "live": list(range(6))} and all("score" in r for r in frames)
    failed = [r for r in sink.records if r.get("event") == "source_failed"]
    assert [(e["source"], "not back" in e["error"]) for e in failed] == [("lost", True)]
    after = sink.records[sink.records.index(failed[0]) + 1:]
    assert [r["frame"] for r in after if r.get("source") == "live"][-4:] == [2, 3, 4, 5]  # read after the loss
    assert engine.failure.startswith("camera 'lost'") and summary["stopped_by"] is None
    assert "not back" in summary["sources"]["lost"]["failed"] and summary["sources"]["live"]["frames"] == 6


def test_a_stop_with_several_sources_accounts_for_every_frame_read():
    from mrad.runtime.line.engine import LineEngine, Stop

    stop = Stop()

    def endless(name):
        for i in range(10_000):  # bounded, far more than the run takes
            yield frame_of(name, i)

    class StopAt(ListSink):
        def write(self, record, picture=None):
            super().write(record, picture)
            if len(self.records) == 20:
                stop.request("test")

    sink = StopAt()
    summary = LineEngine(FakeDetector(), [sink], batch=2, when_behind="queue", queue_size=3, stop=stop).run(
        {"a": endless("a"), "b": endless("b"), "c": endless("c")})
    frames = [r for r in sink.records if "event" not in r]
    for source, numbers in by_source(frames).items():
        assert numbers == list(range(len(numbers))), f"{source}: in order, contiguous, each frame once"
    assert summary["stopped_by"] == "test" and summary["frames"] == len(frames)
    assert sum(c["frames"] for c in summary["sources"].values()) == len(frames)
    assert {"a", "b", "c"} == set(by_source(frames))


def test_an_mvtec_root_is_read_without_its_masks(tf_bundle, synth_data):
    """--input on an MVTec-layout root: its ground_truth masks are not scored as parts, and it says so once."""
    root = synth_data[1] / "weave"
    result = run("--bundle", tf_bundle, "--input", root, "--provider", "cpu")
    assert result.exit_code == 0, result.output
    frames, _ = split(result.stdout)
    assert frames and not any("ground_truth" in r["source"] for r in frames)
    assert len(frames) == len([p for p in root.rglob("*.png") if "ground_truth" not in p.parts])
    assert result.stderr.count("ground_truth folders hold masks") == 1
