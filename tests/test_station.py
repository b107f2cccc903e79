"""The station: its file, recipes sharing an encoder, changeover under load, regions of interest, and enrolling
and calibrating as one loop."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mrad.runtime import MradError, Station
from mrad.runtime.commands import calibrate as calibrate_cli
from mrad.runtime.commands import enroll as enroll_cli
from mrad.runtime.commands import run as run_cli
from mrad.runtime.core.preprocess import load_rgb
from mrad.runtime.formats.station import parse_station, read_station
from mrad.runtime.line.control import RecipeFile
from mrad.runtime.line.engine import LineEngine
from mrad.runtime.line.sinks import Sink
from mrad.runtime.line.sources import Frame
from mrad.runtime.memories.trials import MIN_CALIBRATION_PARTS

SMALLEST = """
[[recipes]]
name = "part-a"
bundle = "bundles/tiny"

[[recipes]]
name = "part-b"
bundle = "bundles/tiny"
enrollment = "enrollments/part-b"   # a folder written by mrad-enroll --enrollment ...
roi = [0, 0, 160, 120]              # x, y, width, height in frame pixels
"""


@pytest.fixture
def site(tf_bundle, synth_data, tmp_path):
    """A station's folder: bundles/tiny (a copy of the test bundle) and part-b's enrollment of good weave parts."""
    shutil.copytree(tf_bundle, tmp_path / "bundles" / "tiny")
    good = sorted((synth_data[1] / "weave" / "train" / "good").glob("*.png"))
    done = CliRunner().invoke(enroll_cli.main, ["--bundle", str(tmp_path / "bundles" / "tiny"), "--provider", "cpu",
                                                "--enrollment", str(tmp_path / "enrollments" / "part-b"),
                                                "--normal", str(good[0]), "--normal", str(good[1])])
    assert done.exit_code == 0, done.output
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "station.toml"
    path.write_text(text)
    return path


def test_the_smallest_station_file_works_as_written(site, target_images):
    station = Station(write(site, SMALLEST), provider="cpu")
    assert station.recipes == ["part-a", "part-b"] and station.active == "part-a"
    image = target_images[0]
    a = station.predict(image)
    station.activate("part-b")
    b = station.predict(image)
    assert (a.recipe, b.recipe) == ("part-a", "part-b")
    assert b.scored_by["enrollment"] == 1 and a.scored_by["enrollment"] is None
    assert a.scored_by["bundle"] == b.scored_by["bundle"] and a.scored_by["bundle"].startswith("sha256:")
    width, height = Image.open(image).size
    assert b.anomaly_map.shape == a.anomaly_map.shape == (height, width)  # maps on the whole frame
    assert a.score != b.score
    assert len(station.sessions) == 1  # two recipes, one bundle: one encoder session
    assert station.recipe("part-a").detector.encoder is station.recipe("part-b").detector.encoder
    with pytest.raises(MradError, match="no recipe named 'part-c'; the recipes are part-a, part-b"):
        station.activate("part-c")


def test_recipes_whose_bundles_share_an_encoder_share_one_session(site, tf_bundle):
    shutil.copytree(tf_bundle, site / "bundles" / "copy")  # another folder, the same encoder graph
    station = Station(write(site, SMALLEST + '\n[[recipes]]\nname = "part-c"\nbundle = "bundles/copy"\n'),
                      provider="cpu")
    assert len(station.recipes) == 3 and len(station.sessions) == 1
    assert len({id(station.recipe(name).detector.encoder) for name in station.recipes}) == 1


MISTAKES = [
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\ncolour = "red"\n', "recipes[0].colour: unknown key"),
    ('name = "line 3"\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "name: 'line 3' must be"),
    ('[[recipes]]\nname = "a"\n', "recipes[0].bundle: missing"),
    ('stations = 1\n', "stations: unknown key; the keys here are active"),
    ('name = "x"\n', "recipes: missing"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/none"\n', "recipes[0].bundle:"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n',
     "recipes[1].name: 'a' names two recipes"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\nroi = [0, 0, 10]\n', "recipes[0].roi:"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\nroi = [0, 0, -5, 10]\n', "recipes[0].roi:"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\nignore = [[0, 0, 5, 5]]\n', "recipes[0].ignore:"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\nthreshold = nan\n', "recipes[0].threshold:"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\nthreshold = "high"\n', "recipes[0].threshold:"),
    ('active = "b"\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "active: 'b' is not one of the recipes"),
    ('[run]\nbatch = 0\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "run.batch:"),
    ('[run]\nspeed = 2\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "run.speed: unknown key"),
    ('[outputs]\nmqtt-qos = 5\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "outputs.mqtt-qos:"),
    ('[outputs]\nprinter = "lp0"\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "outputs.printer: unknown key"),
    ('format_version = 2\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "format_version: 2 is not supported"),
    ('[[sources]]\ncamera = "0"\ninput = "x"\n[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\n', "sources[0]:"),
    ('[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\ntrusted-keys = ["keys/none.pem"]\n', "trusted-keys:"),
    ('[[recipes]\nname = "a"\n', "not valid TOML"),
]


@pytest.mark.parametrize("text, key", MISTAKES)
def test_every_station_file_mistake_is_one_line_naming_the_key(site, text, key):
    with pytest.raises(MradError) as caught:
        Station(write(site, text), provider="cpu")
    message = str(caught.value)
    assert "\n" not in message and key in message, message
    assert str(site / "station.toml") in message


def test_a_command_line_mistake_in_the_station_file_exits_2_with_one_line(site):
    path = write(site, '[[recipes]]\nname = "a"\nbundle = "bundles/tiny"\nroi = [0, 0, 10]\n')
    result = CliRunner().invoke(run_cli.main, ["--station", str(path), "--input", str(site)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "recipes[0].roi" in result.output


def frames_of(images, count):
    """``count`` frames cycling over ``images``, as fast as they are asked for (a source faster than scoring)."""
    arrays = [np.asarray(load_rgb(p)) for p in images]
    for i in range(count):
        yield Frame(source="cam", index=i, timestamp="t", image=arrays[i % len(arrays)])


class Records(Sink):
    def __init__(self, on_frame=lambda count: None):
        self.records, self.on_frame = [], on_frame

    def write(self, record, picture=None, frame=None, anomaly_map=None):
        self.records.append(record)
        if "score" in record:
            self.on_frame(sum("score" in r for r in self.records))


def test_changeover_under_load_scores_every_frame_by_the_recipe_it_names(site, target_images):
    """Three recipes, a source faster than scoring, a switch every 20 frames from another thread: each record's
    score is the one the recipe it names gives that frame alone."""
    text = SMALLEST + '\n[[recipes]]\nname = "part-c"\nbundle = "bundles/tiny"\nroi = [10, 8, 80, 70]\n' \
                      'ignore = [[20, 20, 15, 10], [[50, 30], [70, 30], [60, 60]]]\n'
    station = Station(write(site, text), provider="cpu")
    images = target_images[:6]
    order = ["part-a", "part-b", "part-c"]
    switches = []

    def switch_every_20(count):
        if count % 20 == 0:  # from another thread, while the engine goes on reading and scoring
            name = order[(count // 20) % 3]
            thread = threading.Thread(target=station.activate, args=(name,), kwargs={"by": "test"})
            thread.start()
            switches.append(thread)

    sink = Records(switch_every_20)
    summary = LineEngine(station, [sink], batch=1, when_behind="queue", queue_size=4).run(frames_of(images, 120))
    for thread in switches:
        thread.join(5)
    scored = [r for r in sink.records if "score" in r]
    assert len(scored) == 120 and summary["frames"] == 120
    used = {r["recipe"] for r in scored}
    assert used == set(order), used
    changes = [r for r in sink.records if r.get("event") == "recipe_changed"]
    assert len(changes) >= 3 and all(c["by"] == "test" for c in changes)
    alone = {}
    for record in scored:
        key = (record["recipe"], record["frame"] % len(images))
        if key not in alone:
            station.activate(record["recipe"])
            alone[key] = round(station.predict(images[key[1]]).score, 6)
        assert record["score"] == alone[key], record  # bit for bit, at the records' six decimals
    assert set(summary["recipes"]) == set(order) and sum(c["frames"] for c in summary["recipes"].values()) == 120


def test_a_defect_outside_the_region_of_interest_does_not_move_the_score(site, synth_data):
    station = Station(write(site, SMALLEST), provider="cpu")
    station.activate("part-b")
    region = '\n[[recipes]]\nname = "holed"\nbundle = "bundles/tiny"\nroi = [0, 0, 60, 50]\nignore = [[10, 10, 20, 20]]\n'
    holed = Station(write(site, SMALLEST + region), recipe="holed", provider="cpu")
    good = np.asarray(load_rgb(sorted((synth_data[1] / "weave" / "test" / "good").glob("*.png"))[0]))
    height, width = good.shape[:2]
    assert (width, height) == (112, 96)
    station = Station(write(site, SMALLEST.replace("[0, 0, 160, 120]", "[0, 0, 60, 50]")), recipe="part-b",
                      provider="cpu")
    base = station.predict(good)
    outside = good.copy()
    outside[60:90, 70:105] = (255, 0, 0)  # a red blob below and right of the region
    moved = station.predict(outside)
    assert moved.score == base.score and moved.image_probability == base.image_probability
    assert np.array_equal(moved.anomaly_map, base.anomaly_map)
    assert base.anomaly_map.shape == (height, width) and not base.anomaly_map[50:, :].any()
    inside = good.copy()
    inside[5:25, 5:25] = (255, 0, 0)
    assert station.predict(inside).score != base.score  # the region itself is scored
    # ignore masks: a blob under one moves nothing either
    plain, masked = good.copy(), good.copy()
    masked[12:28, 12:28] = (0, 0, 255)
    assert holed.predict(masked).score == holed.predict(plain).score
    assert not holed.predict(plain).anomaly_map[12:28, 12:28].any()


def test_a_region_outside_the_frame_is_an_error_record_not_a_crash(site, target_images):
    station = Station(write(site, SMALLEST.replace("[0, 0, 160, 120]", "[500, 500, 10, 10]")), recipe="part-b",
                      provider="cpu")
    with pytest.raises(MradError, match="lies outside the 112x96 frame"):
        station.predict(target_images[0])
    sink = Records()
    LineEngine(station, [sink], batch=2, when_behind="queue").run(frames_of(target_images[:2], 3))
    assert sum("error" in r for r in sink.records) == 3


def good_parts(synth_data) -> list[str]:
    found = sorted((synth_data[1] / "weave" / "train" / "good").glob("*.png")) + \
        sorted((synth_data[1] / "weave" / "test" / "good").glob("*.png"))
    return [str(p) for p in found]


def test_enroll_then_run_needs_no_calibration_step(tf_bundle, synth_data, tmp_path):
    bundle = shutil.copytree(tf_bundle, tmp_path / "bundle")
    good = good_parts(synth_data)
    assert len(good) >= MIN_CALIBRATION_PARTS
    few = CliRunner().invoke(enroll_cli.main, ["--bundle", str(bundle), "--provider", "cpu", "--normal", good[0]])
    assert few.exit_code == 0 and "threshold not measured: 1 good parts are enrolled" in few.stderr
    assert not (tmp_path / "bundle.calibration.json").exists()
    args = ["--bundle", str(bundle), "--provider", "cpu"] + [a for g in good[1:] for a in ("--normal", g)]
    done = CliRunner().invoke(enroll_cli.main, args)
    assert done.exit_code == 0, done.output
    assert f"measured on {len(good)} enrolled good parts, each held out" in done.stderr
    ran = CliRunner().invoke(run_cli.main, ["--bundle", str(bundle), "--provider", "cpu", "--input", *good[:1],
                                            "--input", str(synth_data[1] / "weave" / "test")])
    assert ran.exit_code == 0, ran.output
    frames = [json.loads(line) for line in ran.stdout.splitlines() if '"score"' in line]
    assert frames and all(r["decision"] in ("normal", "anomalous") and "threshold_stale" not in r for r in frames)
    assert all(r["scored_by"]["enrollment"] == 2 and r["scored_by"]["calibration"] for r in frames)
    enrolled = [r for r in frames if "/good/" in r["source"]]
    assert enrolled and all(r["decision"] == "normal" for r in enrolled)  # no enrolled good part flagged


def test_calibrating_on_enrolled_images_holds_them_out(tf_bundle, synth_data, tmp_path):
    bundle = shutil.copytree(tf_bundle, tmp_path / "bundle")
    good = good_parts(synth_data)
    done = CliRunner().invoke(enroll_cli.main, ["--bundle", str(bundle), "--provider", "cpu", "--quantile", "1.0",
                                                *[a for g in good for a in ("--normal", g)]])
    assert done.exit_code == 0, done.output
    measured = json.loads((tmp_path / "bundle.calibration.json").read_text())
    out = tmp_path / "again.json"
    again = CliRunner().invoke(calibrate_cli.main, ["--bundle", str(bundle), "--provider", "cpu", "--quantile", "1.0",
                                                    "--out", str(out), *[a for g in good for a in ("--normal", g)]])
    assert again.exit_code == 0, again.output
    assert f"{len(good)} of the {len(good)} images are enrolled: each was scored with its own entries held out" \
        in again.stderr
    assert json.loads(out.read_text())["threshold"] == measured["threshold"]  # the held-out one, exactly
    thin = CliRunner().invoke(calibrate_cli.main, ["--bundle", str(bundle), "--provider", "cpu", "--out", str(out),
                                                   "--normal", good[0]])
    assert "quantile 0.99 needs 100 or more images to be estimated; from 1" in thin.stderr


def test_settings_come_from_flags_then_environment_then_file_then_defaults(site, target_images):
    path = write(site, SMALLEST + "\n[run]\ndeadline-ms = 1000\nmax-frames = 1\n")

    def deadline(*args, env=None):
        ran = CliRunner().invoke(run_cli.main, ["--station", str(path), "--provider", "cpu", "--input",
                                                str(target_images[0]), *args], env=env)
        assert ran.exit_code == 0, ran.output
        return json.loads(ran.stdout.splitlines()[-1])["deadline_ms"]

    assert deadline() == 1000
    assert deadline(env={"MRAD_DEADLINE_MS": "2000"}) == 2000
    assert deadline("--deadline-ms", "3000", env={"MRAD_DEADLINE_MS": "2000"}) == 3000


def test_a_recipe_file_changes_over_and_a_wrong_name_is_refused(site):
    station = Station(write(site, SMALLEST), provider="cpu")
    events = []
    station.on_change(events.append)
    control = site / "active.txt"
    watcher = RecipeFile(control, station, events=events.append, poll_s=0.01)
    try:
        control.write_text("part-b\n")
        watcher.check()
        assert station.active == "part-b" and events[-1]["event"] == "recipe_changed"
        control.write_text("no such recipe and a longer line to change the size\n")
        watcher.check()
        assert station.active == "part-b" and events[-1]["event"] == "recipe_refused"
    finally:
        watcher.close()


def test_the_station_file_parses_without_touching_the_disk_for_optional_keys(site):
    config = read_station(write(site, SMALLEST + '\n[outputs]\nout = "records.jsonl"\nmqtt = "mqtt://127.0.0.1/l/c"\n'))
    assert config.names == ["part-a", "part-b"]
    assert config.recipe("part-b").roi == (0, 0, 160, 120)
    assert config.outputs["out"] == str(site / "records.jsonl")
    assert parse_station({"recipes": [{"name": "x", "bundle": str(site / "bundles" / "tiny")}]}).names == ["x"]


def test_an_mqtt_command_changes_over_and_a_bad_one_is_refused(site, broker):
    """A real mosquitto on loopback: a PLC-side client publishes to TOPIC/command; the station changes over."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    from mrad.runtime.line.mqtt import MqttSink
    from mrad.runtime.line.settings import mqtt_target

    from conftest import eventually

    station = Station(write(site, SMALLEST), provider="cpu")
    events = []
    station.on_change(events.append)
    sink = MqttSink(mqtt_target(f"mqtt://127.0.0.1:{broker.port}/line3/cam1"), events=events.append, commands=station)
    plc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-plc")
    plc.connect("127.0.0.1", broker.port)
    plc.loop_start()
    try:
        # the sink subscribes once connected: send until it has taken the command (a bounded wait)
        assert eventually(lambda: plc.publish("line3/cam1/command", b'{"recipe": "part-b"}', qos=1) and
                          station.active == "part-b", seconds=20, pause=0.2)
        assert events[-1]["event"] == "recipe_changed" and events[-1]["by"] == "mqtt line3/cam1/command"
        plc.publish("line3/cam1/command", b"part-a", qos=1)  # the bare name works too
        assert eventually(lambda: station.active == "part-a", seconds=20)
        plc.publish("line3/cam1/command", b'{"recipe": "part-z"}', qos=1)
        plc.publish("line3/cam1/command", b"x" * 5000, qos=1)
        assert eventually(lambda: sum(e["event"] == "recipe_refused" for e in events) == 2, seconds=20)
        assert station.active == "part-a"
        refused = [e for e in events if e["event"] == "recipe_refused"]
        assert "no recipe named 'part-z'" in refused[0]["error"] and "at most 1024 bytes" in refused[1]["error"]
    finally:
        plc.loop_stop()
        plc.disconnect()
        sink.close(2)


