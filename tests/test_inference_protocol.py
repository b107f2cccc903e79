"""mrad-serve speaks the Open Inference Protocol (KServe v2): checked with the real client library (tritonclient,
HTTP and gRPC) against mrad-serve --local; one test in test_serve.py does the same against the Ray mode.

Every server here is a subprocess on loopback, on free ports, stopped at the end of its module; every wait is
bounded. Scores are compared with the in-process Detector within SCORE_TOLERANCE: float32 on the wire
(about 3e-8 at these values) and ONNX Runtime's batch-of-n against batch-of-one rounding (measured 3e-8).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mrad.runtime import Detector
from mrad.runtime.core.preprocess import load_rgb
from mrad.runtime.errors import ImageError
from mrad.runtime.serve import open_inference_pb as pb
from mrad.runtime.serve import protocol
from mrad.runtime.serve.http import frame_number, image_bytes
from mrad.runtime.serve.protocol import Model, ProtocolError

from conftest import free_port
from test_no_torch import BLOCK

http_client = pytest.importorskip("tritonclient.http", reason="the test client: pip install 'tritonclient[http,grpc]'")
grpc_client = pytest.importorskip("tritonclient.grpc", reason="the test client: pip install 'tritonclient[http,grpc]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

SCORE_TOLERANCE = 1e-6
STARTUP_S = 90  # a --local server opens its bundle and binds its ports
ANSWER_S = 30  # a request that must be answered
TOKEN = "a-token-for-this-test-only-0123456789"
SLOW_CLIENTS = 40
MODEL = Model("mrad", "default")


# -- the protocol without a server ------------------------------------------------------------------


def test_messages_match_the_protocol_as_triton_defines_it():
    """Wire compatibility: every message and field of our .proto has the number, type and label of Triton's
    (which extends KServe's), so any client generated from either talks to mrad-serve."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2

    ours, theirs = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    pb.ModelInferRequest.DESCRIPTOR.file.CopyToProto(ours)
    service_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"

    def fields(message) -> dict:
        found = {(f.number, f.name, f.type, f.label, f.type_name) for f in message.field}
        for nested in message.nested_type:
            found |= {(nested.name, *key) for key in fields(nested)}
        return found

    triton = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        assert fields(message) == fields(triton[message.name]), message.name
    service = {m.name: (m.input_type, m.output_type) for m in theirs.service[0].method}
    for method in ours.service[0].method:
        assert service[method.name] == (method.input_type, method.output_type)


def test_compiled_proto_is_current():
    grpc_tools = pytest.importorskip("grpc_tools", reason="grpcio-tools compiles the .proto")
    assert grpc_tools and pb.compile_proto() == pb.COMPILED, \
        "open_inference.proto changed: python -m mrad.runtime.serve.open_inference_pb"


def binary_request(name: str, datatype: str, shape: list, raw: bytes, outputs=None, parameters=None) -> tuple:
    header = {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                          "parameters": {"binary_data_size": len(raw)}}]}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    text = json.dumps(header).encode()
    return text + raw, str(len(text))


def test_requests_in_every_form_give_the_same_images(target_images):
    data = [p.read_bytes() for p in target_images[:2]]
    pixels = np.stack([np.asarray(load_rgb(p)) for p in target_images[:2]])
    as_json = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                           "data": [base64.b64encode(d).decode() for d in data]}],
               "parameters": {"part_id": 17, "recipe": "default"}, "id": "r1"}
    found = protocol.rest_request(json.dumps(as_json).encode(), None, MODEL)
    assert list(found.images) == data and found.part_id == "17" and found.id == "r1"
    assert found.outputs == protocol.DEFAULT_OUTPUTS and not found.want_map
    found = protocol.rest_request(*binary_request("image", "BYTES", [2], protocol.join_bytes(data),
                                                  outputs=[{"name": "anomaly_map", "parameters": {"binary_data": True}}]),
                                  MODEL)
    assert list(found.images) == data and found.want_map and found.binary == {"anomaly_map"}
    found = protocol.rest_request(*binary_request("pixels", "UINT8", list(pixels.shape), pixels.tobytes()), MODEL)
    assert all(np.array_equal(a, b) for a, b in zip(found.images, pixels))
    nested = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape[1:]),
                          "data": pixels[0].tolist()}]}
    [image] = protocol.rest_request(json.dumps(nested).encode(), None, MODEL).images
    assert np.array_equal(image, pixels[0])
    message = pb.ModelInferRequest(model_name="mrad")
    message.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    message.raw_input_contents.append(pixels.tobytes())
    assert all(np.array_equal(a, b) for a, b in zip(protocol.grpc_request(message, MODEL).images, pixels))


