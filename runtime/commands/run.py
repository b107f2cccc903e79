"""mrad-run: score a line's frames with a bundle."""

from __future__ import annotations

import contextlib
import sys
from itertools import islice
from pathlib import Path

import click

from dataclasses import replace

from click.core import ParameterSource

from ..errors import MradError, SourceError
from ..files import OutputBusy, lock_folder, open_exclusive
from ..formats.station import RecipeConfig, StationConfig, read_station
from ..line.control import RecipeFile
from ..line.engine import LineEngine, Stop, summary_line
from ..line.genicam import TRIGGERS, GenICamCamera, import_aravis, parse_settings
from ..line.settings import RUN_DEFAULTS, check_threshold, exposure_warnings, line_settings, run_settings
from ..line.sinks import JsonLines, Window, open_sinks
from ..line.sources import Camera, file_frames
from ..line.station import Recipe, Station
from .sign import sign_key_option, trusted_key_option
from .common import (EXIT_INPUT_FAILED, EXIT_OK, EXIT_OUTPUT_FAILED, command, enrollment_option, line_options,
                     provider_option, retrieval_option)

NAME_CHARS = 64  # a --name at most

EXAMPLES = """
\b
Examples:
  # a USB camera, with decisions from a calibration and heatmaps of every frame
  mrad-run --bundle bundles/visa-tf --camera 0 --save-maps maps/
\b
  # an RTSP stream, records to a file, give up if the camera stays away 5 minutes
  mrad-run --bundle bundles/visa-tf --camera rtsp://10.0.0.5/stream \\
      --out line3.jsonl --reconnect-timeout 300
\b
  # a folder, a glob and a video file, four frames per encoder call, fixed threshold
  mrad-run --bundle bundles/visa-tf --input parts/ --input 'line3/*.png' \\
      --input shift.mp4 --batch 4 --threshold 0.47
\b
  # three cameras at once: two RTSP streams and a GigE Vision camera, each read in its own thread
  mrad-run --bundle bundles/visa-tf --camera rtsp://10.0.0.5/stream --camera rtsp://10.0.0.6/stream \\
      --genicam 21345678 --out line3.jsonl --web 8080
\b
  # two recordings played side by side, each looping on its own, as two cameras would be
  mrad-run --bundle bundles/visa-tf --input cam1.mp4 --input cam2.mp4 --concurrent --loop --web 8080
\b
  # a GigE Vision camera by serial, one frame per PLC pulse on its trigger line, a decision due in 200 ms
  mrad-run --bundle bundles/visa-tf --genicam 21345678 --genicam-trigger hardware \\
      --genicam-set ExposureTime=5000 --genicam-set PixelFormat=BayerRG8 --deadline-ms 200
\b
  # records to the line: an MQTT broker, an OPC UA server for the PLC, a webhook per defect
  mrad-run --bundle bundles/visa-tf --camera 0 --station cam1 \\
      --mqtt mqtt://broker.plant:1883/line3/cam1 --opcua opc.tcp://127.0.0.1:4840/mrad \\
      --webhook http://mes.plant/api/defects
\b
  # the same from a file: each key is an option's name without its dashes
  mrad-run --bundle bundles/visa-tf --camera 0 --config line.toml
\b
  # the operator's page on http://127.0.0.1:8080/ (loopback); changes need the token
  MRAD_WEB_TOKEN=$(cat /etc/mrad/web-token) mrad-run --bundle bundles/visa-tf --camera 0 --web 8080
\b
  # a recording played again and again, the page open to the line's network
  mrad-run --bundle bundles/visa-tf --input shift.mp4 --loop --web 0.0.0.0:8080 \\
      --web-token-file /etc/mrad/web-token --web-host station7.plant
\b
Each frame gives one JSON line: source, frame, timestamp, camera (a GenICam camera's own frame_id
and timestamp_ns), score, decision (when a threshold is known), latency_ms, map (with --save-maps),
evidence (with --evidence), late and age_ms (decided past --deadline-ms); or error for a frame that
could not be read; or dropped for a frame read but not scored (--when-behind drop-oldest, or a stop
with frames read ahead); or late without a score (past --deadline-ms before scoring began). The
bundle's current enrollment (mrad-enroll) is used when there is one. Lines with "event" report a
GenICam camera's settings as read back, camera gaps, a source given up ("source_failed") and, last, the
run's summary (with its counts per source).
\b
Several sources (--camera and --genicam repeated, --input with --concurrent, or any mix) are read at once, each
in its own thread with its own queue, taken from in turn so that a fast source never starves a slow one;
batches mix them. Each record names its source and numbers its frames on its own; a camera lost for good is
given up ("source_failed", exit 4 at the end) while the others go on; the run ends when every source has
ended (or at Ctrl-C, SIGTERM, or --max-frames frames from each); the summary counts frames per source.
Without --concurrent, several --input values are one source, played one after another.
\b
The operator's page (--web, the 'web' extra) shows per source the latest frame with its heatmap, score
and decision, a plot of scores against the threshold, counters and camera health, live. Flagged
frames wait in a review queue: mark one good (enrolled as normal) or defect (optionally with a
drawn region), undo the last enrollment, recalibrate the threshold on the enrolled good parts; the
detector uses each change from the next frame on. Changes need the token and go to an audit log.
\b
MQTT and webhooks never hold up scoring: each has its own thread and a bounded queue (full, the
oldest record is dropped and counted); a broker or receiver that goes away is tried again until it
is back. A sink that loses its link says so in an event ("sink_lost", "sink_back", "sink_dropping");
the summary counts per sink what was delivered, dropped, failed or left undelivered (exit 5 if any).
"""


