"""mrad-run's line sinks against real far ends on loopback: a mosquitto broker, an asyncua client, an HTTP server.

Every component is started here on a free port and stopped at the end; every
wait is bounded and ends on the awaited condition.
"""

import http.server
import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from asyncua.sync import Client as UaClient
from click.testing import CliRunner
from PIL import Image

from mrad.runtime.line.sinks import Sink
from mrad.runtime import Detector, MradError
from mrad.runtime.commands import common as cli
from mrad.runtime.commands import run as run_cli
from mrad.runtime.line.engine import LineEngine
from mrad.runtime.line.settings import line_settings
from mrad.runtime.line.settings import mqtt_target
from mrad.runtime.line.mqtt import MqttSink
from mrad.runtime.line.opcua import OpcUaSink
from mrad.runtime.line.webhook import WebhookSink
from mrad.runtime.line.records import event_record, now
from mrad.runtime.line.sources import Frame

from conftest import eventually, free_port

FAST_RECONNECT = (0.05, 0.2)  # the sink's and subscriber's backoff: the restart test waits for it twice


class Subscriber:
    """A persistent-session client collecting what arrives on ``topic`` and below it."""

    def __init__(self, port, topic, qos=1):
        self.messages = []  # (topic, JSON payload or text)
        self._arrived = threading.Condition(threading.RLock())
        self._connected = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                             clean_session=False)
        client.on_connect = lambda c, u, flags, reason, p: (
            flags.session_present or c.subscribe([(topic, qos), (f"{topic}/#", qos)]))
        client.on_subscribe = lambda *args: self._connected.set()
        client.on_message = self._on_message
        client.manual_ack_set(True)  # acknowledged before anyone is told, so settle() covers every message seen
        client.reconnect_delay_set(*FAST_RECONNECT)
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        assert self._connected.wait(10), "the subscription was not acknowledged"

    def _on_message(self, client, userdata, message):
        client.ack(message.mid, message.qos)
        payload = message.payload.decode()
        with self._arrived:
            self.messages.append((message.topic, json.loads(payload) if payload.startswith("{") else payload))
            self._arrived.notify_all()

    def on(self, topic):
        with self._arrived:  # a re-entrant lock: also called from wait_until's conditions
            return [payload for t, payload in self.messages if t == topic]

    def wait_for(self, topic, count, seconds=20):
        """Wait until ``count`` messages have arrived on ``topic``."""
        return self.wait_until(lambda: len(self.on(topic)) >= count, seconds)

    def wait_until(self, condition, seconds=20):
        with self._arrived:
            return self._arrived.wait_for(condition, seconds)

    def settle(self):
        """Return once the broker has read everything this client sent, its acknowledgements too (a round trip)."""
        self.client.publish("test/probe", b"", qos=1).wait_for_publish(10)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def frame_records(indexes, decision="anomalous"):
    return [{"source": "cam", "frame": i, "timestamp": now(), "score": 0.5, "decision": decision} for i in indexes]


def write_all(sink, records):
    for record in records:
        sink.write(record)


def next_event(events: queue.Queue, kind: str) -> dict:
    while True:
        event = events.get(timeout=20)
        if event["event"] == kind:
            return event