@pytest.mark.parametrize("body, header, message", [
    (b"{not json", None, "not valid JSON"),
    (b"[]", None, "JSON object"),
    (b'{"inputs": []}', None, "no \"inputs\""),
    (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}', None, "BYTES"),
    (b'{"inputs": [{"name": "picture", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}', None, "send one input"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}', None, "base64"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA=="]}]}', None, "its shape says 2"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [65], "data": []}]}', None, "at most 64"),
    (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 6000, 6000, 3], "data": []}]}', None,
     "above the limit"),
    (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3], "data": [0, 256, 1]}]}', None,
     "from 0 to 255"),
    (b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 3], "data": [0.5, 1, 1]}]}', None,
     "whole numbers"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], '
     b'"outputs": [{"name": "heatmap"}]}', None, "no output named 'heatmap'"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}], '
     b'"parameters": {"recipe": "part-b"}}', None, "recipe 'part-b' is not served here"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}AAAA',
     "119", "does not fit"),
    (b'{}', "99", "does not fit a body of 2 bytes"),
])
def test_bad_requests_are_refused_with_the_reason(body, header, message):
    with pytest.raises(ProtocolError, match=message) as refused:
        protocol.rest_request(body, header, MODEL)
    assert refused.value.status == 400 and refused.value.grpc_code == "INVALID_ARGUMENT"
    assert json.loads(refused.value.body()) == {"error": str(refused.value)}


def test_binary_bytes_elements_are_checked():
    raw = protocol.join_bytes([b"abc", b""])
    assert protocol.split_bytes(raw, 2) == [b"abc", b""]
    for broken, count in ((raw[:-1] + b"", 2), (raw, 1), (raw + b"x", 2), (struct.pack("<I", 99) + b"ab", 1)):
        with pytest.raises(ProtocolError):
            protocol.split_bytes(broken, count)


def test_a_form_of_60000_parts_is_refused_at_once():
    boundary = "b0undary"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n".encode()
    body = part * 60_000 + f"--{boundary}--\r\n".encode()
    started = time.perf_counter()
    with pytest.raises(ImageError, match="more than 16 parts"):
        image_bytes(body, f"multipart/form-data; boundary={boundary}")
    assert time.perf_counter() - started < 1.0  # one bounded split, not 60,000 parsed messages


def test_frame_numbers_are_checked():
    assert frame_number("12") == 12 and frame_number(None) is None
    for wrong in ("9" * 40, "-1", "1e3", "١٢"):
        with pytest.raises(ProtocolError, match=r"\?frame="):
            frame_number(wrong)


# -- the command line ----------------------------------------------------------------------------------


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrad.runtime.serve.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_beyond_loopback_without_a_token_is_refused(tf_bundle):
    done = cli("--local", "--bundle", tf_bundle, "--host", "0.0.0.0", env={"MRAD_SERVE_TOKEN": ""})
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --host 0.0.0.0 is reachable from other machines: set a token "
                                   "(MRAD_SERVE_TOKEN or --token-file) and TLS (--tls-cert, --tls-key), or pass "
                                   "--insecure on a network of its own")
    done = cli("--local", "--bundle", tf_bundle, env={"MRAD_SERVE_TOKEN": "short"})
    assert done.returncode == 2 and "can be guessed" in done.stderr


