"""The operator's page without a browser: token, 403, audit log, loopback default, bounded per-browser queues.

Each server is started here on a free loopback port and stopped at the end;
waits are bounded and end on the awaited condition. The browser test is
tests/test_web_browser.py.
"""

import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("aiohttp", reason="the operator page needs the 'web' extra (aiohttp)")

from mrad.runtime import Detector, MradError  # noqa: E402
from mrad.runtime.commands import run as run_cli  # noqa: E402

from mrad.runtime.formats import calibration

from mrad.runtime.commands import common as cli
from mrad.runtime.line.engine import LineEngine  # noqa: E402
from mrad.runtime.line.records import frame_record  # noqa: E402
from mrad.runtime.line.sources import file_frames  # noqa: E402
from mrad.runtime.web import OperatorPage  # noqa: E402
from mrad.runtime.web.server import is_loopback, parse_address  # noqa: E402
from mrad.runtime.web.audit import GENESIS, digest, verify  # noqa: E402
from mrad.runtime.web.teach import AUDIT_NAME, region_mask  # noqa: E402
from mrad.runtime.web.redact import text as shown  # noqa: E402
from mrad.runtime.web.view import LineView, source_key  # noqa: E402
from conftest import eventually, free_port  # noqa: E402

TOKEN = "Xq3-vT9_kLm2Rw8ZpN4bHc"  # 22 characters of token_urlsafe: 132 bits


def call(url, body=None, token=None):
    """(status, JSON answer) of a GET, or of a POST when ``body`` is given."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def line(tf_bundle, target_images, tmp_path):
    """A page on a free loopback port over a copy of the bundle, fed by a real engine's records; stopped after."""
    bundle = shutil.copytree(tf_bundle, tmp_path / "bundle")
    detector = Detector(bundle, provider="cpu")
    engine = LineEngine(detector, threshold=0.0)
    page = OperatorPage(engine.station, ("127.0.0.1", 0), TOKEN, tmp_path / "operator")
    engine.sinks.append(page)
    try:
        yield SimpleNamespace(detector=detector, engine=engine, page=page, url=page.url, images=target_images,
                              data=tmp_path / "operator", bundle=bundle)
    finally:
        page.close(5)


def feed(line, count):
    """Score ``count`` frames and hand the page what the engine hands its sinks."""
    frames = file_frames([str(p) for p in line.images], loop=True)
    for _ in range(count):
        frame = next(frames)
        result = line.engine.station.predict(frame.image)
        record = frame_record(frame, result, 1.0)
        line.page.write(record, None, frame=frame.image, anomaly_map=result.anomaly_map)


def flagged(line):
    """The frames held for the operator: the review queue's, then each source's latest."""
    status, state = call(line.url + "api/state")
    assert status == 200
    return state["review"] + [s["latest"] for s in state["sources"] if s["latest"]["flag"] is None]