def test_mqtt_every_frame_once_across_a_broker_restart(broker):
    topic = "plant/line3/cam1"
    subscriber = Subscriber(broker.port, topic)
    events = queue.Queue()
    sink = MqttSink(mqtt_target(f"mqtt://127.0.0.1:{broker.port}/{topic}"), events=events.put,
                    reconnect_s=FAST_RECONNECT)
    write_all(sink, frame_records(range(0, 10)))
    assert sink.flush(20) and subscriber.wait_for(topic, 10)
    # At QoS 1 a broker delivers again what it had not seen acknowledged when it stopped: the subscriber's
    # acknowledgements must be in first (the sink's are: flush). Its session outlives the restart.
    subscriber.settle()
    broker.stop()
    assert next_event(events, "sink_lost")["sink"] == f"mqtt://127.0.0.1:{broker.port}/{topic}"
    write_all(sink, frame_records(range(10, 20)))  # the broker is away: they wait in the sink
    assert sink.pending() == 10
    broker.start()  # on the same port
    write_all(sink, frame_records(range(20, 30)))
    counts = sink.close(timeout=20)
    assert counts == {"delivered": 30, "dropped": 0, "failed": 0, "outages": 1, "undelivered": 0}
    assert next_event(events, "sink_back")["away_s"] > 0
    assert subscriber.wait_for(topic, 30)  # the subscriber is back too, by itself
    frames = [record["frame"] for record in subscriber.on(topic)]
    assert sorted(frames) == list(range(30)), "every frame exactly once"
    assert subscriber.wait_until(lambda: subscriber.on(f"{topic}/status")[-1:] == ["offline"])  # said on close
    subscriber.close()


def test_mqtt_buffer_on_disk_outlasts_the_run_and_counts_what_it_drops(broker, tmp_path):
    topic = "plant/line3/cam1"
    target = mqtt_target(f"mqtt://127.0.0.1:{broker.port}/{topic}")
    broker.stop()
    events = queue.Queue()
    sink = MqttSink(target, buffer_dir=tmp_path / "buffer", buffer_size=5, events=events.put,
                    reconnect_s=FAST_RECONNECT)
    next_event(events, "sink_lost")
    write_all(sink, frame_records(range(8)))  # 8 into a bound of 5: the 3 oldest are dropped
    assert next_event(events, "sink_dropping")["bound"] == 5
    with pytest.raises(MradError, match="being written by another process"):
        MqttSink(target, buffer_dir=tmp_path / "buffer")  # one run per buffer, or it would be sent twice
    assert sink.close(timeout=0) == {"delivered": 0, "dropped": 3, "failed": 0, "outages": 1, "kept": 5}

    broker.start()
    subscriber = Subscriber(broker.port, topic)
    next_run = MqttSink(target, buffer_dir=tmp_path / "buffer", reconnect_s=FAST_RECONNECT)
    assert next_run.close(timeout=20) == {"delivered": 5, "dropped": 0, "failed": 0, "outages": 0, "kept": 0}
    assert subscriber.wait_for(topic, 5)
    assert [record["frame"] for record in subscriber.on(topic)] == [3, 4, 5, 6, 7]
    subscriber.close()


class ListSink(Sink):
    needs_picture = False

    def __init__(self):
        self.records = []

    def write(self, record, picture=None):
        self.records.append(record)


def test_opcua_serves_each_verdict_while_frames_are_scored(tf_bundle, target_images):
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/mrad"
    served = OpcUaSink(endpoint, station="cam1")
    client = UaClient(endpoint)
    client.connect()
    namespace = client.get_namespace_index("urn:mrad-edge")

    def read(name):
        return client.get_node(f"ns={namespace};s=cam1.{name}").read_value()

    images = [np.asarray(Image.open(p).convert("RGB")) for p in target_images[:3]]
    seen = {}

    def source():
        """The frames; before reading the next, the PLC's view of the one before."""
        for index, image in enumerate(images):
            yield Frame("cam1", index, now(), image=image)
            # the engine asks for the next frame once this one is handed out; the server publishes it soon after,
            # Frame last
            assert eventually(lambda: read("Frame") == index, pause=0)
            seen[index] = {name: read(name) for name in ("Score", "Decision", "Frames", "Anomalous", "Healthy")}
        yield Frame("cam1", 3, now(), error="image could not be decoded")
        assert eventually(lambda: read("Errors") == 1, pause=0)
        engine.event(event_record("camera_lost", source="cam1"))
        assert eventually(lambda: read("Healthy") is False, pause=0) and read("Status") == "camera lost"
        engine.event(event_record("camera_reopened", source="cam1"))
        assert eventually(lambda: read("Healthy") is True, pause=0)

    records = ListSink()
    engine = LineEngine(Detector(tf_bundle, provider="cpu"), [records, served], threshold=0.0, close_timeout=5)
    summary = engine.run(source())
    scored = [r for r in records.records if "score" in r]
    assert [seen[i]["Score"] for i in range(3)] == [r["score"] for r in scored]
    assert [(seen[i]["Frames"], seen[i]["Anomalous"], seen[i]["Decision"], seen[i]["Healthy"]) for i in range(3)] == [
        (1, 1, "anomalous", True), (2, 2, "anomalous", True), (3, 3, "anomalous", True)]
    assert summary["sinks"][endpoint]["failed"] == 0 and summary["output_errors"] == 0
    with pytest.raises(Exception):
        read("Frame")  # the server stopped with the run
    client.disconnect()


