"""The operator's page in a real browser: Debian's headless Chromium, driven by selenium through chromium-driver.

``mrad-run --web`` runs on two looping videos read at once (two cameras' worth); the test watches the page,
marks a flagged frame good, checks the refusal without the token and reloads.
No browser is ever downloaded: without Debian's ``chromium`` and
``chromium-driver`` (``.ci/run`` installs them) the test skips, saying so.

    MRAD_SCREENSHOT=docs/operator-page.png python -m pytest tests/test_web_browser.py

also writes the README's screenshot of the page (only when asked).
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
from test_web import TOKEN, call, eventually, free_port

pytest.importorskip("aiohttp", reason="the operator page needs the 'web' extra (aiohttp)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the 'test' extra)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
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
    bundle = shutil.copytree(tf_bundle, tmp_path / "bundle")
    videos = [write_video(tmp_path / "line.avi", target_images),
              write_video(tmp_path / "line2.avi", target_images[::-1])]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from mrad.runtime.commands.run import main; main()", "--bundle", str(bundle),
         "--input", str(videos[0]), "--input", str(videos[1]), "--concurrent", "--loop", "--provider", "cpu",
         "--threshold", "0", "--web", str(port),
         "--web-token", TOKEN, "--web-data", str(tmp_path / "operator"), "--out", str(tmp_path / "records.jsonl")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    assert sorted(names) == ["line.avi", "line2.avi"]
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
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#review .item[data-id='{held}'] .verdict[data-label='normal']"))
    wait.until(lambda d: d.find_element(By.ID, "enrolled-good").text == "1")
    assert "ann: enroll normal" in browser.find_element(By.ID, "audit").text
    assert browser.find_element(By.ID, "operator").get_attribute("value") == "ann"

    # recalibrated on that good part: the threshold line moves up from 0
    browser.find_element(By.ID, "recalibrate").click()
    wait.until(lambda d: d.find_element(By.ID, "threshold").text not in ("0.0000", "-"))
    screenshot = os.environ.get("MRAD_SCREENSHOT")
    if screenshot:  # only when asked: the README's picture is regenerated on purpose, not by every run
        wait.until(lambda d: d.execute_script("return [...document.images].every((i) => i.complete)"))
        browser.save_screenshot(str(Path(screenshot).resolve()))

    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_S) == 0, process.stderr.read()
    audit = [json.loads(line) for line in (folder / "operator" / "audit.jsonl").read_text().splitlines()]
    assert [(e["operator"], e["action"]) for e in audit] == [("ann", "enroll"), ("ann", "recalibrate")]
    summary = json.loads((folder / "records.jsonl").read_text().splitlines()[-1])
    assert summary["event"] == "summary" and summary["sinks"]["web page"]["browsers"] >= 2
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "api/state", timeout=5)  # the server stopped with the run
