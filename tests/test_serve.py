"""mrad-serve on a real two-node Ray cluster on this machine: same scores, batching, a replica killed under load.

The cluster is ray.cluster_utils.Cluster: two raylets on 127.0.0.1, one CPU each, started by
this process and stopped by it (``ray stop`` would stop every Ray process on the machine,
other users' included).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mrad.runtime import Detector
from mrad.runtime.errors import ImageError, MradError
from mrad.runtime.preprocess import load_rgb
from mrad.runtime.serve import APP_NAME
from mrad.runtime.serve.cli import LOOPBACK_ONLY, parse_autoscale
from mrad.runtime.serve.http import IMAGE_FIELD, decoded_png, image_bytes

# Served scores against in-process Detector.predict: batches of up to 8 through ONNX Runtime may
# round differently from batches of one, and records carry 6 decimals.
SCORE_TOLERANCE = 1e-5
REQUESTS = 240  # concurrent requests in the load test, and again while a replica is killed
CLIENTS = 16  # client threads
STARTUP_S = 150  # bounded waits: the cluster, the application, a replaced replica


# -- without Ray: what a request carries ---------------------------------------------------------


def multipart(field: str, data: bytes, boundary: str = "mradboundary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nline 3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"part.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_image_from_raw_body_and_multipart(target_images):
    data = target_images[0].read_bytes()
    assert image_bytes(data, "image/png") == data
    assert image_bytes(*multipart(IMAGE_FIELD, data)) == data
    with pytest.raises(ImageError, match="no 'image' field"):
        image_bytes(*multipart("picture", data))


def test_bytes_decode_like_files(target_images, tmp_path):
    path = target_images[0]
    assert np.array_equal(np.asarray(load_rgb(path.read_bytes())), np.asarray(load_rgb(path)))
    broken = path.read_bytes()[:200]
    with pytest.raises(ImageError, match="could not be decoded .*check the file is a complete image"):
        load_rgb(broken)


def test_without_ray_the_command_names_the_extra(tf_bundle):
    from test_no_torch import BLOCK

    script = ("BLOCKED = {'ray'}\n" + BLOCK + "import mrad.runtime, mrad.runtime.serve.cli as cli\n"
              "assert not any(m.split('.')[0] == 'ray' for m in sys.modules)\ncli.main()")
    done = subprocess.run([sys.executable, "-c", script, "--bundle", str(tf_bundle)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == 'error: mrad-serve needs ray, part of the \'serve\' extra: pip install "mrad-edge[serve]"'


def test_autoscale_option():
    assert parse_autoscale("1:4") == (1, 4)
    for wrong in ("4", "3:1", "a:b", "0:0"):
        with pytest.raises(MradError, match="--autoscale"):
            parse_autoscale(wrong)


# -- on a two-node cluster -------------------------------------------------------------------------

# Loopback only: before Ray is imported, or it resolves 127.0.0.1 to the machine's outward address.
os.environ.setdefault(LOOPBACK_ONLY, "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="mrad-serve needs the 'serve' extra: pip install 'mrad-edge[serve]'")
serve = pytest.importorskip("ray.serve", reason="mrad-serve needs the 'serve' extra: pip install 'mrad-edge[serve]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, data: bytes, content_type: str = "application/octet-stream", timeout: float = 60):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.headers, answer.read()  # its lookups ignore case
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def post_with_retries(url: str, data: bytes, tries: int = 20):
    """What a camera client does: a request lost with a replica (5xx, reset connection) is sent again."""
    for attempt in range(tries):
        try:
            status, headers, body = post(url, data)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status = None
        if status is not None and status < 500:
            return status, headers, body, attempt
        time.sleep(0.1 * (attempt + 1))  # backoff while Serve routes around the dead replica
    raise AssertionError(f"no answer after {tries} tries")


def wait_until(check, what: str, timeout: float = STARTUP_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout} s")


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 100_000_000, "node_ip_address": "127.0.0.1",
            "include_dashboard": False}
    started = Cluster(initialize_head=True, head_node_args={**node, "resources": {"node1": 1}})
    try:
        started.add_node(**node, resources={"node2": 1})
        started.wait_for_nodes(timeout=STARTUP_S)
        yield started
    finally:
        nodes = started.list_all_nodes()
        started.shutdown()
        wait_until(lambda: not any(node.any_processes_alive() for node in nodes), "the cluster's processes gone",
                   timeout=30)


@pytest.fixture(scope="module")
def served(cluster, tf_bundle, tmp_path_factory):
    """mrad-serve joined to the cluster: two replicas, one per node."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "mrad-serve.log"
    command = [sys.executable, "-m", "mrad.runtime.serve.cli", "--bundle", str(tf_bundle), "--address", cluster.address,
               "--port", str(port), "--replicas", "2", "--max-replicas-per-node", "1", "--provider", "cpu",
               "--max-batch-size", "8", "--batch-wait-ms", "20", "--threshold", "0.5"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or ready(url), "mrad-serve ready")
        assert process.poll() is None, log.read_text()
        yield url, process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def expected(tf_bundle, target_images) -> dict[Path, float]:
    detector = Detector(tf_bundle, provider="cpu")
    return {path: detector.predict(path).score for path in target_images}