@command("mrad-run", epilog=EXAMPLES)
@click.option("--bundle", type=click.Path(path_type=Path),
              help="Bundle directory from mrad-export (one product); or give a --station file of several.")
@click.option("--recipe", help="With a station file: the recipe active at start [default: the file's active, else its "
                               "first]; --threshold, --calibration, --enrollment, --trusted-key and --retrieval apply "
                               "to it.")
@click.option("--input", "inputs", multiple=True,
              help="Image file, folder, glob or video file; repeat for several, read one after another as one "
                   "source (with --concurrent: each its own source, all at once).")
@click.option("--concurrent", is_flag=True,
              help="Read each --input as a source of its own, at the same time as the others (and as any cameras): "
                   "several recordings standing in for several cameras.")
@click.option("--camera", "cameras", multiple=True,
              help="OpenCV camera index (0, 1, ...), stream URL, GStreamer pipeline or a video file; repeat for "
                   "several, read at once.")
@click.option("--genicam", "genicams", multiple=True,
              help="GenICam camera (GigE Vision, USB3 Vision) by device id, serial number, MAC or IP address, "
                   "through Aravis (the 'line' extra); repeat for several, read at once.")
@click.option("--name", "given_names", multiple=True, metavar="NAME",
              help="A name for a source, shown on the operator's page and in the summary instead of its path, URL "
                   "or device id (at most 64 printable characters); repeat it, one per source, in the order "
                   "--input (all of them, one source, unless --concurrent), --camera, --genicam.")
@click.option("--genicam-set", "genicam_settings", multiple=True, metavar="NAME=VALUE",
              help="Set a GenICam feature at every (re)opening, typed by the camera's node (integer, float, "
                   "enumeration, boolean); a bare NAME runs a command feature. Repeatable, applied in order, to "
                   "every --genicam camera.")
@click.option("--genicam-trigger", type=click.Choice(TRIGGERS), default="off", show_default=True,
              help="off: the camera runs free; software: mrad-run triggers each frame it reads; hardware: the "
                   "camera's first trigger line (or --genicam-set TriggerSource=Line2), rising edge.")
