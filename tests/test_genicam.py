"""GenICam cameras: every pixel format read to RGB (synthetic buffers, against OpenCV), then the Aravis source
against Aravis's simulated GigE Vision camera (arv-fake-gv-camera-0.8) on the loopback interface."""

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from mrad.runtime.commands import common as cli

from mrad.runtime.commands import run as run_cli
from mrad.runtime.line.engine import Stop
from mrad.runtime.errors import ImageError, MradError, SourceError
from mrad.runtime.line.genicam import PIXEL_FORMATS, GenICamCamera, import_aravis, parse_settings, parse_value, to_rgb

CODE = {name: code for code, (name, _, _) in PIXEL_FORMATS.items()}
FORMAT1_BUNDLE = Path(__file__).parent / "fixtures" / "format1-bundle" / "bundle"


def bits_of(name):
    return PIXEL_FORMATS[CODE[name]][2]


def scaled(values, bits):
    return np.rint(values * (255.0 / (2 ** bits - 1))).astype(np.uint8)


def buffer_of(samples, bits):
    return samples.astype("<u2" if bits > 8 else np.uint8).tobytes()


def mosaic(rgb, pattern):
    """Each pixel keeps the one channel the 2 x 2 pattern (row by row, "RGGB") puts there."""
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for k, letter in enumerate(pattern):
        out[k // 2::2, k % 2::2] = rgb[k // 2::2, k % 2::2, "RGB".index(letter)]
    return out


# The second row of each GenICam Bayer name, derived here from the first row independently of the module.
BAYER = {"RG": "RGGB", "GR": "GRBG", "GB": "GBRG", "BG": "BGGR"}


@pytest.mark.parametrize("name", [n for n in CODE if n.startswith("Bayer")])
def test_bayer_formats_against_opencv(name):
    pattern, bits = BAYER[name[5:7]], bits_of(name)
    rng = np.random.default_rng(0)
    raw = mosaic(rng.integers(0, 2 ** bits, (6, 10, 3)), pattern)
    expected = cv2.cvtColor(scaled(raw, bits), getattr(cv2, f"COLOR_Bayer{pattern}2RGB"))
    np.testing.assert_array_equal(to_rgb(buffer_of(raw, bits), 10, 6, CODE[name]), expected)
    # A flat colour comes back as that colour: the pattern, not only OpenCV's naming, is right.
    flat = np.broadcast_to(np.array([200, 100, 50]) * (2 ** bits - 1) // 255, (6, 10, 3))
    rgb = to_rgb(buffer_of(mosaic(flat, pattern), bits), 10, 6, CODE[name])
    np.testing.assert_allclose(rgb[2:-2, 2:-2].reshape(-1, 3) - [200, 100, 50], 0, atol=1)


@pytest.mark.parametrize("name", [n for n in CODE if n.startswith("Mono")])
def test_mono_formats_scaled_over_their_range(name):
    bits = bits_of(name)
    grey = np.arange(2 ** bits).reshape(-1, 2 ** (bits // 2))  # every value the format can hold
    height, width = grey.shape
    rgb = to_rgb(buffer_of(grey, bits), width, height, CODE[name])
    np.testing.assert_array_equal(rgb, np.repeat(scaled(grey, bits)[..., None], 3, axis=2))
    assert rgb.dtype == np.uint8 and rgb[0, 0].tolist() == [0, 0, 0] and rgb[-1, -1].tolist() == [255] * 3


@pytest.mark.parametrize("name,order", [("RGB8", "RGB"), ("BGR8", "BGR"), ("RGBa8", "RGBA"), ("BGRa8", "BGRA")])
def test_colour_formats(name, order):
    rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    alpha = np.full((4, 6), 7, np.uint8)
    packed = np.stack([{"R": rgb[..., 0], "G": rgb[..., 1], "B": rgb[..., 2], "A": alpha}[c] for c in order], axis=2)
    converted = to_rgb(packed.tobytes(), 6, 4, CODE[name])
    np.testing.assert_array_equal(converted, rgb)
    assert converted.flags.writeable  # the frame owns its pixels, the camera gets its buffer back


def test_padding_saturation_and_what_is_refused():
    grey = np.arange(12, dtype=np.uint16).reshape(3, 4) * 300  # 3,300 at most: over Mono10's 1,023
    padded = np.concatenate([grey.astype("<u2").view(np.uint8), np.full((3, 3), 99, np.uint8)], axis=1)
    rgb = to_rgb(padded.tobytes(), 4, 3, CODE["Mono10"], x_padding=3)
    np.testing.assert_array_equal(rgb[..., 0], scaled(np.minimum(grey, 1023), 10))  # stray high bits saturate
    with pytest.raises(ImageError, match=r"0x010c0006 is not read; supported: Mono8, "):
        to_rgb(bytes(24), 4, 4, 0x010C0006)  # Mono12Packed
    with pytest.raises(ImageError, match="0x02100032 is not read"):
        to_rgb(bytes(32), 4, 4, 0x02100032)  # YUV422_8
    with pytest.raises(ImageError, match="RGB8 buffer of 10 bytes is too short for 4 x 4"):
        to_rgb(bytes(10), 4, 4, CODE["RGB8"])


def test_feature_settings_parse_and_type():
    assert parse_settings(["ExposureTime=5000", " Gain = 2.5 ", "UserSetLoad"]) == [
        ("ExposureTime", "5000"), ("Gain", "2.5"), ("UserSetLoad", None)]
    for bad in ("=5", "Gain=", ""):
        with pytest.raises(MradError, match="NAME=VALUE"):
            parse_settings([bad])
    assert parse_value("int", "Width", "0x40") == 64 and parse_value("float", "Gain", "2.5") == 2.5
    assert parse_value("bool", "ReverseX", "True") is True and parse_value("bool", "ReverseX", "off") is False
    assert parse_value("enum", "PixelFormat", "Mono8", ["Mono8", "RGB8"]) == "Mono8"
    for kind, text, message in [("int", "2.5", "takes an integer"), ("float", "fast", "takes a number"),
                                ("bool", "maybe", "takes true or false"), ("enum", "Mono9", "takes one of Mono8, RGB8")]:
        with pytest.raises(MradError, match=message):
            parse_value(kind, "F", text, ["Mono8", "RGB8"])


def test_without_aravis_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gi", None)  # as if PyGObject were not installed
    result = CliRunner().invoke(run_cli.main, ["--bundle", str(FORMAT1_BUNDLE), "--genicam", "cam0"])
    assert result.exit_code == cli.EXIT_BAD_ARGUMENTS
    assert 'pip install "mrad-edge[line]"' in result.stderr and "apt-get install gir1.2-aravis-0.8" in result.stderr
    loaded = subprocess.run([sys.executable, "-c", "import sys, mrad.runtime.commands.run, mrad.runtime.line.genicam; "
                             "print('gi' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "False", "the runtime imports Aravis's binding only for --genicam"


# --- Against the simulated camera ------------------------------------------------------------------------------

FAKE_CAMERA = shutil.which("arv-fake-gv-camera-0.8")
SERIAL = "MRADTEST"
# The fake camera draws frame f's pixel (x, y) as (x + y + f) % 255 for Mono8 and 256 (x + y + f) % 65535 for
# Mono16, at ExposureTimeAbs 10000 and GainRaw 0 (Aravis's arvfakecamera.c): frames can be checked exactly.
EXACT = ["ExposureTimeAbs=10000", "GainRaw=0", "AcquisitionFrameRate=100"]


def aravis_missing() -> str | None:
    if FAKE_CAMERA is None:
        return "arv-fake-gv-camera-0.8 not installed (apt-get install aravis-tools)"
    try:
        import_aravis()
    except MradError as exc:
        return str(exc)
    return None


class FakeCamera:
    """arv-fake-gv-camera-0.8 on 127.0.0.1, started and killed by the tests."""

    def __init__(self):
        self.process = None

    def start(self):
        self.process = subprocess.Popen([FAKE_CAMERA, "-i", "127.0.0.1", "-s", SERIAL], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def kill(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="module")
def fake_camera():
    missing = aravis_missing()
    if missing:
        pytest.skip(f"GenICam tests need Aravis: {missing}")
    camera = FakeCamera()
    camera.start()
    try:
        Aravis, _ = import_aravis()
        for _ in range(10):  # bounded: discovery takes about a second
            Aravis.update_device_list()
            if SERIAL in [Aravis.get_device_serial_nbr(i) for i in range(Aravis.get_n_devices())]:
                break
        else:
            pytest.fail("the simulated camera did not show up on 127.0.0.1 (another one holding its port?)")
        yield camera
    finally:
        camera.kill()


def take(source, n, pause=0.0):
    with contextlib.closing(source.frames()) as frames:
        taken = []
        for frame in islice(frames, n):
            taken.append(frame)
            time.sleep(pause)
        return taken


def test_frames_carry_the_cameras_ids_and_timestamps(fake_camera):
    for pixel_format, expected in [("Mono8", lambda v: v % 255), ("Mono16", lambda v: scaled(256 * v % 65535, 16))]:
        frames = take(GenICamCamera(SERIAL, [f"PixelFormat={pixel_format}", *EXACT]), 3)
        ids = [f.camera["frame_id"] for f in frames]
        stamps = [f.camera["timestamp_ns"] for f in frames]
        assert [f.index for f in frames] == [0, 1, 2] and ids == list(range(ids[0], ids[0] + 3))
        assert stamps == sorted(set(stamps)) and abs(stamps[0] / 1e9 - time.time()) < 60
        y, x = np.mgrid[:512, :512]
        for frame in frames:
            assert frame.error is None and frame.image.shape == (512, 512, 3)
            grey = np.asarray(expected(x + y + frame.camera["frame_id"]), np.uint8)
            np.testing.assert_array_equal(frame.image, np.repeat(grey[..., None], 3, axis=2))


def test_bayer_from_the_camera_matches_its_rgb(fake_camera):
    """Frame f draws the pattern shifted by f pixels, so frames are compared shifted by their ids' difference.

    Only GB and GR: Aravis 0.8's fake camera writes BayerRG8 as BGGR and BayerBG8 as RGGB (arvfakecamera.c),
    against the naming convention; RG and BG are checked on synthetic buffers above.
    """
    (reference,) = take(GenICamCamera(SERIAL, ["PixelFormat=RGB8", *EXACT]), 1)
    for pixel_format in ("BayerGB8", "BayerGR8"):
        (frame,) = take(GenICamCamera(SERIAL, [f"PixelFormat={pixel_format}", *EXACT]), 1)
        shift = (frame.camera["frame_id"] - reference.camera["frame_id"]) % 255
        ours, theirs = frame.image[2:-2, 2:-2 - shift].astype(int), reference.image[2:-2, 2 + shift:-2].astype(int)
        assert np.median(np.abs(ours - theirs)) == 0 and np.mean(np.abs(ours - theirs) > 8) < 0.02


def test_features_are_set_typed_and_read_back(fake_camera):
    events = []
    (frame,) = take(GenICamCamera(SERIAL, ["Width=256", "AcquisitionFrameRate=40", "PixelFormat=RGB8", "GainRaw=0"],
                                  events=events.append), 1)
    assert frame.image.shape == (512, 256, 3)
    opened = events[0]
    assert opened["event"] == "camera_opened" and opened["serial"] == SERIAL and opened["pixel_format"] == "RGB8"
    assert opened["features"] == {"Width": 256, "AcquisitionFrameRate": 40.0, "PixelFormat": "RGB8", "GainRaw": 0}
    assert isinstance(opened["features"]["AcquisitionFrameRate"], float)  # typed by the node: a float node
    Aravis, _ = import_aravis()  # and from the camera itself, through a connection of our own
    device = Aravis.Camera.new(opened["device_id"]).get_device()
    assert device.get_integer_feature_value("Width") == 256
    assert device.get_float_feature_value("AcquisitionFrameRate") == 40.0
    del device
    for setting, message in [("ExposureTime=5000", "no feature 'ExposureTime'; did you mean ExposureTimeAbs"),
                             ("PixelFormat=YUV", "PixelFormat takes one of BayerBG8, "),
                             ("Width=wide", "Width takes an integer")]:
        with pytest.raises(MradError, match=message):
            take(GenICamCamera(SERIAL, ["Width=512", setting]), 1)
    with pytest.raises(SourceError, match=f"'nowhere' not found; cameras seen: Aravis-Fake-{SERIAL}"):
        take(GenICamCamera("nowhere"), 1)


def test_software_trigger_gives_the_frames_asked_for(fake_camera):
    """At 100 frames/s free-running, frames would come 10 ms apart; triggered, each comes when it is read."""
    frames = take(GenICamCamera(SERIAL, [*EXACT, "PixelFormat=Mono8"], trigger="software"), 4, pause=0.2)
    stamps = np.array([f.camera["timestamp_ns"] for f in frames]) / 1e9
    ids = [f.camera["frame_id"] for f in frames]
    assert len(frames) == 4 and ids == list(range(ids[0], ids[0] + 4)) and all(f.error is None for f in frames)
    assert np.diff(stamps).min() > 0.15


def test_hardware_trigger_waits_without_calling_the_camera_lost(fake_camera):
    events, stop = [], Stop()
    source = GenICamCamera(SERIAL, EXACT, trigger="hardware", events=events.append, stop=stop, frame_timeout=0.2)
    threading.Timer(1.0, stop.request, args=("test",)).start()  # no pulse ever comes on Line0
    assert take(source, 1) == []
    assert [e["event"] for e in events] == ["camera_opened"] and events[0]["trigger"] == "hardware"


def test_a_camera_killed_mid_run_is_a_gap_then_reopened(fake_camera):
    events = []

    def on_event(record):
        events.append(record)
        if record["event"] == "camera_lost":
            fake_camera.start()  # back, as a power-cycled camera comes back

    source = GenICamCamera(SERIAL, EXACT, events=on_event, frame_timeout=1.0, first_backoff=0.2, reconnect_timeout=30)
    frames = []
    with contextlib.closing(source.frames()) as stream:
        for frame in stream:  # bounded: the source gives up after 30 s without the camera
            frames.append(frame)
            if len(frames) == 3:
                fake_camera.kill()  # frames already in the stream's buffers still come
            if events[-1]["event"] == "camera_reopened":
                break
    assert [f.index for f in frames] == list(range(len(frames))) and all(f.error is None for f in frames[:3])
    # a frame on the wire when the camera died may arrive cut short: an error frame, never a crash or a gap
    assert all(f.error is None or f.error.startswith("incomplete frame") for f in frames[3:]), \
        [f.error for f in frames]
    assert [e["event"] for e in events] == ["camera_opened", "camera_lost", "camera_reopened"]
    assert 0 < events[2]["waited_s"] < 30


def test_mrad_run_with_a_genicam_camera(fake_camera, tmp_path):
    out = tmp_path / "line.jsonl"
    result = CliRunner().invoke(run_cli.main, [
        "--bundle", str(FORMAT1_BUNDLE), "--genicam", SERIAL, "--genicam-set", "Width=128",
        "--genicam-set", "Height=96", "--genicam-set", "PixelFormat=BayerGR8", "--genicam-trigger", "software",
        "--max-frames", "3", "--provider", "cpu", "--out", str(out), "--deadline-ms", "60000"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    frames = [r for r in records if "event" not in r]
    assert [r["frame"] for r in frames] == [0, 1, 2] and all(0 <= r["score"] <= 1 for r in frames)
    ids = [r["camera"]["frame_id"] for r in frames]
    assert ids == list(range(ids[0], ids[0] + 3)) and all(r["camera"]["timestamp_ns"] > 0 for r in frames)
    assert [r["event"] for r in records if "event" in r] == ["camera_opened", "summary"]
    assert records[-1]["frames"] == 3 and records[-1]["late"] == 0


def test_a_genicam_camera_beside_a_missing_one_and_a_recording(fake_camera, tmp_path):
    """Three sources at once: the simulated camera and a recording give all their frames; a serial nobody has is
    given up without stopping them."""
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    for value in (40, 120, 200, 250):
        writer.write(np.full((48, 64, 3), value, np.uint8))
    writer.release()
    out = tmp_path / "line.jsonl"
    result = CliRunner().invoke(run_cli.main, [
        "--bundle", str(FORMAT1_BUNDLE), "--genicam", SERIAL, "--genicam", "NOSUCHCAMERA", "--input", str(video),
        "--genicam-set", "Width=128", "--genicam-set", "Height=96", "--genicam-trigger", "software",
        "--max-frames", "3", "--batch", "2", "--provider", "cpu", "--out", str(out)])
    assert result.exit_code == cli.EXIT_INPUT_FAILED, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    frames = [r for r in records if "event" not in r]
    for source in (SERIAL, str(video)):
        assert [r["frame"] for r in frames if r["source"] == source] == [0, 1, 2]
    assert all("score" in r for r in frames) and len(frames) == 6
    failed = [r for r in records if r.get("event") == "source_failed"]
    assert [r["source"] for r in failed] == ["NOSUCHCAMERA"] and "not found" in failed[0]["error"]
    summary = records[-1]["sources"]
    assert summary[SERIAL]["frames"] == 3 and summary[str(video)]["frames"] == 3 and "failed" in summary["NOSUCHCAMERA"]
