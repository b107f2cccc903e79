"""The operator's page in a real browser: Debian's headless Chromium, driven by selenium through chromium-driver.

``mrad-run --web`` runs on two looping videos read at once (two cameras' worth); the test watches the page,
marks a flagged frame good, checks the refusal without the token and reloads. A second run, on a folder of
sub-folders and a video, named with --name, flags every frame: a card clicked while new frames are flagged
is the frame enrolled (the review grid holds still under the pointer).
No browser is ever downloaded: without Debian's ``chromium`` and
``chromium-driver`` (``.ci/run`` installs them) the test skips, saying so.

    MRAD_SCREENSHOT=docs/operator-page.png python -m pytest tests/test_web_browser.py

also writes the operator page guide's screenshot (docs/operator-page.png, only when asked).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from test_run_cli import write_video
from test_web import TOKEN, call, eventually, free_port, shown

pytest.importorskip("aiohttp", reason="the operator page needs the 'web' extra (aiohttp)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the 'test' extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/lib/chromium")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's headless browser: apt-get install chromium chromium-driver (.ci/run does, as root)")
WAIT_S = 60


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def line(tf_bundle, target_images, tmp_path):
    """mrad-run --web on two looping videos read concurrently, over a copy of the bundle (enrollment and
    calibration land there)."""
    videos = [write_video(tmp_path / "line.avi", target_images),
              write_video(tmp_path / "line2.avi", target_images[::-1])]
    yield from serving(tf_bundle, tmp_path, "--input", str(videos[0]), "--input", str(videos[1]))


NAMES = ["Checker line", "Cam 2"]


@pytest.fixture
def flagging_line(tf_bundle, synth_data, target_images, tmp_path):
    """mrad-run --web on a folder of sub-folders (good/, one per defect) and a video, both looping, named with
    --name; every frame is flagged (threshold 0): two new review cards a second."""
    folder = shutil.copytree(synth_data[1] / "checker" / "test", tmp_path / "checker" / "test")
    video = write_video(tmp_path / "cam2.avi", target_images)
    yield from serving(tf_bundle, tmp_path, "--input", str(folder), "--input", str(video),
                       *(a for name in NAMES for a in ("--name", name)))


def serving(tf_bundle, tmp_path, *sources):
    """mrad-run --web on ``sources`` read concurrently, looping, every frame anomalous, over a copy of the
    bundle; (url, process, folder) once it scores; stopped after."""
    bundle = shutil.copytree(tf_bundle, tmp_path / "bundle")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from mrad.runtime.commands.run import main; main()", "--bundle", str(bundle),
         *sources, "--concurrent", "--loop", "--provider", "cpu", "--threshold", "0", "--web", str(port),
         "--web-data", str(tmp_path / "operator"), "--out", str(tmp_path / "records.jsonl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "MRAD_WEB_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}/"

    def up():
        assert process.poll() is None, process.stderr.read()
        try:
            return call(url + "api/state")[1]["counts"]["frames"] > 0
        except OSError:
            return False

    try:
        assert eventually(up, WAIT_S), "mrad-run --web did not start serving"
        yield url, process, tmp_path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def number(driver, element_id):
    text = driver.find_element(By.ID, element_id).text
    return int(text) if text.isdigit() else -1


def test_the_operator_page_in_a_browser(browser, line):
    url, process, folder = line
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.05)
    browser.get(url + "#token=" + TOKEN)  # the address mrad-run prints: the page keeps the token
    browser.find_element(By.ID, "operator").send_keys("ann")

    # live: the frame counter advances, a frame with its heatmap appears
    wait.until(lambda d: number(d, "frames") > 0)
    seen = number(browser, "frames")
    wait.until(lambda d: number(d, "frames") > seen)
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('#sources img.heatmap'); return i && i.complete && i.naturalWidth > 0"))
    # side by side: one tile per source, each with its frame and heatmap
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#sources img.heatmap')].filter((i) => i.complete && i.naturalWidth > 0)"
        ".length") == 2)
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#sources .source .name")]
    # as given, in the order given; an absolute path shown by its end (no layout of the disks to anyone)
    assert names == [shown(str(folder / "line.avi")), shown(str(folder / "line2.avi"))]
    tops = browser.execute_script("return [...document.querySelectorAll('#sources .source')].map("
                                  "(t) => Math.round(t.getBoundingClientRect().top))")
    assert len(set(tops)) == 1, f"the tiles are not side by side: {tops}"
    assert browser.find_element(By.ID, "enrolled-good").text == "0"

    # a flagged frame marked good: enrolled, and that frame now scores lower
    card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#review .item button.good"))[0]
    item = card.find_element(By.XPATH, "./ancestor::div[@class='item']")
    held = item.get_attribute("data-id")
    before = float(item.find_element(By.CSS_SELECTOR, ".score").text)
    card.click()
    verdict = wait.until(lambda d: d.find_elements(
        By.CSS_SELECTOR, f"#review .item[data-id='{held}'] .verdict[data-label='normal']"))[0]
    after = float(verdict.get_attribute("data-after"))
    assert after < before
    wait.until(lambda d: d.find_element(By.ID, "enrolled-good").text == "1")
    state = call(url + "api/state")[1]
    assert state["enrollment"]["good"] == 1 and state["enrollment"]["version"] == 1
    assert "now scores" in browser.find_element(By.ID, "message").text

    # the same request without the token: refused
    status = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: "POST", headers: {"Content-Type": "application/json"},
                             body: JSON.stringify({label: "normal", operator: "ann"})}).then((r) => done(r.status));
    """, f"/api/frames/{held}/enroll")
    assert status == 403
    assert call(url + "api/state")[1]["enrollment"]["version"] == 1

    # a reload shows the same state: the verdict, the enrollment, the audit log
    browser.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR,
                                         f"#review .item[data-id='{held}'] .verdict[data-label='normal']"))
    wait.until(lambda d: d.find_element(By.ID, "enrolled-good").text == "1")
    assert "ann: enroll normal" in browser.find_element(By.ID, "audit").text
    assert browser.find_element(By.ID, "operator").get_attribute("value") == "ann"

    # recalibrated on that good part: the threshold line moves up from 0
    browser.find_element(By.ID, "recalibrate").click()
    wait.until(lambda d: d.find_element(By.ID, "threshold").text not in ("0.0000", "-"))
    screenshot = os.environ.get("MRAD_SCREENSHOT")
    if screenshot:  # only when asked: the guide's picture is regenerated on purpose, not by every run
        wait.until(lambda d: d.execute_script("return [...document.images].every((i) => i.complete)"))
        browser.save_screenshot(str(Path(screenshot).resolve()))

    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_S) == 0, process.stderr.read()
    audit = [json.loads(line) for line in (folder / "operator" / "audit.jsonl").read_text().splitlines()]
    assert [(e["operator"], e["action"], e.get("result")) for e in audit] == [
        ("ann", "enroll", None), ("ann", "enroll", "applied"), ("ann", "recalibrate", None),
        ("ann", "recalibrate", "applied")]  # each change: what was asked, on disk before it applied; its result
    summary = json.loads((folder / "records.jsonl").read_text().splitlines()[-1])
    assert summary["event"] == "summary" and summary["sinks"]["web page"]["browsers"] >= 2
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "api/state", timeout=5)  # the server stopped with the run