def test_address_is_loopback_unless_a_host_is_given():
    assert parse_address("8080") == ("127.0.0.1", 8080)
    assert parse_address("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    for bad in ("", "host:", "8080:x", "99999"):
        with pytest.raises(MradError, match="PORT or HOST:PORT"):
            parse_address(bad)


def test_the_page_listens_on_loopback_only(line):
    """The socket the page listens on is bound to 127.0.0.1 alone: nothing beyond this machine can reach it."""
    assert line.url.startswith("http://127.0.0.1:")
    assert [host for host, _ in line.page.server._runner.addresses] == ["127.0.0.1"]


def test_reading_needs_no_token_changing_does(line):
    feed(line, 3)
    status, state = call(line.url + "api/state")
    assert status == 200 and state["counts"]["frames"] == 3 and state["enrollment"]["good"] == 0
    with urllib.request.urlopen(line.url, timeout=30) as page:
        assert b"<title>mrad-edge" in page.read()
    item = flagged(line)[0]
    with urllib.request.urlopen(f"{line.url}api/frames/{item['id']}.jpg", timeout=30) as picture:
        assert picture.headers["Content-Type"] == "image/jpeg" and picture.read(3) == b"\xff\xd8\xff"
    source = state["sources"][-1]
    latest = f"{line.url}api/latest.jpg?show=image&source={urllib.parse.quote(source['key'])}"
    with urllib.request.urlopen(latest, timeout=30) as picture:
        assert int(picture.headers["X-Frame-Id"]) == source["latest"]["id"] and picture.read(3) == b"\xff\xd8\xff"

    change = {"label": "normal", "operator": "ann"}
    for token in (None, "wrong", TOKEN.upper()):
        status, answer = call(f"{line.url}api/frames/{item['id']}/enroll", change, token)
        assert status == 403 and "token" in answer["error"]
    for path, body in (("api/undo", {"operator": "ann"}), ("api/threshold", {"operator": "ann", "value": 0.5})):
        assert call(line.url + path, body)[0] == 403
    assert line.detector.enrollment_version is None and not (line.data / AUDIT_NAME).exists()

    status, answer = call(f"{line.url}api/frames/{item['id']}/enroll", change, TOKEN)
    assert status == 200, answer
    verdict = answer["done"]
    assert verdict["score_after"] < verdict["score_before"] == item["score"]
    assert answer["state"]["enrollment"] == {"version": 1, "can_enroll": True, "good": 1, "defects": 0}
    assert line.detector.enrollment_version == 1  # the live detector: the next frame is scored with it
    rescored = line.detector.predict(line.page.view.get(item["id"]).image).score
    assert rescored == pytest.approx(verdict["score_after"], abs=1e-6)


def test_every_change_is_audited_and_the_log_only_grows(line):
    feed(line, 20)
    audit = line.data / AUDIT_NAME
    first, second = flagged(line)[:2]
    assert call(f"{line.url}api/frames/{first['id']}/enroll", {"label": "normal", "operator": "ann"}, TOKEN)[0] == 200
    before = audit.read_bytes()
    status, answer = call(f"{line.url}api/frames/{second['id']}/enroll",
                          {"label": "defect", "operator": "bo", "region": [0.25, 0.25, 0.75, 0.5]}, TOKEN)
    assert status == 200, answer
    status, answer = call(line.url + "api/threshold", {"operator": "cy", "recalibrate": True}, TOKEN)
    assert status == 200, answer
    threshold = answer["done"]["threshold"]
    policy = line.engine.station.recipe().policy
    assert policy.threshold == threshold == answer["state"]["threshold"]["value"]  # applied to the running line
    saved = calibration.load(calibration.default_path(line.bundle), line.bundle, "exact")
    assert saved.enrollment == line.detector.enrollment_version
    assert saved.threshold == threshold  # and what mrad-run reads at its next start
    assert call(line.url + "api/undo", {"operator": "di"}, TOKEN)[0] == 200
    assert line.detector.enrollment.version == 1 and answer["state"]["threshold"]["stale"] is False
    assert call(line.url + "api/state")[1]["threshold"]["stale"] is True  # measured with the version undone

    text = audit.read_bytes()
    assert text.startswith(before)  # appended to, never rewritten
    lines = text.decode().splitlines()
    entries = [json.loads(line_) for line_ in lines]
    asked, results = entries[0::2], entries[1::2]  # each change: what was asked (written first), then its result
    assert [(e["operator"], e["action"]) for e in asked] == [("ann", "enroll"), ("bo", "enroll"), ("cy", "recalibrate"),
                                                             ("di", "undo")]
    assert [(e["action"], e["result"]) for e in results] == [(e["action"], "applied") for e in asked]
    assert all(e["time"] for e in entries) and not any("result" in e for e in asked)
    assert [e["prev"] for e in entries] == [GENESIS] + [digest(line_.encode()) for line_ in lines[:-1]]  # a chain
    assert [e["of"] for e in results] == [digest(line_.encode()) for line_ in lines[0::2]]
    assert asked[0]["label"] == "normal" and asked[0]["version_before"] is None and results[0]["version"] == 1
    assert asked[1]["label"] == "defect" and asked[1]["region"] == [0.25, 0.25, 0.75, 0.5]
    assert asked[2]["threshold_before"] == 0.0 and asked[2]["parts"] == 1 and results[2]["threshold"] == threshold
    assert asked[3]["version_before"] == 2 and results[3]["version"] == 1
    assert verify(audit).intact
    parts = sorted(p.name for p in (line.data / "parts").iterdir())
    assert len(parts) == 3 and sum(name.endswith("-mask.png") for name in parts) == 1
    shown = call(line.url + "api/state")[1]["audit"]
    assert (shown[0]["action"], shown[0]["result"], shown[1]["operator"]) == ("undo", "applied", "di")  # newest first


def test_bad_changes_are_refused_with_a_reason(line):
    feed(line, 2)
    item = flagged(line)[0]
    url = f"{line.url}api/frames/{item['id']}/enroll"
    for body, reason in (({"label": "normal"}, "operator name"), ({"label": "fine", "operator": "ann"}, "label"),
                         ({"label": "normal", "operator": "ann", "region": [0, 0, 1, 1]}, "only for label defect"),
                         ({"label": "defect", "operator": "ann", "region": [0.5, 0, 0.2, 1]}, "not a rectangle")):
        status, answer = call(url, body, TOKEN)
        assert status == 400 and reason in answer["error"]
    assert call(f"{line.url}api/frames/999999/enroll", {"label": "normal", "operator": "ann"}, TOKEN)[0] == 404
    assert "nothing to undo" in call(line.url + "api/undo", {"operator": "ann"}, TOKEN)[1]["error"]
    assert "no enrolled good part" in call(line.url + "api/threshold", {"operator": "ann", "recalibrate": True},
                                           TOKEN)[1]["error"]
    assert call(line.url + "api/threshold", {"operator": "ann", "value": "high"}, TOKEN)[0] == 400


def test_a_drawn_region_becomes_the_mask():
    mask = region_mask([0.25, 0.5, 0.75, 1.0], (4, 8))
    assert mask.dtype == np.uint8 and mask.shape == (4, 8)
    assert np.argwhere(mask).min(axis=0).tolist() == [2, 2] and np.argwhere(mask).max(axis=0).tolist() == [3, 5]
    assert region_mask([0.0, 0.0, 0.01, 0.01], (4, 8)).sum() == 255  # a tiny drag still marks one pixel


def scored(frame_number, score=0.5, source="cam"):
    return {"source": source, "frame": frame_number, "timestamp": "t", "score": score, "decision": "anomalous",
            "latency_ms": 1.0}


def test_a_browser_that_does_not_read_loses_its_oldest_updates_never_holds_up_writes():
    view = LineView()
    stalled = [view.subscribe(size=4) for _ in range(50)]
    image, anomaly_map = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)
    tic = time.perf_counter()
    for i in range(2000):
        view.write(scored(i), frame=image, anomaly_map=anomaly_map)
    per_write = (time.perf_counter() - tic) / 2000
    assert per_write < 0.002, f"{per_write * 1e6:.0f} us a record with 50 stalled browsers"  # measured: ~30 us
    for mailbox in stalled:
        assert len(mailbox.messages) == 4 and mailbox.dropped == 1996
        assert [m["frame"] for m in mailbox.messages] == [1996, 1997, 1998, 1999]  # the newest are kept
    reading = view.subscribe(size=4)
    view.write(scored(2000), frame=image, anomaly_map=anomaly_map)
    assert [m["frame"] for m in view.take(reading)] == [2000] and view.take(reading) == []
    assert len(view.held) <= 1 + 16  # the latest frame and the review queue: memory stays bounded


