"""What mrad-run's line sinks cost per record, each against a real far end on loopback.

    python -m mrad.tools.bench_sinks [--records 1000]

Starts a mosquitto broker (the binary must be installed), serves OPC UA and
an HTTP receiver in this process, then hands each sink the same records and
prints per sink: the time ``write`` takes per record (what scoring waits
for), the time until everything was delivered, and this process's CPU time
per record (the sink's own threads; for OPC UA and webhooks also the
in-process client or receiver, so an upper bound).
"""

from __future__ import annotations

import getpass
import http.server
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import click

from ..runtime.line.settings import mqtt_target
from ..runtime.line.records import now
from ..runtime.line.sinks import JsonLines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broker(folder: str) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        raise click.ClickException("mosquitto is not installed (apt-get install mosquitto)")
    port = _free_port()
    config = os.path.join(folder, "mosquitto.conf")
    with open(config, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n")
    process = subprocess.Popen([binary, "-c", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1000):  # until the port opens, at most about 10 s
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.01)
    process.kill()
    raise click.ClickException("mosquitto did not open its port")


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _measure(name: str, sink, records: list[dict], delivered=lambda: True) -> None:
    cpu, start = time.process_time(), time.perf_counter()
    for record in records:
        sink.write(record)
    written = time.perf_counter()
    ok = delivered()
    done, cpu = time.perf_counter(), time.process_time() - cpu
    n = len(records)
    click.echo(f"{name:30s} write {(written - start) / n * 1e6:6.1f} us/record, all delivered after "
               f"{done - start:6.3f} s{'' if ok else ' (NOT ALL)'}, process CPU {cpu / n * 1e6:6.1f} us/record")


@click.command()
@click.option("--records", default=1000, show_default=True, type=click.IntRange(min=1))
def main(records: int) -> None:
    """Per-record cost of the JSON lines, MQTT, OPC UA and webhook sinks on loopback."""
    from asyncua.sync import Client

    from ..runtime.line.mqtt import MqttSink
    from ..runtime.line.opcua import OpcUaSink
    from ..runtime.line.webhook import WebhookSink

    batch = [{"source": "rtsp://10.0.0.5/stream", "frame": i, "timestamp": now(), "score": 0.4321,
              "decision": "anomalous", "latency_ms": 80.1} for i in range(records)]
    folder = tempfile.mkdtemp(prefix="bench-sinks-")
    broker, port = _broker(folder)
    try:
        _measure("JSON lines (/dev/null)", JsonLines(open(os.devnull, "wb", buffering=0)), batch)
        for qos, buffer in ((0, None), (1, None), (2, None), (1, os.path.join(folder, "spool"))):
            sink = MqttSink(mqtt_target(f"mqtt://127.0.0.1:{port}/bench/{qos}"), qos=qos, buffer_dir=buffer,
                            buffer_size=records)
            sink.flush(5)  # connected before timing
            _measure(f"MQTT QoS {qos}" + (" --mqtt-buffer" if buffer else ""), sink, batch, lambda: sink.flush(120))
            sink.close(5)

        endpoint = f"opc.tcp://127.0.0.1:{_free_port()}/mrad"
        served = OpcUaSink(endpoint, "bench")
        client = Client(endpoint)
        client.connect()
        frame = client.get_node(f"ns={client.get_namespace_index('urn:mrad-edge')};s=bench.Frame")
        _measure("OPC UA", served, batch, lambda: any(frame.read_value() == records - 1 for _ in range(10_000)))
        client.disconnect()
        served.close(5)

        receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        hook = WebhookSink(f"http://127.0.0.1:{receiver.server_address[1]}/defects", "all", queue_size=records)
        _measure("webhook (every frame)", hook, batch, lambda: hook.flush(300))
        hook.close(5)
        receiver.shutdown()
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
