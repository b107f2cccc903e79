"""What the Open Inference Protocol costs: mrad-serve over REST and gRPC (binary tensors) against in-process scoring.

    python -m mrad.tools.bench_protocol --bundle B --images 'parts/*.png'              # mrad-serve --local
    python -m mrad.tools.bench_protocol --bundle B --images 'parts/*.png' --mode ray   # replicas on Ray

It starts mrad-serve itself (loopback, free ports; stopped at the end) and prints one JSON line per figure:

- ``latency``: one client, one image a request (batch 1), requests one after another, the three sides
  taking turns: p50 and mean per request in-process (``Station.predict`` on the same bytes or pixels) and
  over REST and gRPC, and the overhead of each over in-process at the p50 (the target for gRPC: at most 5 %). Inputs: ``image`` (the encoded
  file, BYTES) and ``pixels`` (UINT8 [1, H, W, 3]), both as binary data.
- ``throughput``: ``--clients`` concurrent clients (threads), images a second: in-process (the same
  clients calling ``Station.predict``, and batches of ``--clients`` through ``predict_batch``) and over
  REST and gRPC, where the server forms batches.

The client library is tritonclient (the 'test' extra). Clients and server share this machine's cores,
as on a line PC; the in-process side has them to itself. No figure is asserted: this measures.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import click
import numpy as np

from mrad.runtime import Recipe, Station
from mrad.runtime.commands.common import bundle_option, command
from mrad.runtime.core.preprocess import load_rgb
from mrad.runtime.formats.station import RecipeConfig

STARTUP_S = 300  # the server opens the bundle (ViT-B-16: a few seconds; Ray: its instance first)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, mode: str, batch_wait_ms: float, max_batch_size: int) -> tuple[subprocess.Popen, int, int]:
    port, grpc_port = free_port(), free_port()
    command_line = [sys.executable, "-m", "mrad.runtime.serve.cli", "--bundle", bundle, "--provider", "cpu",
                    "--port", str(port), "--grpc-port", str(grpc_port), "--batch-wait-ms", str(batch_wait_ms),
                    "--max-batch-size", str(max_batch_size), *(["--local"] if mode == "local" else [])]
    process = subprocess.Popen(command_line, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as answer:
                if answer.status == 200:
                    return process, port, grpc_port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise click.ClickException(f"mrad-serve did not become ready: {process.stderr.read().decode()[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def clients(port: int, grpc_port: int):
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    def tensor(module, kind: str, payload):
        if kind == "image":
            found = module.InferInput("image", [1], "BYTES")
            found.set_data_from_numpy(np.array([payload], dtype=object))
        else:
            found = module.InferInput("pixels", [1, *payload.shape], "UINT8")
            found.set_data_from_numpy(payload[None])
        return found

    def rest(kind: str):
        client = http_client.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120, concurrency=1)
        outputs = [http_client.InferRequestedOutput("score", binary_data=True)]
        return lambda payload: client.infer("mrad", [tensor(http_client, kind, payload)],
                                            outputs=outputs).as_numpy("score")[0]

    def grpc(kind: str):
        client = grpc_client.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        outputs = [grpc_client.InferRequestedOutput("score")]
        return lambda payload: client.infer("mrad", [tensor(grpc_client, kind, payload)],
                                            outputs=outputs).as_numpy("score")[0]

    return {"REST": rest, "gRPC": grpc}


def interleaved(calls: dict, payloads: list, count: int) -> dict[str, list[float]]:
    """Seconds per request of each call, one request at a time, the calls taking turns (their order rotating), so
    that a machine whose other load comes and goes weighs on every side alike."""
    names = list(calls)
    for call in calls.values():
        call(payloads[0])  # warm: sessions, connections
    times: dict[str, list[float]] = {name: [] for name in names}
    for n in range(count):
        for name in names[n % len(names):] + names[:n % len(names)]:
            start = time.perf_counter()
            calls[name](payloads[n % len(payloads)])
            times[name].append(time.perf_counter() - start)
    return times


def concurrent(make_call, payloads: list, count: int, workers: int) -> float:
    """Images a second with ``workers`` clients, each with a connection of its own made in its own thread
    (tritonclient's HTTP client is bound to the thread that made it); timed once every client is warm."""
    per_worker = max(1, count // workers)
    warm = threading.Barrier(workers + 1, timeout=STARTUP_S)

    def work(w: int):
        call = make_call()
        call(payloads[0])
        warm.wait()
        for n in range(per_worker):
            call(payloads[(w + n) % len(payloads)])

    with ThreadPoolExecutor(workers) as pool:
        running = [pool.submit(work, w) for w in range(workers)]
        warm.wait()
        start = time.perf_counter()
        for done in running:
            done.result()
    return per_worker * workers / (time.perf_counter() - start)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


@command("mrad-bench-protocol")
@bundle_option
@click.option("--images", required=True, help="Glob of image files (all of one size for the pixels input).")
@click.option("--mode", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="mrad-serve --local, or replicas on a Ray instance of its own.")
@click.option("--requests", "count", default=60, show_default=True, type=click.IntRange(min=1),
              help="Requests per latency figure.")
@click.option("--throughput-requests", default=96, show_default=True, type=click.IntRange(min=1))
@click.option("--clients", "workers", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-wait-ms", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="The server's: 0 runs a lone request at once (batches still form from requests that arrive "
                   "while one runs); mrad-serve's own default is 10.")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1))