def load(url: str, images: list[Path], count: int, during=None) -> list[tuple]:
    """``count`` concurrent POSTs cycling over ``images``; ``during`` is called once a quarter are answered."""
    payloads = [(path, path.read_bytes()) for path in images]
    answered = []

    def one(i):
        path, data = payloads[i % len(payloads)]
        status, headers, body, retries = post_with_retries(f"{url}/predict?source=cam{i % 4}&frame={i}", data)
        answered.append(i)
        if during is not None and len(answered) == count // 4:
            during(headers)
        return path, status, headers, body, retries

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, range(count)))


def assert_same_scores(answers, expected):
    for path, status, headers, body, _ in answers:
        assert status == 200, body
        found = json.loads(body)
        assert abs(found["score"] - expected[path]) <= SCORE_TOLERANCE, (path, found["score"], expected[path])
        assert found["decision"] == ("anomalous" if found["score"] > 0.5 else "normal")


def test_concurrent_requests_match_detector_and_are_batched(served, target_images, expected):
    url, _, _ = served
    answers = load(url, target_images, REQUESTS)
    assert_same_scores(answers, expected)
    sizes = [int(headers["X-Mrad-Batch-Size"]) for _, _, headers, _, _ in answers]
    nodes = {headers["X-Mrad-Node"] for _, _, headers, _, _ in answers}
    assert max(sizes) > 1, f"no batch of more than one image formed: {sorted(set(sizes))}"
    assert len(nodes) == 2, "the two replicas should sit on the two nodes"
    first = json.loads(answers[0][3])
    assert first["source"] == "cam0" and first["frame"] == 0
    assert first["map_size"] == list(load_rgb(answers[0][0]).size[::-1])


def test_record_fields_overlay_and_multipart(served, target_images, expected):
    url, _, _ = served
    path = target_images[0]
    status, headers, body = post(f"{url}/predict?map=png", *multipart(IMAGE_FIELD, path.read_bytes()))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert decoded_png(body).shape[:2] == load_rgb(path).size[::-1]
    found = json.loads(headers["X-Mrad-Record"])
    assert abs(found["score"] - expected[path]) <= SCORE_TOLERANCE
    assert {"source", "frame", "timestamp", "score", "decision", "latency_ms", "map_max", "map_mean"} <= set(found)


def test_bad_image_is_400_with_cli_message_and_replicas_survive(served, target_images, expected):
    url, _, _ = served
    broken = target_images[0].read_bytes()[:200]
    with pytest.raises(ImageError) as cli_error:
        load_rgb(broken)
    for _ in range(4):  # spread over the two replicas by Serve's router (most likely both)
        status, _, body = post(f"{url}/predict", broken)
        assert status == 400 and json.loads(body) == {"error": str(cli_error.value)}
    status, _, body = post(f"{url}/predict", b"")
    assert status == 400 and "could not be decoded" in json.loads(body)["error"]
    assert_same_scores(load(url, target_images[:1], 8), expected)