def test_local_refuses_ray_options(tf_bundle):
    done = cli("--local", "--bundle", tf_bundle, "--replicas", "2", "--address", "auto")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --address, --replicas: options of the Ray mode; --local scores in this "
                                   "process alone")


# -- against mrad-serve --local ------------------------------------------------------------------------


@dataclass
class Server:
    port: int
    grpc_port: int
    process: subprocess.Popen
    log: Path
    cert: Path | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def http(self, **options):
        if self.cert is None:
            return http_client.InferenceServerClient(self.url, network_timeout=ANSWER_S, **options)
        import gevent.ssl

        return http_client.InferenceServerClient(
            self.url, ssl=True, network_timeout=ANSWER_S,
            ssl_context_factory=lambda cafile=None, **_: gevent.ssl.create_default_context(cafile=str(self.cert)),
            **options)

    def grpc(self):
        if self.cert is None:
            return grpc_client.InferenceServerClient(self.grpc_url)
        return grpc_client.InferenceServerClient(self.grpc_url, ssl=True, root_certificates=str(self.cert))

    def context(self):
        return ssl.create_default_context(cafile=str(self.cert)) if self.cert else None

    def get(self, route: str, headers=None):
        scheme = "https" if self.cert else "http"
        request = urllib.request.Request(f"{scheme}://{self.url}{route}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=ANSWER_S, context=self.context()) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def post(self, route: str, data: bytes, headers=None):
        scheme = "https" if self.cert else "http"
        request = urllib.request.Request(f"{scheme}://{self.url}{route}", data=data, headers=headers or {},
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=ANSWER_S, context=self.context()) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()


# Ray made unimportable: --local needs none of it
WITHOUT_RAY = ("BLOCKED = {'ray'}\n" + BLOCK + "import runpy\nrunpy.run_module('mrad.runtime.serve.cli', "
               "run_name='__main__')")


@contextmanager
def local_server(bundle: Path, log: Path, *options: str, env=None, cert: Path | None = None, without_ray=False):
    """mrad-serve --local on free loopback ports until the block ends (SIGTERM, then bounded waits)."""
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, *(("-c", WITHOUT_RAY) if without_ray else ("-m", "mrad.runtime.serve.cli")), "--local",
               "--bundle", str(bundle), "--provider", "cpu", "--port", str(port), "--grpc-port", str(grpc_port),
               *options]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(port, grpc_port, process, log, cert)
    try:
        deadline = time.monotonic() + STARTUP_S
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if server.get("/v2/health/ready")[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        assert process.poll() is None and server.get("/v2/health/ready")[0] == 200, log.read_text()[-3000:]
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def plain(tf_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("plain") / "mrad-serve.log"
    with local_server(tf_bundle, log, "--threshold", "0.5", "--batch-wait-ms", "30", without_ray=True) as server:
        yield server
    assert "mrad-serve: stopped" in log.read_text()


@pytest.fixture(scope="module")
def bounded(tf_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("bounded") / "mrad-serve.log"
    with local_server(tf_bundle, log, "--max-body-mb", "1", "--header-timeout-s", "2", "--body-timeout-s", "2",
                      "--max-pixels", "1000000", "--max-request-images", "4", "--max-json-map-values", "100") as server:
        yield server


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the test's certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True,
                   timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def guarded(tf_bundle, certificate, tmp_path_factory):
    cert, key = certificate
    log = tmp_path_factory.mktemp("guarded") / "mrad-serve.log"
    with local_server(tf_bundle, log, "--tls-cert", str(cert), "--tls-key", str(key),
                      env={"MRAD_SERVE_TOKEN": TOKEN}, cert=cert) as server:
        yield server


@pytest.fixture(scope="module")
def detector(tf_bundle) -> Detector:
    return Detector(tf_bundle, provider="cpu")


def http_image(data: list[bytes], binary: bool = True):
    """The images as binary data, or in JSON: base64 text."""
    tensor = http_client.InferInput("image", [len(data)], "BYTES")
    values = data if binary else [base64.b64encode(d).decode() for d in data]
    tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)
    return tensor


def grpc_image(data: list[bytes]):
    tensor = grpc_client.InferInput("image", [len(data)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=object))
    return tensor


def test_metadata_lists_inputs_and_outputs(plain):
    expected = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                           {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
                "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1]},
                            {"name": "decision", "datatype": "BYTES", "shape": [-1]},
                            {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, -1, -1]}]}
    found = plain.http().get_model_metadata("mrad")
    assert {key: found[key] for key in expected} == expected and found["name"] == "mrad"
    found = plain.grpc().get_model_metadata("mrad", as_json=True)
    assert [(t["name"], t["datatype"], list(map(int, t["shape"]))) for t in found["inputs"] + found["outputs"]] == \
        [(t["name"], t["datatype"], t["shape"]) for t in expected["inputs"] + expected["outputs"]]
    assert plain.http().is_server_live() and plain.http().is_model_ready("mrad") and plain.grpc().is_server_ready()
    assert "binary_tensor_data" in plain.http().get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="no model named 'other'") as missing:
        plain.http().get_model_metadata("other")
    assert missing.value.status() == "404"
    with pytest.raises(InferenceServerException) as missing:
        plain.grpc().get_model_metadata("other")
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_scores_equal_the_detectors_over_http_and_grpc(plain, detector, target_images):
    paths = target_images[:3]
    data = [p.read_bytes() for p in paths]
    expected = [r.score for r in detector.predict_batch(paths)]
    pixels = np.stack([np.asarray(load_rgb(p)) for p in paths])
    pixel_input = grpc_client.InferInput("pixels", list(pixels.shape), "UINT8")
    pixel_input.set_data_from_numpy(pixels)
    http_pixels = http_client.InferInput("pixels", list(pixels.shape), "UINT8")
    http_pixels.set_data_from_numpy(pixels, binary_data=False)  # JSON numbers
    answers = {
        "http binary": plain.http().infer("mrad", [http_image(data)]),
        "http json": plain.http().infer("mrad", [http_image(data[:1], binary=False)],
                                        outputs=[http_client.InferRequestedOutput("score", binary_data=False)]),
        "http pixels": plain.http().infer("mrad", [http_pixels]),
        "grpc": plain.grpc().infer("mrad", [grpc_image(data)]),
        "grpc pixels": plain.grpc().infer("mrad", [pixel_input]),
    }
    for how, answer in answers.items():
        scores = answer.as_numpy("score")
        assert scores.dtype == np.float32
        assert np.abs(scores - expected[:len(scores)]).max() <= SCORE_TOLERANCE, how
    decisions = answers["grpc"].as_numpy("decision")
    assert [d.decode() for d in decisions] == ["anomalous" if s > 0.5 else "normal" for s in expected]