def main(bundle, images, mode, count, throughput_requests, workers, batch_wait_ms, max_batch_size):
    """Print JSON lines: latency (batch 1) and throughput of REST and gRPC against in-process scoring."""
    files = sorted(glob.glob(images))
    if not files:
        raise click.ClickException(f"--images {images}: no file matches")
    encoded = [open(path, "rb").read() for path in files]
    pixels = [np.asarray(load_rgb(path)) for path in files]
    station = Station.of(Recipe.open(RecipeConfig("default", bundle), provider="cpu"))
    manifest = station.recipe().detector.manifest
    emit(what="setup", mode=mode, model=manifest.model.get("name"), weights=manifest.model.get("weights"),
         image_size=manifest.preprocess.image_size, images=len(files), frame=list(pixels[0].shape),
         cpu=cpu_name(), cores=os.cpu_count(), batch_wait_ms=batch_wait_ms, max_batch_size=max_batch_size)
    local = {kind: (lambda payload: station.predict(payload).score) for kind in ("image", "pixels")}
    payloads = {"image": encoded, "pixels": pixels}
    process, port, grpc_port = start_server(bundle, mode, batch_wait_ms, max_batch_size)
    try:
        remote = clients(port, grpc_port)
        for kind in ("image", "pixels"):
            times = interleaved({"in-process": local[kind], **{side: make(kind) for side, make in remote.items()}},
                                payloads[kind], count)
            base = statistics.median(times["in-process"])
            for side, found in times.items():
                p50 = statistics.median(found)
                emit(what="latency", input=kind, side=side, p50_ms=round(p50 * 1000, 2),
                     mean_ms=round(statistics.fmean(found) * 1000, 2),
                     **({} if side == "in-process" else {"overhead_ms": round((p50 - base) * 1000, 2),
                                                         "overhead_pct": round(100 * (p50 - base) / base, 1)}))
        single = concurrent(lambda: local["image"], encoded, throughput_requests, workers)
        emit(what="throughput", input="image", side="in-process, Station.predict", clients=workers,
             images_per_s=round(single, 2))
        batches = [encoded[n % len(encoded)] for n in range(workers)]
        station.predict_batch(batches)
        start = time.perf_counter()
        rounds = max(1, throughput_requests // workers)
        for _ in range(rounds):
            station.predict_batch(batches)
        emit(what="throughput", input="image", side=f"in-process, predict_batch of {workers}", clients=1,
             images_per_s=round(rounds * workers / (time.perf_counter() - start), 2))
        for side, make in remote.items():
            rate = concurrent(lambda: make("image"), encoded, throughput_requests, workers)
            emit(what="throughput", input="image", side=side, clients=workers, images_per_s=round(rate, 2))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=30) as answer:
            emit(what="server batches", **json.loads(answer.read()))
    finally:
        stop_server(process)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((line for line in lines if line.startswith("flags")), "")
    return f"{name} ({'with' if 'avx512' in flags else 'without'} AVX-512)"


if __name__ == "__main__":
    main()