def test_deployment_options(tf_bundle):
    """Autoscaling and GPU fractions are options Ray accepts (checked when the application is built)."""
    from mrad.runtime.serve.app import application

    scaled = application(tf_bundle, autoscale=(1, 3), num_gpus_per_replica=0.25, max_batch_size=4)
    config = scaled._bound_deployment._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 3)
    assert scaled._bound_deployment.ray_actor_options["num_gpus"] == 0.25


def test_health_and_stats(served):
    url, _, _ = served
    for route in ("/healthz", "/readyz", "/stats"):
        with urllib.request.urlopen(url + route, timeout=10) as answer:
            assert answer.status == 200
    with urllib.request.urlopen(url + "/stats", timeout=10) as answer:
        assert "batch_sizes" in json.loads(answer.read())


def test_python_handle(served, cluster, target_images, expected):
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        handle = serve.get_app_handle(APP_NAME)
        found = handle.predict.remote(target_images[1].read_bytes(), source="cam9").result(timeout_s=60)
        assert found["source"] == "cam9"
        assert abs(found["score"] - expected[target_images[1]]) <= SCORE_TOLERANCE
        with pytest.raises(ImageError):
            handle.predict.remote(b"not an image").result(timeout_s=60)
    finally:
        ray.shutdown()


def test_replica_killed_under_load_loses_no_request(served, cluster, target_images, expected):
    url, _, _ = served
    killed = []

    def kill(headers):
        killed.append(int(headers["X-Mrad-Pid"]))
        os.kill(killed[0], signal.SIGKILL)

    answers = load(url, target_images, REQUESTS, during=kill)
    assert killed
    assert_same_scores(answers, expected)
    # Serve replaces the replica
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        def replaced():
            deployment = serve.status().applications[APP_NAME].deployments["MradDetector"]
            return deployment.replica_states == {"RUNNING": 2}

        wait_until(replaced, "a replacement replica", timeout=60)
    finally:
        ray.shutdown()
    seen = set()

    def new_replica_answers():
        answers = load(url, target_images, 32)
        assert_same_scores(answers, expected)
        seen.update((h["X-Mrad-Node"][:8], int(h["X-Mrad-Pid"])) for _, _, h, _, _ in answers)
        return len({pid for _, pid in seen} - set(killed)) == 2

    try:
        wait_until(new_replica_answers, "answers from a replacement replica", timeout=60)
    finally:
        print("killed", killed, "answered by", seen)


def test_stops_cleanly(served):
    url, process, log = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()
    assert "mrad-serve: stopped" in log.read_text()
    assert not ready(url)


def test_cameras_read_by_actors_match_detector(cluster, tf_bundle, target_images, tmp_path):
    """Two video files stand in for cameras (after test_stops_cleanly: one application named mrad at a time)."""
    from test_run_cli import write_video

    from mrad.runtime.sources import Camera

    videos = [write_video(tmp_path / f"line{n}.avi", target_images[n:n + 4] * 3) for n in range(2)]
    out = tmp_path / "records"
    done = subprocess.run([sys.executable, "-m", "mrad.runtime.serve.cli", "--bundle", str(tf_bundle), "--address",
                           cluster.address, "--port", str(free_port()), "--provider", "cpu", "--camera", str(videos[0]),
                           "--camera", str(videos[1]), "--out", str(out)],
                          capture_output=True, text=True, timeout=STARTUP_S)
    assert done.returncode == 0, done.stderr[-3000:]
    detector = Detector(tf_bundle, provider="cpu")
    for n, video in enumerate(videos):
        lines = [json.loads(line) for line in (out / f"camera-{n}.jsonl").read_text().splitlines()]
        frames = [r for r in lines if "event" not in r]
        assert lines[-1]["event"] == "stream_end" and lines[-1]["frames"] == len(frames) == 12
        assert [r["frame"] for r in frames] == list(range(12))
        for record, frame in zip(frames, Camera(str(video)).frames()):
            assert abs(record["score"] - detector.predict(frame.image).score) <= SCORE_TOLERANCE
