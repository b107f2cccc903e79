"""What the operator's page costs the line per frame: without it, with it and no browser, with a browser.

    python -m mrad.tools.bench_web --bundle B --input line.avi [--frames 2000] [--repeats 3]

Scores ``--frames`` frames of ``--input`` (read again and again, as
``mrad-run --loop``) through the real line engine, with records to
/dev/null, three ways, interleaved ``--repeats`` times: no page; the page
served with no browser connected; the page open in headless Chromium
(Debian's ``chromium`` and ``chromium-driver``, through selenium; skipped
without them). Prints per way the median frames/s, ms per frame and latency
p50/p95 over the repeats, and the difference to no page. The browser runs on
the same CPU here: on a line PC it is usually elsewhere, so that row is the
worst case.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import click
import numpy as np

from ..runtime.core.detector import Detector
from ..runtime.line.engine import LineEngine
from ..runtime.line.sinks import JsonLines
from ..runtime.line.sources import file_frames
from ..runtime.web import OperatorPage
from ..runtime.web.tokens import new_token

WAYS = ("no page", "page, no browser", "page + browser")
TOKEN = new_token()  # 128 bits, as the page asks of every token


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def _once(detector: Detector, inputs: tuple[str, ...], frames: int, way: str, browser, data: Path) -> dict:
    with open(os.devnull, "wb") as devnull:
        engine = LineEngine(detector, [JsonLines(devnull)], threshold=0.35,
                            when_behind="queue")
        if way != "no page":
            page = OperatorPage(engine.station, ("127.0.0.1", 0), TOKEN, data)
            engine.sinks.append(page)
            if way == "page + browser":
                browser.get(page.url)
                deadline = time.monotonic() + 30
                while page.view.snapshot(history=False)["clients"] < 1:  # its event stream is open
                    if time.monotonic() > deadline:
                        raise click.ClickException("the browser did not open the page's event stream in 30 s")
                    time.sleep(0.05)
        summary = engine.run(islice(file_frames(inputs, loop=True), frames))
    if "latency_p50_ms" not in summary:
        raise click.ClickException(f"no frame of {', '.join(inputs)} could be scored")
    if way == "page + browser":
        browser.get("about:blank")
    return summary


@click.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--input", "inputs", multiple=True, required=True, help="Video or image files, read in a loop.")
@click.option("--frames", default=2000, show_default=True, type=click.IntRange(min=10))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
def main(bundle: Path, inputs: tuple[str, ...], frames: int, repeats: int) -> None:
    detector = Detector(bundle, provider="cpu")
    browser = _browser()
    ways = WAYS if browser is not None else WAYS[:2]
    if browser is None:
        click.echo("no chromium and chromium-driver: the browser row is left out", err=True)
    results: dict[str, list[dict]] = {way: [] for way in ways}
    try:
        with tempfile.TemporaryDirectory() as folder:
            _once(detector, inputs, min(frames, 100), "no page", browser, Path(folder))  # warm-up
            for _ in range(repeats):
                for way in ways:
                    results[way].append(_once(detector, inputs, frames, way, browser, Path(folder)))
    finally:
        if browser is not None:
            browser.quit()
    base = None
    for way in ways:
        fps = float(np.median([r["fps"] for r in results[way]]))
        p50 = float(np.median([r["latency_p50_ms"] for r in results[way]]))
        p95 = float(np.median([r["latency_p95_ms"] for r in results[way]]))
        ms = 1000.0 / fps
        base = ms if base is None else base
        click.echo(f"{way:18s} {fps:7.1f} frames/s  {ms:6.2f} ms/frame ({ms - base:+.2f})  "
                   f"latency p50 {p50:5.2f} ms  p95 {p95:5.2f} ms  (median of {repeats} runs of {frames} frames)")


if __name__ == "__main__":
    main()