def test_the_review_queue_samples_flagged_frames():
    now = [0.0]
    view = LineView(clock=lambda: now[0])
    image, anomaly_map = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)
    for i in range(40):
        now[0] = i * 0.25
        record = {**scored(i, score=[0.5, 0.95, 1.5][i % 3]), "decision": "anomalous" if i % 3 == 2 else "normal",
                  "scored_by": {"threshold": 1.0}}
        view.write(record, frame=image, anomaly_map=anomaly_map)
    review = view.snapshot()["review"]
    assert review and all(item["flag"] in ("anomalous", "borderline") for item in review)
    times = sorted(item["frame"] * 0.25 for item in review)
    assert min(np.diff(times)) >= 1.0  # one a second per source at most
    assert source_key("/data/parts/a.png") == "/data/parts" and source_key("rtsp://cam/1") == "rtsp://cam/1"


def test_a_stalled_event_stream_does_not_slow_the_line(line):
    """A client that opens the event stream and never reads: the line scores on; others are still served."""
    port = int(line.url.rsplit(":", 1)[1].strip("/"))
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    try:
        stalled.sendall(f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        assert eventually(lambda: call(line.url + "api/state")[1]["clients"] == 1)
        tic = time.perf_counter()
        frames = file_frames([str(p) for p in line.images], loop=True)
        line.engine.sinks = [line.page]
        summary = line.engine.run(iter([next(frames) for _ in range(200)]))
        assert summary["frames"] == 200 and summary["output_errors"] == 0
        assert line.page.view.counts["frames"] == 200
        assert time.perf_counter() - tic < 60
    finally:
        stalled.close()
    assert "updates_skipped" in summary["sinks"]["web page"]


def test_mrad_run_options(tf_bundle, target_images, tmp_path, monkeypatch):
    runner = CliRunner()
    text = runner.invoke(run_cli.main, ["--help"]).output
    assert "--web [HOST:]PORT" in text and "MRAD_WEB_TOKEN" in text and "--web 8080" in text
    refused = runner.invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(target_images[0]),
                                           "--web-token", "x"])
    assert refused.exit_code == cli.EXIT_BAD_ARGUMENTS and "add --web" in refused.stderr
    bad = runner.invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(target_images[0]), "--web", "a:b"])
    assert bad.exit_code == cli.EXIT_BAD_ARGUMENTS and "HOST:PORT" in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = runner.invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(target_images[0]), "--provider",
                                            "cpu", "--web", str(taken.getsockname()[1]), "--web-data",
                                            str(tmp_path / "op")])
    assert busy.exit_code == cli.EXIT_BAD_ARGUMENTS and "cannot listen on 127.0.0.1" in busy.stderr

    looped = runner.invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(target_images[0]),
                                          "--input", str(target_images[1]), "--loop", "--max-frames", "5",
                                          "--provider", "cpu", "--web", "0", "--web-data", str(tmp_path / "op")])
    assert looped.exit_code == 0, looped.output
    records = [json.loads(r) for r in looped.stdout.splitlines()]
    assert [r["frame"] for r in records if "event" not in r] == [0, 1, 2, 3, 4]
    assert [r["source"] for r in records[:3]] == [str(target_images[0]), str(target_images[1]), str(target_images[0])]
    assert "operator page: http://127.0.0.1:" in looped.stderr and "#token=" in looped.stderr  # a token made up

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # the 'web' extra not installed
    monkeypatch.delitem(sys.modules, "mrad.runtime.web.server")
    missing = runner.invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(target_images[0]), "--web", "0"])
    assert missing.exit_code == cli.EXIT_BAD_ARGUMENTS and 'mrad-edge[web]' in missing.stderr


