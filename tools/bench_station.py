"""What a station of several recipes costs: resident memory for 1 and N recipes on one encoder, and the changeover delay.

    python -m mrad.tools.bench_station --bundle bundles/vitb16 [--recipes 4] [--frames 40] [--images DIR]

Each station is opened in a process of its own (so that one's memory does not
count in the other's): the recipes are the same bundle under N names, each
with its own zero-shot memories and enrollment folder, so they share one
encoder session (same graph digest) as products on one backbone do. Printed:
resident memory (VmRSS) after the station has scored one frame, for 1 and N
recipes, and their ratio (target: at most 1.2).

The changeover is measured on the N-recipe station running the line engine
over a source that is always ready (batch 1): another thread activates the
next recipe at random moments, on average every ``--every`` frames. Printed: the time ``activate``
takes, the time from the call until the new recipe's first frame begins
scoring (the frame in flight finishes with the old recipe), and the time per
frame (target: the changeover delay under one frame time). Compare figures from one run: on a shared machine the absolute
times move between runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np


def resident_mb() -> float:
    """This process's resident memory (VmRSS), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def station_file(bundle: Path, recipes: int, folder: Path) -> Path:
    text = "".join(f'[[recipes]]\nname = "product-{k}"\nbundle = "{bundle.resolve()}"\n'
                   f'enrollment = "{folder / f"enrollment-{k}"}"\n\n' for k in range(recipes))
    path = folder / f"station-{recipes}.toml"
    path.write_text(text)
    return path


def frames(images: list[np.ndarray], count: int):
    from ..runtime.line.sources import Frame

    for i in range(count):
        yield Frame(source="bench", index=i, timestamp="t", image=images[i % len(images)])


def measure(station_path: str, frame_count: int, every: int, image_dir: str | None, provider: str) -> dict:
    """In this process: open the station, score one frame, read VmRSS; then the changeover run."""
    from ..runtime import Station
    from ..runtime.line.engine import LineEngine
    from ..runtime.line.sinks import Sink

    started = resident_mb()
    tic = time.perf_counter()
    station = Station(station_path, provider=provider)
    opened_s = time.perf_counter() - tic
    side = station.recipe().detector.manifest.preprocess.image_size
    rng = np.random.default_rng(0)
    if image_dir:
        from ..runtime.core.preprocess import load_rgb

        images = [np.asarray(load_rgb(p)) for p in sorted(Path(image_dir).glob("*.png"))[:8]]
    else:
        images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(4)]
    station.predict(images[0])
    rss = resident_mb()
    out = {"recipes": len(station.recipes), "sessions": len(station.sessions), "rss_mb": round(rss, 1),
           "rss_before_mb": round(started, 1), "open_s": round(opened_s, 2)}
    if len(station.recipes) < 2:
        return out

    class Timed(Sink):
        def __init__(self):
            self.seen: list[tuple[float, str, float]] = []  # (written at, recipe, latency ms)

        def write(self, record, picture=None, frame=None, anomaly_map=None):
            if "score" in record:
                self.seen.append((time.perf_counter(), record["recipe"], record["latency_ms"]))

    sink, calls = Timed(), []
    names = station.recipes

    def switch():  # at random moments, as a PLC's changeovers come: not in step with the frames
        rng, k = np.random.default_rng(1), 0
        while len(sink.seen) < 2:
            time.sleep(0.001)
        frame_s = sink.seen[-1][2] / 1000
        while len(sink.seen) < frame_count - 2 * every:
            time.sleep(float(rng.uniform(0.5, 1.5)) * every * frame_s)
            k += 1
            tic = time.perf_counter()
            station.activate(names[k % len(names)], by="bench")
            calls.append((tic, time.perf_counter(), names[k % len(names)]))

    switcher = threading.Thread(target=switch, daemon=True)
    switcher.start()
    LineEngine(station, [sink], batch=1, when_behind="queue", queue_size=2).run(frames(images, frame_count))
    switcher.join(5)
    delays, shares = [], []  # from the call until the new recipe's first frame begins scoring; that over the
    for called, returned, name in calls:  # time the frame in flight at the call took (the old recipe's last)
        k = next((k for k, (at, recipe, _) in enumerate(sink.seen) if at > called and recipe == name), None)
        if k is None or k == 0:
            continue
        at, _, latency = sink.seen[k]
        delays.append(max(0.0, at - latency / 1000 - called) * 1000)
        shares.append(delays[-1] / sink.seen[k - 1][2])
    out.update(changeovers=len(calls), activate_us=round(statistics.median((r - c) * 1e6 for c, r, _ in calls), 1),
               changeover_ms_median=round(statistics.median(delays), 2), changeover_ms_max=round(max(delays), 2),
               changeover_frames_max=round(max(shares), 3),
               frame_ms_median=round(statistics.median(lat for _, _, lat in sink.seen), 2))
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--recipes", default=4, show_default=True, type=click.IntRange(min=2, max=64))
@click.option("--frames", "frame_count", default=40, show_default=True, type=click.IntRange(min=10))
@click.option("--every", default=5, show_default=True, type=click.IntRange(min=2),
              help="Frames between changeovers, on average.")
@click.option("--images", type=click.Path(file_okay=False, exists=True),
              help="Folder of PNG frames [default: random frames at the bundle's input size].")
@click.option("--provider", default="cpu", show_default=True)
@click.option("--child", hidden=True)
def main(bundle, recipes, frame_count, every, images, provider, child):
    """Resident memory of a station of 1 and N recipes on one encoder, and its changeover delay."""
    if child:
        print(json.dumps(measure(child, frame_count, every, images, provider)))
        return
    with tempfile.TemporaryDirectory() as folder:
        results = []
        for count in (1, recipes):
            path = station_file(bundle, count, Path(folder))
            command = [sys.executable, "-m", "mrad.tools.bench_station", "--bundle", str(bundle), "--child", str(path),
                       "--frames", str(frame_count), "--every", str(every), "--provider", provider]
            if images:
                command += ["--images", str(images)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if done.returncode != 0:
                raise click.ClickException(done.stderr.strip().splitlines()[-1] if done.stderr else "child failed")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one, many = results
    click.echo(f"bundle {bundle} ({provider})")
    for r in results:
        click.echo(f"  {r['recipes']} recipe(s): {r['sessions']} encoder session(s), resident {r['rss_mb']:.1f} MB "
                   f"(opened in {r['open_s']:.2f} s)")
    click.echo(f"  {many['recipes']} recipes / 1 recipe resident memory: {many['rss_mb'] / one['rss_mb']:.3f} "
               "(target: at most 1.2)")
    click.echo(f"  changeover: activate() {many['activate_us']:.1f} us; from the call until the new recipe's first frame "
               f"begins scoring median {many['changeover_ms_median']:.1f} ms, max {many['changeover_ms_max']:.1f} ms over "
               f"{many['changeovers']} changeovers; a frame takes {many['frame_ms_median']:.1f} ms (median latency); "
               f"the delay was at most {many['changeover_frames_max']:.2f} times the time of the frame in flight at "
               "the call (target: under one frame time: only that frame finishes with the old recipe)")


if __name__ == "__main__":
    main()