@click.option("--recipe-file", type=click.Path(path_type=Path, dir_okay=False),
              help="A file holding a recipe's name: writing another name into it switches recipes from the next "
                   "frame (checked twice a second; SIGHUP: at once) [default: the station file's recipe-file].")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True), default="-",
              help="Where the JSON lines go (default: stdout); a file is locked for this run alone.")
@click.option("--save-maps", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for heatmap overlays (PNG), one per frame.")
@click.option("--display", is_flag=True, help="Show each frame with its heatmap in a window.")
@click.option("--threshold", type=float, help="Decision threshold on the score; overrides any calibration.")
@click.option("--calibration", "calibration_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Calibration file [default: <bundle>.calibration.json, or inside --enrollment's folder, when "
                   "present].")
@provider_option
@retrieval_option
@click.option("--batch", default=RUN_DEFAULTS["batch"], show_default=True, envvar="MRAD_BATCH", show_envvar=True,
              type=click.IntRange(min=1),
              help="Frames per encoder call: more throughput, more latency.")
@click.option("--max-frames", type=click.IntRange(min=1),
              help="Stop after this many frames (each source, when several are read at once).")
@click.option("--loop", is_flag=True,
              help="Read the --input files again from the start when they end (a recording standing in for a "
                   "line; with --concurrent, each --input loops on its own); stop with --max-frames or Ctrl-C.")
@click.option("--when-behind", type=click.Choice(("queue", "drop-oldest", "off")), default=RUN_DEFAULTS["when-behind"],
              show_default=True, envvar="MRAD_WHEN_BEHIND", show_envvar=True,
              help="Frames are read and decoded ahead, each source in its own thread, into a bounded queue of its "
                   "own while scoring runs (taken in turn: a fast source never starves a slow one). When it is full: "
                   "queue waits for scoring (nothing dropped); drop-oldest drops the source's oldest queued frame "
                   "with a 'dropped' record (a live camera stays current); off reads no frame ahead (one source "
                   "only).")
@click.option("--queue-size", type=click.IntRange(min=1), envvar="MRAD_QUEUE_SIZE", show_envvar=True,
              help="Frames read ahead at most, per source [default: twice --batch].")
@click.option("--evidence", is_flag=True,
              help="Add to each record the memory entries that weighed most (zero-shot sources, nearest enrolled "
                   "images).")
@enrollment_option
@trusted_key_option
@sign_key_option
@click.option("--max-pixels", default=RUN_DEFAULTS["max-pixels"], show_default=True, envvar="MRAD_MAX_PIXELS",
              show_envvar=True, type=click.IntRange(min=1),
              help="Images with more pixels are refused from their header, before decoding (error records).")
@click.option("--reconnect-timeout", default=RUN_DEFAULTS["reconnect-timeout"], show_default=True,
              envvar="MRAD_RECONNECT_TIMEOUT", show_envvar=True, type=click.FloatRange(min=0),
              help="Seconds a lost camera may stay away before it is given up (exit 4 at the end; the other "
                   "sources, if any, are read on).")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), envvar="MRAD_DEADLINE_MS", show_envvar=True,
              help="Each frame's decision is due this many ms after the frame was read (time queued and waiting "
                   "for batch-mates counts). A frame already past it when its batch is about to be scored is not "
                   "scored: its record says late, with no score. One scored but decided past it keeps its result, "
                   "marked late. The summary counts both.")
@line_options
@click.option("--web", metavar="[HOST:]PORT",
              help="Serve the operator's page on PORT of 127.0.0.1 (loopback), or of HOST when given (0.0.0.0: "
                   "every interface): live frames with heatmaps, scores against the threshold, counters, a review "
                   "queue to mark frames good or defect, undo, recalibration. Needs the 'web' extra.")
@click.option("--web-token", envvar="MRAD_WEB_TOKEN", show_envvar=True,
              help="Token the page's changes need (enroll, undo, threshold); reading needs none; at least 128 bits. "
                   "On the command line it shows in the process list (a warning says so): prefer the variable or "
                   "--web-token-file [default: a random one, printed with the page's address].")