def hovered_card(driver):
    """The data-id of the review card whose "good" button the pointer is on, or None."""
    return driver.execute_script(
        "const b = document.querySelector('#review .item button.good:hover');"
        "return b && b.closest('.item').dataset.id")


def newest_on_page(driver):
    """The newest flagged frame the page has been sent (its state), shown or waiting."""
    return driver.execute_script("return state && state.review.length ? state.review[0].id : 0")


def test_a_card_clicked_while_frames_are_flagged_is_the_frame_enrolled(browser, flagging_line):
    url, process, folder = flagging_line
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.05)
    browser.get(url + "#token=" + TOKEN)
    browser.find_element(By.ID, "operator").send_keys("ann")

    # one tile per source given, labelled with its --name: the folder's sub-folders are not sources of their own
    wait.until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#sources .source .name")] == NAMES)
    assert [s["key"] for s in call(url + "api/state")[1]["sources"]] == NAMES
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#review .item button.good")) >= 3)
    card = browser.find_elements(By.CSS_SELECTOR, "#review .item")[0]
    assert card.find_element(By.CSS_SELECTOR, ".from").text in NAMES  # which source, which recipe
    assert card.find_element(By.CSS_SELECTOR, ".recipe").text == "recipe default"

    # the pointer on a card's "good" button; the newest card: it stays held longest
    ActionChains(browser).move_to_element(card.find_element(By.CSS_SELECTOR, "button.good")).perform()
    held = wait.until(hovered_card)
    before = {item["id"]: item for item in call(url + "api/state")[1]["review"]}
    clicked = before[int(held)]
    # new frames are flagged meanwhile, and the page has been sent them
    wait.until(lambda d: call(url + "api/state")[1]["review"][0]["id"] > max(before))
    wait.until(lambda d: newest_on_page(d) > max(before))

    ActionChains(browser).click().perform()  # where the pointer is: no move, as an operator's hand
    entry = wait.until(lambda d: next((e for e in call(url + "api/state")[1]["audit"]
                                       if e["action"] == "enroll" and "result" not in e), None))
    assert (entry["name"], entry["source"], entry["frame"]) == (clicked["name"], clicked["source"], clicked["frame"])
    assert entry["label"] == "normal" and entry["operator"] == "ann"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR,
                                         f"#review .item[data-id='{held}'] .verdict[data-label='normal']"))
    # the new cards wait, counted, while the pointer is on the grid; they are shown once it leaves
    assert int(browser.find_element(By.ID, "review-new").get_attribute("data-count")) >= 1
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    wait.until(lambda d: int(d.find_element(By.CSS_SELECTOR, "#review .item").get_attribute("data-id")) > int(held))
    wait.until(lambda d: d.find_element(By.ID, "review-new").get_attribute("data-count") == "0")

    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_S) == 0, process.stderr.read()
    summary = json.loads((folder / "records.jsonl").read_text().splitlines()[-1])
    assert list(summary["sources"]) == NAMES