class Receiver:
    """An HTTP server that answers POSTs with the statuses given, then 200; it notes each try and its time."""

    def __init__(self, statuses=()):
        self.statuses, self.tries, self.accepted = list(statuses), [], []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.tries.append((time.monotonic(), status, body["frame"]))
                if status == 200:
                    receiver.accepted.append(body)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/defects"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_webhook_tries_again_with_backoff_until_accepted():
    receiver = Receiver([503, 503])  # the first two tries fail
    events = queue.Queue()
    sink = WebhookSink(receiver.url, "anomalous", events.put, backoff_s=0.05)
    write_all(sink, frame_records([0], "anomalous") + frame_records([1], "normal") + frame_records([2], "anomalous"))
    sink.write(event_record("camera_lost", source="cam"))  # events are not posted
    assert sink.close(timeout=20) == {"delivered": 2, "dropped": 0, "failed": 0, "undelivered": 0, "outages": 0}
    assert [(status, frame) for _, status, frame in receiver.tries] == [(503, 0), (503, 0), (200, 0), (200, 2)]
    first, second, third = (at for at, _, _ in receiver.tries[:3])
    assert second - first >= 0.05 and third - second >= 0.1, "waits double"
    assert [body["frame"] for body in receiver.accepted] == [0, 2] and events.empty()
    receiver.close()


def test_webhook_gives_up_after_its_retries_and_reports_it():
    receiver = Receiver([500, 500, 500, 400])  # record 0: three 500s (two retries); record 1: refused, not retried
    events = queue.Queue()
    sink = WebhookSink(receiver.url, "all", events.put, retries=2, backoff_s=0.01)
    write_all(sink, frame_records(range(3), "normal"))
    assert sink.close(timeout=20) == {"delivered": 1, "dropped": 0, "failed": 2, "undelivered": 0, "outages": 1}
    assert [status for _, status, _ in receiver.tries] == [500, 500, 500, 400, 200]
    assert next_event(events, "sink_lost")["error"] == "HTTP 500 Internal Server Error"
    assert next_event(events, "sink_back")["sink"] == f"webhook {receiver.url}"
    receiver.close()


class FailingSink(ListSink):
    """A sink whose library fails on every write and on close."""

    def write(self, record, picture=None):
        raise RuntimeError("library bug")

    def close(self, timeout):
        raise RuntimeError("cannot close")


def test_a_failing_sink_never_stops_inspection(tf_bundle, target_images):
    records = ListSink()
    summary = LineEngine(Detector(tf_bundle, provider="cpu"), [FailingSink(), records]).run(
        Frame("files", i, now(), image=np.asarray(Image.open(p).convert("RGB"))) for i, p in enumerate(target_images[:2]))
    assert [r["frame"] for r in records.records if "score" in r] == [0, 1]
    assert summary["output_errors"] == 3 and summary["first_output_error"] == "FailingSink: library bug"