@click.option("--web-token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="File whose first line is the page's token (over --web-token): kept out of the process list. "
                   "At least 128 bits: python -c \"import secrets; print(secrets.token_urlsafe(16))\".")
@click.option("--web-host", "web_hosts", multiple=True, metavar="NAME",
              help="A name the page is reached by (its DNS name, a proxy's), beyond its address and, on loopback, "
                   "localhost; requests naming any other host are refused. Repeatable.")
@click.option("--web-data", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the page's audit log (audit.jsonl) and the frames enrolled from it (parts/) "
                   "[default: <bundle>.operator beside the bundle].")
@click.pass_context
def main(ctx, bundle, recipe, recipe_file, inputs, concurrent, cameras, genicams, genicam_settings, genicam_trigger,
         out, save_maps, display, threshold, calibration_file, provider, retrieval, batch, max_frames, loop, when_behind,
         queue_size, evidence, enrollment, trusted_keys, max_pixels, reconnect_timeout, deadline_ms, config_file, web,
         web_token, web_token_file, web_hosts, web_data, given_names, sign_key, **line):
    """Score frames from cameras, streams, video files or images with an MRAD bundle, or a station of several."""
    config = station_file(line)
    if config is None and recipe:
        raise MradError("--recipe picks one of a station file's recipes: add --station station.toml")
    if config is None and not bundle:
        raise MradError("pass --bundle (one product), or --station station.toml (a station's recipes)")
    if config is not None and bundle:
        raise MradError("--bundle and --station: a station names its bundles in its recipes; give one or the other")
    # flags (and their environment variables) over the station file over the defaults
    run = run_settings(ctx, config.run if config else {}, batch=batch, when_behind=when_behind, queue_size=queue_size,
                       deadline_ms=deadline_ms, reconnect_timeout=reconnect_timeout, max_pixels=max_pixels,
                       max_frames=max_frames, loop=loop, evidence=evidence)
    outputs = config.outputs if config else {}
    out = out if ctx.get_parameter_source("out") != ParameterSource.DEFAULT else Path(outputs.get("out", out))
    save_maps = save_maps or (Path(outputs["save-maps"]) if "save-maps" in outputs else None)
    web = web or outputs.get("web")
    if config is not None:
        line["station"] = line["station"] or config.name
        for kind, spec in config.sources:
            inputs, cameras, genicams = (inputs + (spec,) if kind == "input" else inputs,
                                         cameras + (spec,) if kind == "camera" else cameras,
                                         genicams + (spec,) if kind == "genicam" else genicams)
    if not (inputs or cameras or genicams):
        raise MradError("pass --input, --camera or --genicam (each repeatable, and any together), or list sources "
                        "in the station file")
    if (genicam_settings or genicam_trigger != "off") and not genicams:
        raise MradError("--genicam-set and --genicam-trigger are for a --genicam camera")
    if run["loop"] and not inputs:
        raise MradError("--loop is for --input files")
    if concurrent and not inputs:
        raise MradError("--concurrent is for several --input files, each read as a source of its own")
    names = source_names(inputs, concurrent, cameras, genicams, given_names)
    if len(names) > 1 and run["when-behind"] == "off":
        raise MradError("several sources are read at once, each in its own thread: --when-behind off reads one "
                        "source only; use queue or drop-oldest")
    if genicams:  # a missing library or a malformed setting fails before the bundle loads
        import_aravis()
        parse_settings(genicam_settings)
    if (web_token or web_token_file or web_hosts or web_data) and not web:
        raise MradError("--web-token, --web-token-file, --web-host and --web-data are for the operator's page: "
                        "add --web [HOST:]PORT")
    address = None
    if web:  # a malformed address or a missing extra fails before the bundle loads
        from ..web import TOKEN_ENV, page_token
        from ..web.server import parse_address

        address = parse_address(web)
        typed = ctx.get_parameter_source("web_token") == ParameterSource.COMMANDLINE
        web_token = page_token(web_token, web_token_file, "--web-token" if typed else TOKEN_ENV)
        if typed:
            click.echo(f"warning: --web-token is seen by every user of this machine in the process list: give it in "
                       f"{TOKEN_ENV} or --web-token-file", err=True)
    settings = line_settings(config_file, base=outputs, **line)
    overrides = dict(threshold=threshold, calibration=calibration_file, enrollment=enrollment, retrieval=retrieval,
                     trusted_keys=tuple(trusted_keys), sign_key=sign_key)
    station = open_station(config, recipe, bundle, provider, run["max-pixels"], overrides)
    check_threshold(settings, station.recipe().policy.threshold)
    for warning in exposure_warnings(settings):
        click.echo(f"warning: {warning}", err=True)
    for name in station.recipes:
        if station.recipe(name).threshold_stale:
            click.echo(f"warning: recipe {name}: the threshold was measured with another enrollment than the one "
                       "scoring now; its records say threshold_stale until it is measured again (enroll 5 or more "
                       "good parts, or run mrad-calibrate)", err=True)
    stop = Stop()
    live = [Camera(spec, run["reconnect-timeout"], events=lambda record: engine.event(record), stop=stop)
            for spec in cameras]
    live += [GenICamCamera(spec, genicam_settings, genicam_trigger, run["reconnect-timeout"],
                           events=lambda record: engine.event(record), stop=stop) for spec in genicams]
    open_cameras(live, alone=not inputs)
    try:
        stream = getattr(sys.stdout, "buffer", sys.stdout) if str(out) == "-" else open_exclusive(out)
        maps_lock = lock_folder(save_maps) if save_maps else None
    except OutputBusy as exc:
        raise MradError(str(exc)) from exc
    except OSError as exc:
        raise MradError(f"output cannot be written: {exc}") from exc
    sinks = [JsonLines(stream)] + ([Window()] if display else [])
    when_behind = run["when-behind"]
    engine = LineEngine(station, sinks, batch=run["batch"], save_maps=save_maps, stop=stop,
                        evidence=run["evidence"], when_behind=None if when_behind == "off" else when_behind,
                        queue_size=run["queue-size"], deadline_ms=run["deadline-ms"],
                        close_timeout=settings.flush_timeout)
    if address:  # before the line sinks: a port in use fails before any connection is made
        engine.sinks.append(open_page(station, engine, address, web_token, web_data, names, web_hosts))
    engine.sinks += open_sinks(settings, events=engine.event, commands=station)  # link events go to every sink
    max_pixels, loop, max_frames = run["max-pixels"], run["loop"], run["max-frames"]
    def say(text: str) -> None:
        click.echo(f"note: {text}", err=True)

    if concurrent:
        streams = [file_frames([item], max_pixels, loop=loop, notice=say) for item in inputs]
    else:
        streams = [file_frames(inputs, max_pixels, loop=loop, notice=say)] if inputs else []
    streams += [camera.frames() for camera in live]
    frames = {name: islice(stream, max_frames) if max_frames else stream for name, stream in zip(names, streams)}
    engine.stop.on_signals()
    watcher = RecipeFile(recipe_file or (config.recipe_file if config else None), station, events=engine.event)
    try:
        summary = engine.run(frames)
    finally:
        watcher.close()
        for stream in streams:  # a camera is let go now, not whenever its generator is collected
            with contextlib.suppress(ValueError):  # one still being read by a reader thread ends with it
                stream.close()
    if engine.failure:
        click.echo(f"error: {engine.failure}", err=True)
    click.echo(summary_line(summary), err=True)
    if maps_lock:
        maps_lock.close()
    if engine.failure:
        sys.exit(EXIT_INPUT_FAILED)
    sys.exit(EXIT_OUTPUT_FAILED if summary["output_errors"] else EXIT_OK)