def test_enroll_and_calibrate_act_on_a_recipe_of_the_station(site, synth_data):
    """mrad-enroll --station --recipe: the recipe's enrollment folder and threshold; the run uses both at once."""
    path = write(site, SMALLEST)
    good = good_parts(synth_data)
    done = CliRunner().invoke(enroll_cli.main, ["--station", str(path), "--recipe", "part-b", "--provider", "cpu",
                                                *[a for g in good for a in ("--normal", g)]])
    assert done.exit_code == 0, done.output
    kept = site / "enrollments" / "part-b" / "calibration.json"  # with the recipe's enrollment, not the bundle
    assert kept.is_file() and not (site / "bundles" / "tiny.calibration.json").exists()
    station = Station(path, recipe="part-b", provider="cpu")
    policy = station.recipe("part-b").policy
    assert policy.threshold == json.loads(kept.read_text())["threshold"] and not station.recipe("part-b").threshold_stale
    assert station.recipe("part-a").policy.threshold is None  # the other product is untouched
    again = CliRunner().invoke(calibrate_cli.main, ["--station", str(path), "--recipe", "part-b", "--provider", "cpu",
                                                    "--out", str(site / "again.json"),
                                                    *[a for g in good for a in ("--normal", g)]])
    assert again.exit_code == 0, again.output
    assert json.loads((site / "again.json").read_text())["threshold"] == policy.threshold
    wrong = CliRunner().invoke(enroll_cli.main, ["--station", str(path), "--recipe", "part-z", "--normal", good[0]])
    assert wrong.exit_code == 2 and "no recipe named 'part-z'" in wrong.output