def test_mrad_run_sends_every_frame_to_the_line(tf_bundle, synth_data, broker, tmp_path):
    """End to end: a TOML file and options; a broker, an OPC UA server, webhooks; one MQTT URL and one webhook dead."""
    parts = synth_data[1] / "checker" / "test"
    topic = "plant/line3/cam1"
    subscriber = Subscriber(broker.port, topic)
    receiver = Receiver()
    opcua = f"opc.tcp://127.0.0.1:{free_port()}/mrad"
    dead_port = free_port()  # nothing listens there
    config = tmp_path / "line.toml"
    config.write_text(f'station = "cam1"\nmqtt = ["mqtt://127.0.0.1:{broker.port}/{topic}"]\nmqtt-qos = 1\n'
                      f'opcua = "{opcua}"\nwebhook = "{receiver.url}"\nwebhook-on = "anomalous"\nflush-timeout = 20\n')
    result = CliRunner().invoke(run_cli.main, [
        "--bundle", str(tf_bundle), "--input", str(parts), "--provider", "cpu", "--threshold", "0",
        "--config", str(config), "--webhook-on", "all", "--flush-timeout", "2",
        "--mqtt", f"mqtt://127.0.0.1:{dead_port}/{topic}", "--webhook", f"http://127.0.0.1:{dead_port}/defects"])
    records = [json.loads(line) for line in result.stdout.splitlines()]
    frames = [r for r in records if "event" not in r]
    summary = records[-1]
    sinks = summary["sinks"]
    assert len(frames) == len(sorted(parts.rglob("*.png"))) and all(r["decision"] == "anomalous" for r in frames)

    assert subscriber.wait_for(topic, len(frames))
    assert sorted(r["frame"] for r in subscriber.on(topic)) == [r["frame"] for r in frames]
    last = Subscriber(broker.port, f"{topic}/last")  # retained: a late subscriber has the last verdict at once
    assert last.wait_for(f"{topic}/last", 1) and last.on(f"{topic}/last")[-1] == frames[-1]
    assert [r["frame"] for r in receiver.accepted] == [r["frame"] for r in frames]
    good_mqtt, dead_mqtt = f"mqtt://127.0.0.1:{broker.port}/{topic}", f"mqtt://127.0.0.1:{dead_port}/{topic}"
    assert sinks[good_mqtt]["delivered"] >= len(frames) and sinks[good_mqtt]["undelivered"] == 0
    assert sinks[f"webhook {receiver.url}"]["delivered"] == len(frames)
    assert sinks[opcua]["updates"] >= 1 and sinks[opcua]["failed"] == 0

    # The dead ones never stopped inspection: they said so, and what they could not deliver is counted.
    lost = {e["sink"] for e in records if e.get("event") == "sink_lost"}
    assert {dead_mqtt, f"webhook http://127.0.0.1:{dead_port}/defects"} <= lost
    assert sinks[dead_mqtt]["undelivered"] >= len(frames) and sinks[dead_mqtt]["outages"] == 1
    assert result.exit_code == cli.EXIT_OUTPUT_FAILED
    lost_count = sum(counts.get(k, 0) for counts in sinks.values() for k in ("dropped", "failed", "undelivered"))
    assert summary["output_errors"] == lost_count and "records not delivered" in result.stderr
    assert f"{good_mqtt}: {sinks[good_mqtt]['delivered']} delivered" in result.stderr
    subscriber.close()
    last.close()
    receiver.close()


def test_an_opcua_port_in_use_is_refused_at_start(tf_bundle, target_images):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"opc.tcp://127.0.0.1:{taken.getsockname()[1]}/mrad"
        result = CliRunner().invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(target_images[0]),
                                                   "--provider", "cpu", "--opcua", endpoint])
    assert result.exit_code == cli.EXIT_BAD_ARGUMENTS and "Traceback" not in result.stderr
    assert f"error: the OPC UA server cannot start at {endpoint}: " in result.stderr and "address already in use" in (
        result.stderr)


