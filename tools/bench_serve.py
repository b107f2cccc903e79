"""Latency and throughput of a running mrad-serve's POST /predict against in-process Detector.predict.

    python -m mrad.tools.bench_serve --bundle B --url http://127.0.0.1:8000 --images 'parts/*.png'

Both sides score the same image files; clients are threads, as cameras would be processes.
"""

from __future__ import annotations

import glob
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import click
import numpy as np

from mrad.runtime import Detector
from mrad.runtime.commands.common import bundle_option, command


def figures(latencies_s: list[float], wall_s: float) -> dict:
    ms = np.asarray(latencies_s) * 1000
    return {"requests": len(ms), "per_s": round(len(ms) / wall_s, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def timed(call, payloads: list, clients: int) -> dict:
    def one(payload):
        start = time.perf_counter()
        call(payload)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, payloads))
    return figures(latencies, time.perf_counter() - start)


@command("mrad-bench-serve")
@bundle_option
@click.option("--url", required=True, help="A running mrad-serve, such as http://127.0.0.1:8000, or "
                                            "http://127.0.0.1:8000/NAME for one started with --name NAME.")
@click.option("--images", required=True, help="Glob of image files.")
@click.option("--requests", "count", default=400, show_default=True, type=click.IntRange(min=1))
@click.option("--clients", default=(1, 16), multiple=True, show_default=True, type=click.IntRange(min=1),
              help="Concurrent clients; repeat for several runs.")
def main(bundle, url, images, count, clients):
    """Print one JSON line per (side, clients): requests, per_s, p50_ms, p95_ms."""
    files = sorted(glob.glob(images))
    payloads = [open(files[i % len(files)], "rb").read() for i in range(count)]
    detector = Detector(bundle, provider="cpu")
    detector.predict(payloads[0])  # first call pays for ONNX Runtime's allocations

    def post(data: bytes):
        request = urllib.request.Request(f"{url}/predict", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as answer:
            answer.read()

    for n in clients:
        print(json.dumps({"side": "in-process Detector.predict", "clients": n, **timed(detector.predict, payloads, n)}))
        print(json.dumps({"side": "mrad-serve POST /predict", "clients": n, **timed(post, payloads, n)}))


if __name__ == "__main__":
    main()