def test_the_map_arrives_only_when_requested(plain, detector, target_images):
    path = target_images[1]
    expected = detector.predict(path).anomaly_map
    answer = plain.http().infer("mrad", [http_image([path.read_bytes()])], parameters={"part_id": "A-17"})
    assert answer.as_numpy("anomaly_map") is None and answer.as_numpy("score") is not None
    assert answer.get_response()["parameters"] == {"recipe": "default", "threshold": 0.5, "part_id": "A-17"}
    for client, output in ((plain.http(), http_client.InferRequestedOutput("anomaly_map")),
                           (plain.grpc(), grpc_client.InferRequestedOutput("anomaly_map"))):
        inputs = [http_image([path.read_bytes()]) if client.__module__.startswith("tritonclient.http")
                  else grpc_image([path.read_bytes()])]
        answer = client.infer("mrad", inputs, outputs=[output])
        found = answer.as_numpy("anomaly_map")
        assert found.shape == (1, *expected.shape) and answer.as_numpy("score") is None
        assert np.abs(found[0] - expected).max() <= SCORE_TOLERANCE


def test_a_non_image_gets_the_protocols_error(plain, target_images):
    with pytest.raises(InferenceServerException) as refused:
        plain.http().infer("mrad", [http_image([b"not an image"])])
    assert refused.value.status() == "400" and "could not be decoded" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        plain.grpc().infer("mrad", [grpc_image([b"not an image"])])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "could not be decoded" in refused.value.message()
    status, headers, body = plain.post("/v2/models/mrad/infer", b'{"inputs": 3}')
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": "the request has no \"inputs\": send \"image\" (BYTES) or \"pixels\" (UINT8)"}
    with pytest.raises(InferenceServerException, match="image 2 of 2: image could not be decoded"):
        plain.grpc().infer("mrad", [grpc_image([target_images[0].read_bytes(), b"not an image"])])