def open_cameras(cameras: list, alone: bool) -> None:
    """Open every camera before anything is written, so that a wrong index or address is the first thing said.

    ``alone``: the cameras are the only sources. When none of them opens, the run ends here, one line on
    stderr (exit 4); one that fails beside others that open is given up once the run starts, the others read on.
    """
    failures = []
    for camera in cameras:
        try:
            camera.open()
        except SourceError as exc:
            failures.append(str(exc))
    if alone and cameras and len(failures) == len(cameras):
        raise SourceError("; ".join(failures))


def station_file(line: dict) -> StationConfig | None:
    """--station names a station file (a .toml, or any file that exists), or the line's name (as before files)."""
    value = line.get("station")
    if value and (value.endswith(".toml") or Path(value).is_file()):
        line["station"] = None
        return read_station(value)
    return None


def open_station(config: StationConfig | None, recipe: str | None, bundle: Path | None, provider: str,
                 max_pixels: int, overrides: dict) -> Station:
    """The station to run: the file's (flags override the starting recipe's settings), or one recipe of --bundle."""
    given = {k: v for k, v in overrides.items() if v not in (None, ())}
    if config is None:
        entry = RecipeConfig(name="default", bundle=Path(bundle), **given)
        return Station.of(Recipe.open(entry, provider=provider, max_pixels=max_pixels, threshold_origin="--threshold"),
                          name="line")
    start = recipe or config.active or config.names[0]
    entry = config.recipe(start)
    if "trusted_keys" in given:
        given["trusted_keys"] = entry.trusted_keys + given["trusted_keys"]
    config = replace(config, recipes=tuple(replace(r, **given) if r.name == start else r for r in config.recipes))
    return Station(config, recipe=start, provider=provider if provider != "auto" else None, max_pixels=max_pixels,
                   progress=lambda name: click.echo(f"loading recipe {name}", err=True))


