"""mrad-serve: one bundle behind HTTP for many cameras, on Ray Serve (the 'serve' extra)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .. import defaults
from ..core.bundle import read_manifest
from dataclasses import replace

from ..commands.common import (EXIT_OUTPUT_FAILED, command, enrollment_option, line_options, provider_option,
                               retrieval_option)
from ..commands.run import station_file
from ..formats.station import RecipeConfig
from ..line.engine import Stop, summary_line
from ..errors import MradError, SourceError
from ..line.settings import line_settings
from ..line.sinks import open_sinks
from ..line.settings import check_threshold
from . import APP_NAME, READER_PLACEMENTS, READER_RESTARTS, route_prefix

LOOPBACK = ("127.0.0.1", "localhost")
# Images and records pass through the object store one request at a time: Ray's default of 30 % of
# the machine's memory is far more than a local instance needs.
LOCAL_OBJECT_STORE = 256 * 1024 * 1024
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray resolves this node to 127.0.0.1, as on a laptop

EXAMPLES = f"""
\b
Examples:
  # a local Ray instance, two replicas, batches of up to 8 formed within 10 ms
  mrad-serve --bundle bundles/visa-tf --port 8000 --replicas 2
\b
  curl --data-binary @part.png http://127.0.0.1:8000/predict             # the JSON record
  curl -F image=@part.png 'http://127.0.0.1:8000/predict?source=cam3'    # multipart, named camera
  curl --data-binary @part.png -o map.png 'http://127.0.0.1:8000/predict?map=png'   # the overlay
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
  # a second bundle beside it on the same cluster and port: POST http://10.0.0.2:8000/line7/predict
  mrad-serve --bundle /shared/bundles/line7-clip --address 10.0.0.2:6379 --name line7 --autoscale 1:4 \\
      --target-ongoing-requests 4 --upscale-delay-s 5 --downscale-delay-s 120
\b
POST /predict takes the image as the raw body or as the multipart/form-data field 'image' and answers
mrad-run's JSON record (source, frame, timestamp, score, decision when a threshold is known,
latency_ms) with map_size, map_max and map_mean; ?source=NAME and ?frame=N label the record;
?map=png answers the heatmap overlay PNG instead, the record in the X-Mrad-Record header. A bad
image is answered 400 with the error mrad-run would print. Headers X-Mrad-Batch-Size, X-Mrad-Node
and X-Mrad-Pid say how the request was scored. GET /healthz: alive; GET /readyz: a replica has its
bundle loaded (answered by a replica, so only once one is up); GET /stats: that replica's batches.
From Python: serve.get_app_handle("{APP_NAME}").predict.remote(image_bytes).result() gives the record.
--name NAME serves the bundle as application NAME: its routes move under /NAME (/NAME/predict, ...),
so several bundles share one cluster and one HTTP port, and serve.get_app_handle("NAME") picks one.
On a cluster whose Serve already runs, its HTTP host and port stay: --host and --port only apply
to the first mrad-serve there. A NAME already running on the cluster is refused, not replaced.
With --autoscale, Serve adds a replica when the requests in flight per replica stay above
--target-ongoing-requests for --upscale-delay-s, and removes one when they stay below it for
--downscale-delay-s, averaged over --look-back-period-s; unset, the delays, the window and
--metrics-interval-s are Ray Serve's defaults, which scale down only after minutes.
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
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="HTTP port.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP proxy binds (0.0.0.0 for every interface).")
@click.option("--address", help="Ray cluster to join: HOST:PORT of its head, or auto for the one this machine runs "
                                "[default: a Ray instance of its own, stopped with mrad-serve].")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="Replicas, each with its own Detector.")
@click.option("--name", default=APP_NAME, show_default=True,
              help="Ray Serve application name, for serve.get_app_handle(NAME); other than the default, routes "
                   "are under /NAME.")
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
@click.option("--max-pixels", default=defaults.MAX_IMAGE_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Images with more pixels are refused (400) from their header, before decoding.")
def main(bundle, recipe, enrollment, trusted_keys, port, host, address, replicas, name, autoscale, target_ongoing_requests, upscale_delay_s,
         downscale_delay_s, look_back_period_s, metrics_interval_s, max_batch_size, batch_wait_ms,
         num_cpus_per_replica, num_gpus_per_replica, max_replicas_per_node, cameras, out, reconnect_timeout,
         reader_placement, reader_resource, config_file, provider, retrieval, threshold, calibration_file, max_pixels,
         **line):
    """Serve a bundle (or a station's recipe) over HTTP to many cameras: replicas on a Ray cluster, requests batched."""
    served = served_recipe(station_file(line), recipe, bundle, dict(
        threshold=threshold, calibration=calibration_file, enrollment=enrollment, retrieval=retrieval,
        trusted_keys=tuple(trusted_keys)))
    if cameras and out is None:
        raise MradError("--camera needs --out, the folder for its records")
    settings = line_settings(config_file, **line)
    if (config_file or settings.mqtt or settings.opcua or settings.webhook) and not cameras:
        raise MradError("--config, --mqtt, --opcua and --webhook send the records of --camera streams: add --camera "
                        "(a client posting to /predict gets its record in the answer)")
    if reader_resource and not cameras:
        raise MradError("--reader-resource places --camera readers: add --camera")
    prefix = route_prefix(name)
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
    if address and address.split(":")[0] in LOOPBACK:
        # A cluster on loopback (ray start --node-ip-address 127.0.0.1): Ray would rewrite 127.0.0.1 to the
        # machine's outward address, where nothing listens; this switch keeps every address on loopback.
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    import ray  # the 'serve' extra: a missing one is named by the command decorator
    from ray import serve

    from .app import application

    app = application(served, replicas=replicas, autoscale=parse_autoscale(autoscale) if autoscale else None,
                      autoscaling=autoscaling, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                      num_cpus_per_replica=num_cpus_per_replica, num_gpus_per_replica=num_gpus_per_replica,
                      max_replicas_per_node=max_replicas_per_node, provider=provider, max_pixels=max_pixels)
    # "local": a Ray instance of its own even where one runs already, so stopping it touches no other
    local = {} if address else {"object_store_memory": LOCAL_OBJECT_STORE}
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, **local)
    stop = Stop().on_signals()  # after ray.init, which installs handlers of its own
    deployed, readers, summary = False, None, None
    try:
        if cameras:  # files locked and the placement checked before anything is deployed
            from .readers import Readers

            readers = Readers(cameras, out, reconnect_timeout, name, reader_placement, reader_resource)
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        if name in serve.status().applications:  # serve.run would replace it under the mrad-serve that runs it
            raise MradError(f"an application named {name!r} already runs on this cluster: choose another --name, "
                            f"or stop the mrad-serve serving it")
        deployed = True
        try:
            serve.run(app, name=name, route_prefix=prefix)
        except Exception as exc:  # a replica that cannot open the bundle or its calibration
            raise MradError(f"the application did not start: {exc}") from exc
        click.echo(f"mrad-serve: POST http://{host}:{port}{prefix.rstrip('/')}/predict (Ray Serve application "
                   f"{name!r}); SIGINT or SIGTERM to stop", err=True)
        if readers:
            replica = serve.get_app_handle(name).readiness.remote().result()
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