def test_requests_are_batched_and_the_old_routes_stay(plain, detector, target_images):
    data = target_images[0].read_bytes()
    with ThreadPoolExecutor(8) as pool:
        scores = list(pool.map(lambda _: plain.grpc().infer("mrad", [grpc_image([data])]).as_numpy("score")[0],
                               range(16)))
    assert max(abs(s - detector.predict(target_images[0]).score) for s in scores) <= SCORE_TOLERANCE
    status, _, body = plain.get("/stats")
    assert status == 200 and max(map(int, json.loads(body)["batch_sizes"])) > 1, body
    status, headers, body = plain.post("/predict?source=cam3&frame=41", data)
    record = json.loads(body)
    assert status == 200 and (record["source"], record["frame"]) == ("cam3", 41)
    assert abs(record["score"] - detector.predict(target_images[0]).score) <= 1e-6 + 5e-7  # 6 decimals
    status, _, body = plain.post("/predict?frame=" + "9" * 40, data)
    assert status == 400 and "?frame= takes a whole number" in json.loads(body)["error"]
    status, _, body = plain.get("/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["bundle"].startswith("sha256:") and "/" not in json.dumps(ready)


def test_a_wrong_token_is_refused_over_tls(guarded, target_images):
    data = target_images[0].read_bytes()
    for headers in ({}, {"Authorization": "Bearer not-the-token-but-long-enough"}):
        with pytest.raises(InferenceServerException) as refused:
            guarded.http().infer("mrad", [http_image([data])], headers=dict(headers))
        assert refused.value.status() == "401", refused.value.message()
        with pytest.raises(InferenceServerException) as refused:
            guarded.grpc().infer("mrad", [grpc_image([data])], headers={k.lower(): v for k, v in headers.items()})
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    status, headers, _ = guarded.post("/predict", data)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    # (each call gets headers of its own: tritonclient adds to the dict it is given)
    assert guarded.http().infer("mrad", [http_image([data])],
                                headers={"Authorization": f"Bearer {TOKEN}"}).as_numpy("score").shape == (1,)
    assert guarded.grpc().infer("mrad", [grpc_image([data])],
                                headers={"authorization": f"Bearer {TOKEN}"}).as_numpy("score").shape == (1,)
    assert guarded.http().is_server_ready() and guarded.get("/readyz")[0] == 200  # health: open
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):  # TLS only
        urllib.request.urlopen(f"http://{guarded.url}/readyz", timeout=ANSWER_S)