def test_every_browser_is_pushed_a_change_even_while_the_line_is_idle(line):
    feed(line, 2)
    item = flagged(line)[0]
    with urllib.request.urlopen(line.url + "api/events", timeout=30) as stream:
        events = (raw.decode().strip() for raw in stream)
        assert next(events) == "event: state"
        first = json.loads(next(events).removeprefix("data: "))
        assert first["counts"]["frames"] == 2 and len(first["scores"]) == 2 and first["enrollment"]["good"] == 0
        assert call(f"{line.url}api/frames/{item['id']}/enroll", {"label": "normal", "operator": "ann"}, TOKEN)[0] == 200
        for text in events:  # no frame came meanwhile: the change alone is pushed (the read times out otherwise)
            if text.startswith("data: "):
                update = json.loads(text.removeprefix("data: "))
                break
    assert update["new"] == [] and update["enrollment"]["good"] == 1 and update["audit"][0]["operator"] == "ann"


def test_two_sources_at_once_each_have_their_tile(tf_bundle, target_images, tmp_path):
    """mrad-run --web with two recordings read concurrently: both tiles advance, each source numbered on its own."""
    import signal
    import subprocess

    from test_run_cli import write_video

    videos = [write_video(tmp_path / "cam1.avi", target_images[:3]), write_video(tmp_path / "cam2.avi",
                                                                                  target_images[3:8])]
    port, out = free_port(), tmp_path / "records.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-c", "from mrad.runtime.commands.run import main; main()", "--bundle", str(tf_bundle),
         "--input", str(videos[0]), "--input", str(videos[1]), "--concurrent", "--loop", "--provider", "cpu",
         "--threshold", "0.5", "--web", str(port), "--web-data", str(tmp_path / "operator"),
         "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "MRAD_WEB_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}/"

    def tiles():
        assert process.poll() is None, process.stderr.read()
        try:
            state = call(url + "api/state")[1]
        except OSError:
            return {}
        return {s["key"]: s["latest"]["frame"] for s in state["sources"] if s["latest"]}

    try:
        assert eventually(lambda: len(tiles()) == 2, 120), "two tiles, each with a scored frame"
        first = tiles()
        assert set(first) == {shown(str(v)) for v in videos}  # an absolute path is shown by its end (redact)
        assert eventually(lambda: all(tiles()[key] > frame for key, frame in first.items()), 120), "both advance"
        state = call(url + "api/state")[1]
        assert all(s["health"] == "ok" and s["frames"] > 0 for s in state["sources"])
        picture = f"{url}api/latest.jpg?source={urllib.parse.quote(shown(str(videos[1])))}"
        with urllib.request.urlopen(picture, timeout=30) as answer:
            assert answer.read(3) == b"\xff\xd8\xff"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0, process.stderr.read()
        process.stderr.close()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summary = records[-1]
    assert summary["event"] == "summary" and summary["stopped_by"] == "SIGTERM"
    for video in videos:
        numbers = [r["frame"] for r in records if r.get("source") == str(video) and "event" not in r]
        assert numbers == list(range(len(numbers))) and summary["sources"][str(video)]["frames"] == len(numbers)