def test_mrad_serve_takes_a_recipe_of_the_station(site):
    """mrad-serve --station FILE --recipe NAME serves that recipe: its enrollment, region and trusted keys."""
    from mrad.runtime.commands.run import station_file
    from mrad.runtime.serve.cli import served_recipe

    path = write(site, SMALLEST)
    line = {"station": str(path)}
    config = station_file(line)
    served = served_recipe(config, "part-b", None, {"threshold": 0.5, "trusted_keys": ()})
    assert served.name == "part-b" and served.enrollment == site / "enrollments" / "part-b"
    assert served.roi == (0, 0, 160, 120) and served.threshold == 0.5 and line["station"] is None
    assert served_recipe(config, None, None, {}).name == "part-a"
    with pytest.raises(MradError, match="give one or the other"):
        served_recipe(config, None, site / "bundles" / "tiny", {})
    with pytest.raises(MradError, match="no recipe named 'x'"):
        served_recipe(config, "x", None, {})


def test_the_station_and_its_sinks_come_from_the_environment_too(site, target_images):
    """MRAD_STATION names the station file; a flag still wins over its variable."""
    path = write(site, 'active = "part-b"\n' + SMALLEST)
    ran = CliRunner().invoke(run_cli.main, ["--provider", "cpu", "--input", str(target_images[0])],
                             env={"MRAD_STATION": str(path)})
    assert ran.exit_code == 0, ran.output
    frames = [json.loads(line) for line in ran.stdout.splitlines() if '"score"' in line]
    assert [r["recipe"] for r in frames] == ["part-b"]
    flagged = CliRunner().invoke(run_cli.main, ["--provider", "cpu", "--input", str(target_images[0]), "--recipe",
                                                "part-a"], env={"MRAD_STATION": str(path)})
    assert [json.loads(line)["recipe"] for line in flagged.stdout.splitlines() if '"score"' in line] == ["part-a"]


def test_a_hostile_recipe_name_is_refused_in_one_short_line(site):
    station = Station(write(site, SMALLEST), provider="cpu")
    for name in ("x" * 100_000, "\x00part-a", "part-a\n", ""):
        with pytest.raises(MradError) as caught:
            station.activate(name)
        assert len(str(caught.value)) < 200 and station.active == "part-a"
    with pytest.raises(MradError, match="a recipe is named by a string"):
        station.activate(7)
