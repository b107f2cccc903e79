"""mrad-serve: one bundle (or a station's recipe) behind the Open Inference Protocol (REST and gRPC) and today's
/predict, scored by replicas on a Ray cluster or, with --local, in this process (the 'serve' extra)."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click
from click.core import ParameterSource

from .. import defaults
from ..commands.common import (EXIT_OUTPUT_FAILED, command, enrollment_option, line_options, provider_option,
                               retrieval_option)
from ..commands.run import station_file
from ..core.bundle import read_manifest
from ..errors import MradError, SourceError
from ..formats.station import RecipeConfig
from ..line.engine import Stop, summary_line
from ..line.settings import check_threshold, line_settings
from ..line.sinks import open_sinks
from . import APP_NAME, READER_PLACEMENTS, READER_RESTARTS, protocol, route_prefix

LOOPBACK = ("127.0.0.1", "localhost")
# Images and records pass through the object store one request at a time: Ray's default of 30 % of
# the machine's memory is far more than a local instance needs.
LOCAL_OBJECT_STORE = 256 * 1024 * 1024
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray resolves this node to 127.0.0.1, as on a laptop
TOKEN_ENV = "MRAD_SERVE_TOKEN"  # the bearer token, when no --token-file is given
MIN_TOKEN_CHARS = 16  # a shorter token can be guessed
GRPC_PORT = 8001  # the Open Inference Protocol's gRPC port by custom (Triton's, KServe's), beside HTTP's 8000
MB = 1024 * 1024
# Options that only mean something for replicas on Ray: refused with --local rather than ignored.
RAY_ONLY = ("address", "replicas", "autoscale", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
            "look_back_period_s", "metrics_interval_s", "num_cpus_per_replica", "num_gpus_per_replica",
            "max_replicas_per_node", "cameras", "out", "reconnect_timeout", "reader_placement", "reader_resource")

EXAMPLES = f"""
\b
Examples:
  # one line PC, no Ray: the station's active recipe, batches of up to 8 formed within 10 ms
  mrad-serve --local --station station.toml
\b
  # the Open Inference Protocol (KServe v2) on --port (REST) and --grpc-port; any KServe or Triton client
  curl http://127.0.0.1:8000/v2/models/mrad                                # inputs and outputs
  curl -d '{{"inputs": [{{"name": "image", "datatype": "BYTES", "shape": [1],
            "data": ["'$(base64 -w0 part.png)'"]}}]}}' http://127.0.0.1:8000/v2/models/mrad/infer
  # today's route, beside it
  curl --data-binary @part.png http://127.0.0.1:8000/predict             # the JSON record
  curl -F image=@part.png 'http://127.0.0.1:8000/predict?source=cam3'    # multipart, named camera
  curl --data-binary @part.png -o map.png 'http://127.0.0.1:8000/predict?map=png'   # the overlay
\b
  # reachable from the line's network: a token and TLS (or --insecure on a network of its own)
  MRAD_SERVE_TOKEN=$(cat /etc/mrad/token) mrad-serve --local --station station.toml --host 0.0.0.0 \\
      --tls-cert /etc/mrad/cert.pem --tls-key /etc/mrad/key.pem
  curl --cacert /etc/mrad/cert.pem -H "Authorization: Bearer $(cat /etc/mrad/token)" https://station7:8000/v2
\b
  # a local Ray instance, two replicas
  mrad-serve --bundle bundles/visa-tf --port 8000 --replicas 2
\b
  # two RTSP cameras read by mrad-serve itself, records to records/camera-0.jsonl and camera-1.jsonl
  mrad-serve --bundle bundles/visa-tf --replicas 2 --camera rtsp://10.0.0.5/s --camera rtsp://10.0.0.6/s \\
      --out records/
\b
  # cameras read on the nodes that reach them (started with ray start ... --resources '{{"camera": 1}}'),
  # records to records/ here, to an MQTT broker, and defects to a webhook: as mrad-run sends them
  mrad-serve --bundle /shared/bundles/visa-tf --address 10.0.0.2:6379 --threshold 0.47 \\
      --camera rtsp://10.0.0.5/s --camera rtsp://10.0.0.6/s --reader-resource camera --out records/ \\
      --mqtt mqtt://broker.plant:1883/line3 --webhook http://mes.plant/api/defects