def test_the_page_changes_over_between_recipes_with_the_token(site_station):
    """A station of two recipes behind the page: POST /api/recipe switches (audited), a wrong name is refused."""
    url, station, data = site_station
    status, _ = call(url + "api/recipe", {"operator": "ann", "recipe": "part-b"})
    assert status == 403 and station.active == "part-a"  # no token, as every change
    status, answer = call(url + "api/recipe", {"operator": "ann", "recipe": "part-b"}, TOKEN)
    assert status == 200 and station.active == "part-b"
    assert answer["state"]["recipe"] == {"active": "part-b", "recipes": ["part-a", "part-b"]}
    assert answer["done"]["recipe_before"] == "part-a" and answer["done"]["recipe"] == "part-b"
    status, answer = call(url + "api/recipe", {"operator": "ann", "recipe": "part-z"}, TOKEN)
    assert status == 400 and "no recipe named 'part-z'" in answer["error"] and station.active == "part-b"
    audit = [json.loads(line) for line in (data / AUDIT_NAME).read_text().splitlines()]
    assert [(e["action"], e.get("result")) for e in audit] == [("recipe", None), ("recipe", "applied")]
    assert audit[0]["operator"] == "ann" and audit[0]["recipe_before"] == "part-a"


@pytest.fixture
def site_station(tf_bundle, tmp_path):
    from mrad.runtime import Station

    shutil.copytree(tf_bundle, tmp_path / "bundles" / "tiny")
    (tmp_path / "station.toml").write_text('[[recipes]]\nname = "part-a"\nbundle = "bundles/tiny"\n\n'
                                           '[[recipes]]\nname = "part-b"\nbundle = "bundles/tiny"\nroi = [0, 0, 60, 50]\n')
    station = Station(tmp_path / "station.toml", provider="cpu")
    page = OperatorPage(station, ("127.0.0.1", 0), TOKEN, tmp_path / "operator")
    try:
        yield page.url, station, tmp_path / "operator"
    finally:
        page.close(5)