def slow_sockets(server: Server, count: int, body: bool) -> list[socket.socket]:
    """Clients that trickle: headers one byte at a time, or whole headers and then a body one byte at a time."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_S)
        if body:
            s.sendall(b"POST /v2/models/mrad/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n{")
        else:  # a header whose value never ends
            s.sendall(b"POST /v2/models/mrad/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sockets.append(s)
    return sockets


def test_slow_uploads_do_not_stop_a_normal_request(bounded, target_images):
    """40 clients trickle (half their headers, half their bodies): a normal request is answered meanwhile, and the
    trickling ones are cut off at their bounds (--header-timeout-s 2, --body-timeout-s 2)."""
    slow = slow_sockets(bounded, SLOW_CLIENTS // 2, body=False) + slow_sockets(bounded, SLOW_CLIENTS // 2, body=True)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.2):
            for s in slow:
                try:
                    s.send(b"x")
                except OSError:
                    pass

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        started = time.monotonic()
        answer = bounded.http().infer("mrad", [http_image([target_images[0].read_bytes()])])
        assert answer.as_numpy("score").shape == (1,)
        assert time.monotonic() - started < 2, "answered while the slow uploads were still within their bounds"
        answers = []
        for s in slow:
            # bounded: the server's 2 s, then aiohttp's lingering read of an unread body (10 s at most) before it
            # closes, so that its 408 answer reaches the client instead of a reset
            s.settimeout(15)
            received = b""
            try:
                while chunk := s.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
            answers.append(received)
    finally:
        stop.set()
        feeder.join(5)
        for s in slow:
            s.close()
    assert all(a == b"" for a in answers[:SLOW_CLIENTS // 2]), answers[:3]
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers[SLOW_CLIENTS // 2:]), answers[-1][:200]
    assert b"did not arrive within 2 s" in answers[-1]


def test_bodies_images_and_maps_are_bounded(bounded, target_images):
    status, headers, body = bounded.post("/v2/models/mrad/infer", b"x" * (1024 * 1024 + 1))
    assert status == 413 and "at most 1,048,576" in json.loads(body)["error"]
    big = np.zeros((1, 600, 600, 3), np.uint8)  # 1 MB and more: gRPC's own bound
    tensor = grpc_client.InferInput("pixels", list(big.shape), "UINT8")
    tensor.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as refused:
        bounded.grpc().infer("mrad", [tensor])
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # a PNG whose header declares 2000 x 2000 pixels (refused before any decoding) in 100 bytes
    header = struct.pack(">IIBBBBB", 2000, 2000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with pytest.raises(InferenceServerException, match="2000 x 2000 = 4,000,000 pixels, more than the limit"):
        bounded.http().infer("mrad", [http_image([bomb])])
    status, _, body = bounded.post("/predict?map=png", bomb)
    assert status == 400 and "more than the limit of 1,000,000" in json.loads(body)["error"]
    with pytest.raises(InferenceServerException, match="at most 4 a request"):
        bounded.http().infer("mrad", [http_image([bomb] * 5)])
    with pytest.raises(InferenceServerException, match="too large for JSON"):
        bounded.http().infer("mrad", [http_image([target_images[0].read_bytes()])],
                             outputs=[http_client.InferRequestedOutput("anomaly_map", binary_data=False)])


GUIDE = Path(__file__).resolve().parents[1] / "docs" / "serving-protocol.md"
RUN_HERE = "tests/test_inference_protocol.py runs this block against one"


def test_the_guides_python_and_curl_examples_run_as_written(plain, target_images, tmp_path):
    """docs/serving-protocol.md's Python and curl blocks, against the test's server (its ports in place of 8000 and
    8001), on one of the test's images as part.png."""
    from test_docs import RUN, blocks

    shutil.copy(target_images[0], tmp_path / "part.png")
    found = [b for b in blocks(GUIDE) if b.language in RUN and RUN_HERE in (b.not_run_because or "")]
    assert [b.language for b in found] == ["python", "bash"]
    for block in found:
        code = block.code.replace("127.0.0.1:8000", plain.url).replace("127.0.0.1:8001", plain.grpc_url)
        ran = subprocess.run([*RUN[block.language], code], cwd=tmp_path, capture_output=True, text=True,
                             timeout=ANSWER_S * 4)
        assert ran.returncode == 0, f"{block.where}\n{ran.stdout[-2000:]}\n{ran.stderr[-2000:]}"
        if block.language == "bash":  # curl prints the answers back to back
            answers = json_objects(ran.stdout)
            scores = [a["outputs"][0]["data"][0] for a in answers if "model_name" in a]
            assert len(scores) == 2 and abs(scores[0] - scores[1]) <= SCORE_TOLERANCE, ran.stdout
            assert list(answers[-1]) == ["error"] and ran.stdout.rstrip().endswith(" 400")


def json_objects(text: str) -> list:
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at >= 0:
        value, end = decoder.raw_decode(text, at)
        found.append(value)
        at = text.find("{", end)
    return found