@pytest.mark.parametrize("text,message", [
    ("mqtt-qso = 1", "unknown key 'mqtt-qso'; the keys are station, mqtt, "),
    ("mqtt-qos = 3", "mqtt-qos: expected one of 0, 1, 2, got 3"),
    ('mqtt = "http://broker/line"', "mqtt: 'http://broker/line' is not a URL of the form mqtt://HOST[:PORT]/TOPIC"),
    ('mqtt = ["mqtt://broker"]', "mqtt: 'mqtt://broker' needs a topic"),
    ('opcua = "opc.tcp://plc:99999/mrad"', "opcua: 'opc.tcp://plc:99999/mrad': Port out of range"),
    ('webhook-on = "defects"', "webhook-on: expected one of anomalous, all, got 'defects'"),
    ("flush-timeout = -1", "flush-timeout: expected a number from 0 to 3600, got -1"),
    ('station = "cam 1"', "station: expected a name of letters"),
    ("mqtt = [", "is not valid TOML"),
])
def test_a_bad_line_file_is_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "line.toml"
    path.write_text(text + "\n")
    with pytest.raises(MradError, match=re.escape(message)) as refused:
        line_settings(path)
    assert str(path) in str(refused.value)


def test_options_replace_the_file_and_add_to_its_lists(tmp_path, tf_bundle):
    path = tmp_path / "line.toml"
    path.write_text('mqtt = "mqtt://user:secret@broker/plant/cam1"\nmqtt-qos = 2\nmqtt-buffer = "spool"\n'
                    'webhook-on = "all"\n')
    settings = line_settings(path, mqtt=("mqtts://broker:8884/plant/cam2",), mqtt_qos=0, webhook_on=None, webhook=())
    assert [t.url for t in settings.mqtt] == ["mqtt://user@broker:1883/plant/cam1", "mqtts://broker:8884/plant/cam2"]
    assert settings.mqtt[0].password == "secret" and settings.mqtt[1].tls  # the password never appears in records
    assert (settings.mqtt_qos, settings.webhook_on, settings.mqtt_buffer) == (0, "all", tmp_path / "spool")
    refused = CliRunner().invoke(run_cli.main, ["--bundle", str(tf_bundle), "--input", str(tmp_path),
                                                "--mqtt", "mqtt://broker"])
    assert refused.exit_code == cli.EXIT_BAD_ARGUMENTS and "error: --mqtt: 'mqtt://broker' needs a topic" in refused.stderr


BLOCKED_RUN = r"""
import importlib.abc, json, sys
from click.testing import CliRunner

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("paho", "asyncua"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)", name=name)

sys.meta_path.insert(0, Block())
from mrad.runtime.commands import run as run_cli

plain = CliRunner().invoke(run_cli.main, ["--bundle", sys.argv[1], "--input", sys.argv[2], "--provider", "cpu"])
mqtt = CliRunner().invoke(run_cli.main, ["--bundle", sys.argv[1], "--input", sys.argv[2], "--provider", "cpu",
                                         "--mqtt", "mqtt://127.0.0.1/line"])
print(json.dumps({"plain": plain.exit_code, "mqtt": mqtt.exit_code, "error": mqtt.stderr,
                  "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"paho", "asyncua"})}))
"""


def test_the_base_runtime_runs_without_the_line_extra(tf_bundle, target_images):
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(tf_bundle), str(target_images[0])],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["plain"] == 0 and report["loaded"] == []
    assert report["mqtt"] == cli.EXIT_BAD_ARGUMENTS and 'pip install "mrad-edge[protocols]"' in report["error"]


def test_the_outbox_is_bounded_and_reports_an_outage_once():
    from mrad.runtime.line.outbox import Outbox

    outbox = Outbox(3)
    began = [outbox.put(i) for i in range(6)]
    assert began == [False, False, False, True, False, False]  # the first drop of an outage, once
    assert len(outbox) == 3 and outbox.dropped == 3
    assert [item for _, item in outbox.take(2)] == [3, 4]  # the newest kept, oldest first
    outbox.delivered()
    assert [outbox.put(i) for i in (6, 7, 8, 9)] == [False, False, True, False]  # after a delivery, a new outage
    assert outbox.clear() == 3 and len(outbox) == 0
    with pytest.raises(ValueError):
        Outbox(0)