def source_names(inputs: tuple[str, ...], concurrent: bool, cameras: tuple[str, ...],
                 genicams: tuple[str, ...], given: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """The run's sources as the summary and the page name them, each with what it reads: the --input files (one
    source, or each its own with ``concurrent``), then the cameras; named by ``given`` (--name), one per source,
    else as typed. A source or a name given twice is refused (its records could not be told apart)."""
    reads = ([(item,) for item in inputs] if concurrent else [inputs] if inputs else []) + \
        [(spec,) for spec in cameras + genicams]
    typed = [" + ".join(specs) for specs in reads]
    if given and len(given) != len(reads):
        raise MradError(f"--name: {len(given)} names for {len(reads)} sources ({', '.join(typed)}): one per source")
    for name in given:
        if not name.strip() or len(name) > NAME_CHARS or not name.isprintable():
            raise MradError(f"--name {name[:NAME_CHARS]!r}: a name is 1 to {NAME_CHARS} printable characters")
    for names in (typed, list(given)):
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise MradError(f"{', '.join(twice)} given twice: each source once, each name once")
    return dict(zip(given or typed, reads))


def open_page(station: Station, engine: LineEngine, address: tuple[str, int], token: str | None, data: Path | None,
              sources: dict[str, tuple[str, ...]] | None = None, hosts: tuple[str, ...] = ()):
    """Start the operator's page and say where it is (with a token made up when none was given); ``sources``:
    each source's name (its tile's label) -> what it reads."""
    from ..web import OperatorPage, default_data, new_token
    from ..web.server import is_loopback

    made_up = not token
    token = token or new_token()
    page = OperatorPage(station, address, token, data or default_data(station.config.path or station.recipe().detector.path),
                        sources, hosts)
    click.echo(f"operator page: {page.url}" + (f"#token={token} (token for changes: {token})" if made_up else
                                                " (changes need the token given)"), err=True)
    if not is_loopback(address[0]):
        click.echo(f"warning: the operator page listens on {address[0]}, beyond this machine: anyone who can reach "
                   "it sees the line; changes still need the token", err=True)
    return page