def test_each_source_is_one_tile_named_as_the_user_gave_it():
    """A folder of sub-folders is one source (one tile), named by its path as typed or by --name; files, globs,
    cameras and events about a source find their tile; a source not heard from yet has its tile already."""
    image, anomaly_map = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)
    view = LineView(sources={"data/checker/test": ("data/checker/test",)})
    for i, sub in enumerate(("good", "blob", "good", "scratch")):
        view.write({**scored(i, source=f"data/checker/test/{sub}/{i:03d}.png"), "recipe": "part-a"},
                   frame=image, anomaly_map=anomaly_map)
    state = view.snapshot()
    assert [s["key"] for s in state["sources"]] == ["data/checker/test"] and state["sources"][0]["frames"] == 4
    card = state["review"][0]
    assert card["name"] == "data/checker/test" and card["recipe"] == "part-a"
    assert card["source"] == "data/checker/test/good/000.png" and card["frame"] == 0

    named = {"Line A": ("./line-a",), "Line B": ("line-b/*.png", "line-b/extra"), "dock": ("rtsp://10.0.0.5/s",),
             "spare": ("1",)}
    view = LineView(sources=named)
    assert [s["key"] for s in view.snapshot()["sources"]] == list(named)  # all four, before any frame
    for number, source in enumerate(("line-a/good/0.png", "line-a/blob/deep/1.png", "line-b/2.png",
                                     "line-b/extra/sub/3.png", "rtsp://10.0.0.5/s", "elsewhere/4.png")):
        view.write(scored(number, source=source), frame=image, anomaly_map=anomaly_map)
    view.write({"event": "camera_lost", "timestamp": "t", "source": "rtsp://10.0.0.5/s"})
    view.write({"event": "source_failed", "timestamp": "t", "source": "spare", "error": "gone"})
    sources = {s["key"]: s for s in view.snapshot()["sources"]}
    assert {key: s["frames"] for key, s in sources.items()} == {"Line A": 2, "Line B": 2, "dock": 1, "spare": 0,
                                                                  "elsewhere": 1}  # matched nothing: by folder
    assert sources["dock"]["health"] == "lost" and sources["spare"]["health"] == "failed"
    assert sources["Line B"]["latest"]["name"] == "Line B"


class KeptPage:
    """OperatorPage, kept once made: its view is read after mrad-run has returned."""

    made = []

    def __new__(cls, *args, **kwargs):
        page = OperatorPage(*args, **kwargs)
        cls.made.append(page)
        return page


def test_mrad_run_names_sources_on_the_page_and_in_the_summary(tf_bundle, synth_data, tmp_path, monkeypatch):
    import mrad.runtime.web as web_package

    monkeypatch.setattr(web_package, "OperatorPage", KeptPage)
    KeptPage.made.clear()
    runner = CliRunner()
    folder = shutil.copytree(synth_data[1] / "checker" / "test", tmp_path / "checker" / "test")
    assert len([p for p in folder.iterdir() if p.is_dir()]) > 1  # good/, and a folder per defect
    base = ["--bundle", str(tf_bundle), "--provider", "cpu", "--threshold", "0", "--web", "0",
            "--web-data", str(tmp_path / "op")]

    typed = runner.invoke(run_cli.main, base + ["--input", str(folder), "--max-frames", "6"])
    assert typed.exit_code == 0, typed.output
    view = KeptPage.made[-1].view
    assert [s.key for s in view.sources.values()] == [str(folder)] and view.sources[str(folder)].frames == 6

    other = shutil.copytree(folder, tmp_path / "copy")
    named = runner.invoke(run_cli.main, base + ["--input", str(folder), "--input", str(other), "--concurrent",
                                                "--name", "Checker line", "--name", "Spare line", "--max-frames", "4"])
    assert named.exit_code == 0, named.output
    view = KeptPage.made[-1].view
    assert {s.key: s.frames for s in view.sources.values()} == {"Checker line": 4, "Spare line": 4}
    for key, root in (("Checker line", folder), ("Spare line", other)):
        assert Path(view.held[view.sources[key].latest].record["source"]).is_relative_to(root)
    summary = json.loads(named.stdout.splitlines()[-1])
    assert list(summary["sources"]) == ["Checker line", "Spare line"]

    image = str(next(folder.rglob("*.png")))
    for names, reason in ((["a", "b"], "--name: 2 names for 1 sources"),
                          (["x" * 65], "1 to 64 printable characters"), (["tab\there"], "printable"),
                          ([" "], "printable")):
        refused = runner.invoke(run_cli.main, base + ["--input", image] + [a for n in names for a in ("--name", n)])
        assert refused.exit_code == cli.EXIT_BAD_ARGUMENTS and reason in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    twice = runner.invoke(run_cli.main, base + ["--input", image, "--input", str(other), "--concurrent",
                                                "--name", "same", "--name", "same"])
    assert twice.exit_code == cli.EXIT_BAD_ARGUMENTS and "same given twice" in twice.stderr