\b
  # an existing cluster (ray start --head ...), quarter of a GPU per replica, 1 to 8 replicas by load
  mrad-serve --bundle /shared/bundles/visa-tf --address 10.0.0.2:6379 --provider cuda \\
      --num-gpus-per-replica 0.25 --autoscale 1:8 --max-batch-size 16 --batch-wait-ms 5
\b
  # a second bundle on the same cluster, on ports of its own: model line7, POST http://HOST:8010/line7/predict
  mrad-serve --bundle /shared/bundles/line7-clip --address 10.0.0.2:6379 --name line7 --autoscale 1:4 \\
      --port 8010 --grpc-port 8011 --target-ongoing-requests 4 --upscale-delay-s 5 --downscale-delay-s 120
\b
The Open Inference Protocol: GET /v2/health/live, /v2/health/ready, /v2 (server metadata), /v2/models/NAME
(model metadata), /v2/models/NAME/ready; POST /v2/models/NAME/infer; the same over gRPC (service
inference.GRPCInferenceService, the .proto ships in the package). The model (NAME: --name) takes input
'image' (BYTES [N], encoded image files; base64 text in JSON) or 'pixels' (UINT8 [N, H, W, 3], RGB) and
answers 'score' (FP32 [N]) and 'decision' (BYTES [N]: anomalous, normal, or empty without a threshold),
and 'anomaly_map' (FP32 [N, H, W]) only when the request names it among its outputs. Request parameters
'part_id' (echoed) and 'recipe' (must be the one served) label a request; the response's parameters
name the recipe and threshold that judged it. Tensors travel as JSON or as binary data (the binary
tensor data extension); errors are the protocol's {{"error": "..."}} with a status code (gRPC: a status).
\b
POST /predict takes the image as the raw body or as the multipart/form-data field 'image' and answers
mrad-run's JSON record (source, frame, timestamp, score, decision when a threshold is known,
latency_ms) with map_size, map_max and map_mean; ?source=NAME and ?frame=N label the record;
?map=png answers the heatmap overlay PNG instead, the record in the X-Mrad-Record header. A bad
image is answered 400 with the error mrad-run would print. Headers X-Mrad-Batch-Size, X-Mrad-Node
and X-Mrad-Pid say how the request was scored. GET /healthz: alive; GET /readyz: what serves (the
bundle by digest, recipe, threshold; no paths); GET /stats: the batches formed (by one replica on Ray).
--name NAME names the model (and the Ray Serve application: serve.get_app_handle("NAME") reaches it from
Python, .predict.remote(image_bytes).result() gives the record); today's routes move under /NAME.
A NAME already running on the cluster is refused, not replaced; each mrad-serve listens on ports of its own.
\b
Protection: on loopback (the default) anyone on this machine may call. Beyond it (--host 0.0.0.0) a
bearer token is needed: {TOKEN_ENV} or --token-file (at least {MIN_TOKEN_CHARS} characters; python -c
"import secrets; print(secrets.token_urlsafe(32))"), sent as Authorization: Bearer <token> (gRPC: the
authorization metadata); and TLS (--tls-cert, --tls-key) keeps it from being read on the wire. Only
/v2/health/*, /v2/models/NAME/ready, /healthz and /readyz answer without it. Binding beyond loopback
without a token is refused unless --insecure. Every request is bounded: --header-timeout-s for its
headers (and an idle connection), --body-timeout-s and --max-body-mb for its body, --max-form-parts,
--max-request-images and --max-pixels (checked from the image's header, before decoding). A slow or
huge upload holds one connection until its bound and is answered 408 or 413; others are answered
meanwhile. No answer carries a traceback; unexpected failures are logged here.
\b
With Ray (the default), replicas score: mrad-serve answers REST and gRPC itself and hands each image to the
application (Ray Serve's own HTTP proxy is not started). A local Ray instance keeps its ports on loopback;
--address joins a cluster, whose nodes must reach each other. With --autoscale, Serve adds a replica when
the requests in flight per replica stay above --target-ongoing-requests for --upscale-delay-s, and removes
one when they stay below it for --downscale-delay-s, averaged over --look-back-period-s; unset, the
delays, the window and --metrics-interval-s are Ray Serve's defaults, which scale down only after minutes.
With --camera, one reader actor per stream, spread over the cluster's nodes (--reader-placement driver:
all on this machine; --reader-resource NAME: only on nodes with that custom resource), sends its frames
to the replicas and each record back to mrad-serve, which writes camera-<n>.jsonl in --out on this
machine and hands every record to the line sinks (--mqtt, --opcua, --webhook, --config: as mrad-run
does, one for all cameras; the OPC UA station shows the latest frame of any camera). Each camera's
records start with a "reader_started" event (node and process reading it) and end with "stream_end".
A reader that dies is restarted by Ray (up to {READER_RESTARTS} times) and goes on from the frame in flight (a
video file) or the camera's next frame, after a "reader_restarted" event. mrad-serve ends when every
stream has (video files), printing mrad-run's summary with what each sink delivered, dropped or
failed; a camera lost past --reconnect-timeout gives exit 4, records a sink did not deliver exit 5.
SIGINT or SIGTERM stop the application (and the local Ray instance it started).
"""


@command("mrad-serve", epilog=EXAMPLES)
@click.option("--bundle", type=click.Path(path_type=Path), help="Bundle directory from mrad-export.")
@click.option("--recipe", help="With --station FILE: the recipe to serve [default: the file's active, else its first].")
@enrollment_option
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Public key (PEM) whose signature the bundle must carry (mrad-sign); repeatable.")
@click.option("--local", is_flag=True,
              help="Score in this process, without Ray: one line PC. The same routes, protocol and batching; Ray's "
                   "options (--address, --replicas, --autoscale, --camera, ...) are refused.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP port: the Open Inference Protocol's REST routes and /predict (0: a free one, printed).")
@click.option("--grpc-port", default=GRPC_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="gRPC port of the Open Inference Protocol (0: a free one, printed).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address REST and gRPC bind (0.0.0.0 for every interface: then a token is needed, or --insecure).")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help=f"File whose first line is the bearer token every call but the health checks must send "
                   f"(Authorization: Bearer <token>) [default: ${TOKEN_ENV}, else none]. At least "
                   f"{MIN_TOKEN_CHARS} characters.")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="TLS certificate chain (PEM) for REST (https) and gRPC; with --tls-key.")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The TLS certificate's private key (PEM); with --tls-cert.")
@click.option("--insecure", is_flag=True,
              help="Allow --host beyond loopback without a token (a network of its own, nobody else on it).")
@click.option("--max-body-mb", default=protocol.MAX_BODY_BYTES / MB, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="A request body above this is refused (413), REST and gRPC.")
@click.option("--header-timeout-s", default=protocol.HEADER_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="A request's headers must arrive within this; an idle connection is closed after as long.")
@click.option("--body-timeout-s", default=protocol.BODY_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="A request's body must arrive within this of its headers, else 408.")
@click.option("--max-form-parts", default=protocol.MAX_FORM_PARTS, show_default=True, type=click.IntRange(min=1),
              help="Parts of a multipart/form-data POST /predict at most (400 beyond).")
@click.option("--max-request-images", default=protocol.MAX_REQUEST_IMAGES, show_default=True,
              type=click.IntRange(min=1), help="Images in one inference request (its batch axis) at most.")
@click.option("--max-json-map-values", default=protocol.MAX_JSON_MAP_VALUES, show_default=True,
              type=click.IntRange(min=0),
              help="An anomaly_map answered as JSON numbers holds at most this many values; larger ones must be "
                   "asked for as binary data.")
@click.option("--address", help="Ray cluster to join: HOST:PORT of its head, or auto for the one this machine runs "
                                "[default: a Ray instance of its own, on loopback, stopped with mrad-serve].")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="Replicas, each with its own Detector.")
@click.option("--name", default=APP_NAME, show_default=True,
              help="The model's name in the protocol (/v2/models/NAME) and the Ray Serve application's, for "
                   "serve.get_app_handle(NAME); other than the default, /predict and the others are under /NAME.")
@click.option("--autoscale", metavar="MIN:MAX", help="Scale between MIN and MAX replicas by load (replaces --replicas).")
@click.option("--target-ongoing-requests", type=click.FloatRange(min=0, min_open=True),
              help="--autoscale: requests in flight (running and queued) per replica Serve scales to keep "
                   "[default: --max-batch-size, one batch per replica].")
@click.option("--upscale-delay-s", type=click.FloatRange(min=0),
              help="--autoscale: how long load must stay high before a replica is added [default: Ray Serve's].")
@click.option("--downscale-delay-s", type=click.FloatRange(min=0),
              help="--autoscale: how long load must stay low before a replica is removed [default: Ray Serve's].")
@click.option("--look-back-period-s", type=click.FloatRange(min=0, min_open=True),
              help="--autoscale: the window load is averaged over [default: Ray Serve's].")
@click.option("--metrics-interval-s", type=click.FloatRange(min=0, min_open=True),
              help="--autoscale: how often load is reported to Serve's autoscaler; below --look-back-period-s "
                   "[default: Ray Serve's].")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per encoder call at most.")
@click.option("--batch-wait-ms", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a batch waits for more images before it runs: more throughput, more latency.")
@click.option("--num-cpus-per-replica", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--num-gpus-per-replica", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="GPUs each replica reserves; fractions share one GPU between replicas.")
@click.option("--max-replicas-per-node", type=click.IntRange(min=1), help="Spread replicas over nodes.")
@click.option("--camera", "cameras", multiple=True, metavar="URL",
              help="A stream to read and score (OpenCV index, URL, GStreamer pipeline or video file), one reader "
                   "actor each, placed by --reader-placement and --reader-resource; repeatable. Records go to --out "
                   "and to the line sinks (--mqtt, --opcua, --webhook, --config).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Folder on this machine for the --camera records, wherever they are read: camera-<n>.jsonl, one "
                   "JSON line per frame as mrad-run writes (each file emptied first and locked for this mrad-serve).")
@click.option("--reconnect-timeout", default=defaults.RECONNECT_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0),
              help="Seconds a lost --camera may stay away before its reader gives up (exit 4).")
@click.option("--reader-placement", type=click.Choice(READER_PLACEMENTS), default="spread", show_default=True,
              help="Where --camera readers run: spread over the cluster's nodes (Ray's SPREAD strategy), or all on "
                   "the driver, the machine running mrad-serve.")
@click.option("--reader-resource", metavar="NAME",
              help="Run --camera readers only on nodes with this custom resource, spread among them: the nodes that "
                   "reach the cameras, started with ray start ... --resources '{\"NAME\": 1}'.")
@line_options
@provider_option
@retrieval_option
@click.option("--threshold", type=float, help="Decision threshold on the score; overrides any calibration.")
@click.option("--calibration", "calibration_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Calibration file [default: <bundle>.calibration.json, or inside --enrollment's folder, when present].")
@click.option("--max-pixels", default=protocol.MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Images with more pixels are refused (400) from their header (or a pixels tensor's shape), "
                   "before decoding: a small PNG can declare 100 megapixels.")
def main(bundle, recipe, enrollment, trusted_keys, local, port, grpc_port, host, token_file, tls_cert, tls_key, insecure,
         max_body_mb, header_timeout_s, body_timeout_s, max_form_parts, max_request_images, max_json_map_values,
         address, replicas, name, autoscale, target_ongoing_requests, upscale_delay_s,
         downscale_delay_s, look_back_period_s, metrics_interval_s, max_batch_size, batch_wait_ms,
         num_cpus_per_replica, num_gpus_per_replica, max_replicas_per_node, cameras, out, reconnect_timeout,
         reader_placement, reader_resource, config_file, provider, retrieval, threshold, calibration_file, max_pixels,
         **line):
    """Serve a bundle (or a station's recipe) to the line's software: the Open Inference Protocol over REST and
    gRPC, and /predict; scored by replicas on a Ray cluster, or in this process with --local; requests batched."""
    served = served_recipe(station_file(line), recipe, bundle, dict(
        threshold=threshold, calibration=calibration_file, enrollment=enrollment, retrieval=retrieval,
        trusted_keys=tuple(trusted_keys)))
    prefix = route_prefix(name)
    listen = listening(host, port, grpc_port, token_file, tls_cert, tls_key, insecure, prefix)
    limits = protocol.Limits(max_body_bytes=int(max_body_mb * MB), max_request_images=max_request_images,
                             max_pixels=max_pixels, max_json_map_values=max_json_map_values,
                             header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                             max_form_parts=max_form_parts)
    settings = line_settings(config_file, **line)
    if local:
        context = click.get_current_context()
        given = [option.opts[0] for option in context.command.params if option.name in RAY_ONLY
                 and context.get_parameter_source(option.name) is not ParameterSource.DEFAULT]
        if given:
            raise MradError(f"{', '.join(given)}: options of the Ray mode; --local scores in this process alone")
    if cameras and out is None:
        raise MradError("--camera needs --out, the folder for its records")
    if (config_file or settings.mqtt or settings.opcua or settings.webhook) and not cameras:
        raise MradError("--config, --mqtt, --opcua and --webhook send the records of --camera streams: add --camera "
                        "(a client posting to /predict gets its record in the answer)")
    if reader_resource and not cameras:
        raise MradError("--reader-resource places --camera readers: add --camera")
    # Ray Serve's autoscaling_config keys, under the same names
    autoscaling = {key: value for key, value in (("target_ongoing_requests", target_ongoing_requests),
                                                 ("upscale_delay_s", upscale_delay_s),
                                                 ("downscale_delay_s", downscale_delay_s),
                                                 ("look_back_period_s", look_back_period_s),
                                                 ("metrics_interval_s", metrics_interval_s)) if value is not None}
    if autoscaling and not autoscale:
        given = ", ".join("--" + key.replace("_", "-") for key in autoscaling)
        raise MradError(f"{given}: autoscaling options, they need --autoscale MIN:MAX")
    if look_back_period_s is not None and metrics_interval_s is not None and look_back_period_s <= metrics_interval_s:
        raise MradError(f"--look-back-period-s {look_back_period_s:g} must be longer than --metrics-interval-s "
                        f"{metrics_interval_s:g}: the window averages several reports of the load")
    read_manifest(served.bundle)  # a bad bundle ends here (exit 3), before Ray starts
    if local:
        serve_locally(served, name, listen, limits, provider, max_batch_size, batch_wait_ms)
        return
    if address is None or address.split(":")[0] in LOOPBACK:
        # A Ray instance of its own, or a cluster on loopback (ray start --node-ip-address 127.0.0.1): every Ray
        # process listens on loopback alone (by default they bind every interface), and 127.0.0.1 is not
        # rewritten to the machine's outward address, where nothing would listen.
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    import ray  # the 'serve' extra: a missing one is named by the command decorator
    from ray import serve

    from .app import RayScorer, application
    from .front import Front

    app = application(served, replicas=replicas, autoscale=parse_autoscale(autoscale) if autoscale else None,
                      autoscaling=autoscaling, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                      num_cpus_per_replica=num_cpus_per_replica, num_gpus_per_replica=num_gpus_per_replica,
                      max_replicas_per_node=max_replicas_per_node, provider=provider, max_pixels=max_pixels)
    # "local": a Ray instance of its own even where one runs already, so stopping it touches no other
    own = {} if address else {"object_store_memory": LOCAL_OBJECT_STORE}
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, **own)
    stop = Stop().on_signals()  # after ray.init, which installs handlers of its own
    deployed, readers, summary, front = False, None, None, None
    try:
        if cameras:  # files locked and the placement checked before anything is deployed
            from .readers import Readers

            readers = Readers(cameras, out, reconnect_timeout, name, reader_placement, reader_resource)
        # Requests come in through this process's front (the token, the bounds, the protocol): Serve's own HTTP
        # proxy is not started.
        serve.start(proxy_location="Disabled")
        if name in serve.status().applications:  # serve.run would replace it under the mrad-serve that runs it
            raise MradError(f"an application named {name!r} already runs on this cluster: choose another --name, "
                            f"or stop the mrad-serve serving it")
        deployed = True
        try:
            serve.run(app, name=name, route_prefix=None)
        except Exception as exc:  # a replica that cannot open the bundle or its calibration
            raise MradError(f"the application did not start: {exc}") from exc
        handle = serve.get_app_handle(name)
        replica = handle.readiness.remote().result()
        front = Front(RayScorer(handle, name, replica["recipe"]), listen, limits).start()
        announce(front, name, f"Ray Serve application {name!r}")
        if readers:
            check_threshold(settings, replica["threshold"])
            readers.sinks += open_sinks(settings, events=readers.event)  # their link events go to every output
            readers.start()
            summary = {"threshold": replica["threshold_origin"]}
        while not stop.wait(0 if readers else 0.5):
            if readers and not readers.poll(0.5):
                break  # every stream has ended (video files): so has the work
        if readers and stop:
            readers.stop(stop.reason)
    finally:
        if front is not None:
            front.close()
        if readers:  # before Ray goes: the readers are ended, then the sinks deliver what they hold
            counts = readers.close(settings.flush_timeout)
            if summary:
                summary = readers.stats.summary(summary["threshold"], stop.reason)
                if counts:
                    summary["sinks"] = counts
                click.echo(f"mrad-serve: {summary_line(summary)}", err=True)
        if address and deployed:  # another's cluster: take down this application alone
            serve.delete(name)
        ray.shutdown()  # a local instance goes with it, Serve's actors included
        click.echo("mrad-serve: stopped", err=True)
    if readers and readers.lost:
        raise SourceError("; ".join(readers.lost))
    if summary and summary["output_errors"]:
        sys.exit(EXIT_OUTPUT_FAILED)


def serve_locally(served: RecipeConfig, name: str, listen, limits: protocol.Limits, provider: str, max_batch_size: int,
                  batch_wait_ms: float) -> None:
    """mrad-serve --local: the recipe opened here, the front over it, until SIGINT or SIGTERM."""
    from ..line.station import Recipe, Station
    from .front import Front
    from .local import LocalScorer

    station = Station.of(Recipe.open(served, provider=provider, max_pixels=limits.max_pixels,
                                     threshold_origin="--threshold"))
    scorer = LocalScorer(station, name, max_batch_size, batch_wait_ms)
    stop = Stop().on_signals()
    front = None
    try:
        front = Front(scorer, listen, limits).start()
        announce(front, name, "this process (--local)")
        while not stop.wait(0.5):
            pass
    finally:
        if front is not None:
            front.close()
        scorer.close()
        click.echo("mrad-serve: stopped", err=True)


def listening(host: str, port: int, grpc_port: int, token_file: Path | None, tls_cert: Path | None,
              tls_key: Path | None, insecure: bool, prefix: str):
    """Where to listen, and the protection: beyond loopback a token is needed, unless --insecure."""
    try:  # REST and gRPC, in both modes: the 'serve-local' extra (which 'serve' includes)
        from ..web.server import is_loopback
        from .front import Listen
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        raise MradError(f"mrad-serve needs {module}, part of the 'serve-local' extra: pip install "
                        "\"mrad-edge[serve-local]\" (or \"mrad-edge[serve]\" for Ray)") from exc

    if token_file is not None:
        lines = token_file.read_text(errors="replace").splitlines()
        token = lines[0].strip() if lines else ""
        where = f"--token-file {token_file}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
    if (token_file is not None or token) and len(token) < MIN_TOKEN_CHARS:
        raise MradError(f"{where}: a token of {len(token)} characters can be guessed; use at least {MIN_TOKEN_CHARS} "
                        "(python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    if (tls_cert is None) != (tls_key is None):
        raise MradError("--tls-cert and --tls-key go together: the certificate and its private key")
    if port and port == grpc_port:
        raise MradError(f"--port and --grpc-port are both {port}: REST and gRPC need a port each")
    if not is_loopback(host):
        if not token and not insecure:
            raise MradError(f"--host {host} is reachable from other machines: set a token ({TOKEN_ENV} or "
                            "--token-file) and TLS (--tls-cert, --tls-key), or pass --insecure on a network of its own")
        if token and tls_cert is None:
            click.echo(f"mrad-serve: warning: --host {host} without --tls-cert: the token crosses the network "
                       "readable", err=True)
    return Listen(host=host, port=port, grpc_port=grpc_port, token=token or None, tls_cert=tls_cert, tls_key=tls_key,
                  prefix=prefix)


def announce(front, name: str, scored_by: str) -> None:
    host = f"[{front.listen.host}]" if ":" in front.listen.host else front.listen.host
    click.echo(f"mrad-serve: model {name!r} scored by {scored_by}: REST {front.url}/v2/models/{name}/infer, gRPC "
               f"{host}:{front.grpc_port}{' (TLS)' if front.listen.tls else ''}, POST "
               f"{front.url}{front.listen.prefix.rstrip('/')}/predict; SIGINT or SIGTERM to stop", err=True)


def served_recipe(config, recipe: str | None, bundle: Path | None, overrides: dict) -> RecipeConfig:
    """The recipe to serve: one of a station file's (flags override it), or --bundle's with the flags."""
    given = {k: v for k, v in overrides.items() if v not in (None, ())}
    if config is None:
        if recipe:
            raise MradError("--recipe picks one of a station file's recipes: add --station station.toml")
        if not bundle:
            raise MradError("pass --bundle, or --station station.toml (and --recipe NAME) to serve one of its recipes")
        return RecipeConfig(name="default", bundle=Path(bundle), **given)
    if bundle:
        raise MradError("--bundle and --station: a station names its bundles in its recipes; give one or the other")
    entry = config.recipe(recipe or config.active or config.names[0])
    if "trusted_keys" in given:
        given["trusted_keys"] = entry.trusted_keys + given["trusted_keys"]
    return replace(entry, **given)


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' replicas."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise MradError(f"--autoscale takes MIN:MAX replicas, such as 1:4, not {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise MradError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


if __name__ == "__main__":
    main()
