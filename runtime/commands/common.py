"""What every mrad command shares: click settings, options, and how errors end a command.

A user mistake ends a command with one ``error:`` line on stderr and a
documented exit code, never a traceback:

    0  done (or stopped by SIGINT/SIGTERM)
    2  bad arguments or bad input data (also: a missing optional extra)
    3  bad bundle (missing, corrupt, foreign, unsupported version)
    4  input failed for good (a camera never opened or stayed lost)
    5  outputs could not all be written (disk full, read-only folder): the
       records that failed are counted in the summary
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import click

from .. import defaults, history
from ..errors import BundleError, MradError, SourceError
from ..core.graphs import PROVIDER_CHOICES
from ..line.settings import WEBHOOK_ON
from ..line.webhook import QUEUE_SIZE as WEBHOOK_QUEUE

EXIT_OK, EXIT_BAD_ARGUMENTS, EXIT_BAD_BUNDLE, EXIT_INPUT_FAILED, EXIT_OUTPUT_FAILED = 0, 2, 3, 4, 5
EXIT_CODES = ("Exit codes: 0 done (or stopped by SIGINT/SIGTERM), 2 bad arguments or input, 3 bad bundle, "
              "4 input failed for good (camera never opened or stayed lost), 5 outputs not all written.")
ORT_WARNINGS, ORT_ERRORS_ONLY = 2, 3  # ONNX Runtime's log severities: its default, and errors only
VERBOSE_HELP = "Let the libraries' own warnings and logs through (OpenCV, ONNX Runtime, open_clip, ...)."
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# Top-level modules of the optional extras, and the extra that brings each.
EXTRAS = {"torch": "export", "torchvision": "export", "open_clip": "export", "onnx": "export",
          "onnxscript": "export", "hnswlib": "hnsw", "model_signing": "sign", "OpenSSL": "sign", "scipy": "test", "sklearn": "test",
          "paho": "protocols", "asyncua": "protocols", "tomli": "protocols", "ray": "serve", "aiohttp": "web", "grpc": "serve-local", "google": "serve-local", "psycopg": "history"}


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def exit_code(exc: MradError) -> int:
    if isinstance(exc, BundleError):
        return EXIT_BAD_BUNDLE
    if isinstance(exc, SourceError):
        return EXIT_INPUT_FAILED
    return EXIT_BAD_ARGUMENTS


def missing_extra(exc: ModuleNotFoundError, command: str) -> str:
    module = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return f"{command} needs the Python module {module!r}, which is not installed ({exc})"
    return f"{command} needs {module}, part of the '{extra}' extra: pip install \"mrad-edge[{extra}]\""


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Keep the libraries' own chatter out of the user's terminal while a command runs.

    Our commands say what matters, once, in their own words: a camera that does not open is one
    ``error:`` line, not OpenCV's warnings first. Quieted: Python warnings, log records below ERROR
    (open_clip's "No pretrained weights loaded", ONNX Runtime's quantizer advice), and the native logs
    of ONNX Runtime and OpenCV. ``verbose`` (``--verbose``) leaves everything as it is. Undone on exit.
    """
    if verbose:
        yield
        return
    import cv2
    import onnxruntime

    root, cv_level = logging.getLogger(), cv2.utils.logging.getLogLevel()
    root_level = root.level
    root.setLevel(logging.ERROR)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    onnxruntime.set_default_logger_severity(ORT_ERRORS_ONLY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(root_level)
        cv2.utils.logging.setLogLevel(cv_level)
        onnxruntime.set_default_logger_severity(ORT_WARNINGS)


def command(name: str, epilog: str = "", **kwargs) -> Callable:
    """``click.command`` with the shared settings and ``--verbose``; MradError and missing extras end in one
    ``error:`` line."""

    def decorate(function: Callable) -> click.Command:
        own_verbose = "verbose" in inspect.signature(function).parameters  # a command with a --verbose of its own

        @functools.wraps(function)
        def run(*args, verbose: bool = False, **options):
            try:
                with quiet_libraries(verbose):
                    return function(*args, **options, **({"verbose": verbose} if own_verbose else {}))
            except MradError as exc:
                fail(str(exc), exit_code(exc))
            except ModuleNotFoundError as exc:
                fail(missing_extra(exc, name), EXIT_BAD_ARGUMENTS)

        text = f"{epilog.rstrip()}\n\n\b\n{EXIT_CODES}\n" if epilog else f"\b\n{EXIT_CODES}\n"
        made = click.command(name=name, epilog=text, context_settings=CONTEXT_SETTINGS, **kwargs)(run)
        if not own_verbose:  # last in --help, after the command's own options
            made.params.append(click.Option(["--verbose"], is_flag=True, help=VERBOSE_HELP))
        return made

    return decorate


bundle_option = click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory from mrad-export.")
def recipe_options(function: Callable) -> Callable:
    """--bundle, or --station FILE with --recipe NAME: what a command that acts on one product takes."""
    function = click.option("--recipe", help="With --station: the recipe to act on [default: the file's active, "
                                             "else its first].")(function)
    function = click.option("--station", "station_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                            help="A station file: act on one of its recipes (its bundle, enrollment and "
                                 "calibration; flags given here win).")(function)
    return click.option("--bundle", type=click.Path(path_type=Path),
                        help="Bundle directory from mrad-export (or give --station and --recipe).")(function)


def chosen_recipe(bundle: Path | None, station_file: Path | None, recipe: str | None):
    """The recipe a command acts on: --bundle's (a recipe of that bundle alone), or one of the station file's."""
    from ..formats.station import RecipeConfig, read_station

    if station_file is None:
        if recipe:
            raise MradError("--recipe picks one of a station file's recipes: add --station station.toml")
        if bundle is None:
            raise MradError("pass --bundle, or --station station.toml (and --recipe NAME)")
        return RecipeConfig("default", Path(bundle))
    if bundle is not None:
        raise MradError("--bundle and --station: a station names its bundles in its recipes; give one or the other")
    config = read_station(station_file)
    return config.recipe(recipe or config.active or config.names[0])


provider_option = click.option(
    "--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
    help="ONNX Runtime execution provider: auto takes CUDA when onnxruntime-gpu sees a GPU, else the CPU; "
         "openvino and openvino-bf16 compile the graph with OpenVINO for the CPU (the 'openvino' extra; bf16 is "
         "several times faster where the CPU has AMX or AVX-512 BF16, and less exact).")
retrieval_option = click.option(
    "--retrieval", type=click.Choice(defaults.RETRIEVAL_MODES), default=None,
    help="exact: softmax over the whole memory (the spec); hnsw: top-k through the index [default: the bundle's].")
enrollment_option = click.option(
    "--enrollment", type=click.Path(path_type=Path, file_okay=False),
    help="Folder of the line's own memories (mrad-enroll) [default: <bundle>/enrollment].")
# --config and the line sinks (MQTT, OPC UA, webhooks) of mrad-run and mrad-serve --camera: the command gets
# config_file and the others by name, for line.line_settings(config_file, **line). Each also reads an environment
# variable (MRAD_MQTT, ...; several URLs separated by spaces): a flag wins over it, and it over the files.
LINE_OPTIONS = (
    click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
                 help="TOML file with the line settings below, each key an option's name without its dashes "
                      "(mqtt = [...], mqtt-qos = 1, ...). Options given here replace its values; --mqtt and --webhook "
                      "add to its lists."),
    click.option("--mqtt", envvar="MRAD_MQTT", show_envvar=True, multiple=True, metavar="URL",
                 help="mqtt://[USER:PASS@]HOST[:PORT]/TOPIC (mqtts:// for TLS; port 1883 or 8883): each frame's record "
                      "on TOPIC, the latest scored one retained on TOPIC/last, events on TOPIC/events, online/offline "
                      "(retained, also the last will) on TOPIC/status. Repeatable. Needs the 'protocols' extra."),
    click.option("--mqtt-qos", envvar="MRAD_MQTT_QOS", show_envvar=True, type=click.IntRange(0, 2),
                 help="MQTT quality of service: 0 at most once, 1 at least once, 2 exactly once "
                      f"[default: {defaults.MQTT_QOS}]."),
    click.option("--mqtt-buffer", envvar="MRAD_MQTT_BUFFER", show_envvar=True,
                 type=click.Path(path_type=Path, file_okay=False),
                 help="Folder where MQTT messages wait for the broker, one SQLite file per URL: what was not "
                      "acknowledged when the run ended is sent by the next run [default: in memory]."),
    click.option("--mqtt-buffer-size", envvar="MRAD_MQTT_BUFFER_SIZE", show_envvar=True, type=click.IntRange(min=1),
                 help="MQTT messages waiting for the broker at most; then the oldest is dropped and counted "
                      f"[default: {defaults.MQTT_BUFFER_SIZE}]."),
    click.option("--opcua", envvar="MRAD_OPCUA", show_envvar=True, metavar="URL",
                 help="opc.tcp://HOST[:PORT]/PATH: serve OPC UA there (port 4840 by default) for a PLC to read or "
                      "subscribe to: <station>.Score, Decision, Frame, Timestamp, Source, Frames, Anomalous, Errors, "
                      "Healthy, Status in namespace urn:mrad-edge. No security: bind it to 127.0.0.1 or the line's "
                      "own network. Needs the 'protocols' extra."),
    click.option("--station", envvar="MRAD_STATION", show_envvar=True, metavar="FILE|NAME",
                 help="A station file (station.toml: its recipes, sources, outputs; see docs/line.md), or, not a file, "
                      "this camera's name on the line: the OPC UA object and node ids [default: the file's name, "
                      "else line]."),
    click.option("--webhook", envvar="MRAD_WEBHOOK", show_envvar=True, multiple=True, metavar="URL",
                 help="http(s) URL to POST frame records to (JSON), from a thread: failures are tried again after "
                      f"0.5, 1, 2, 4, 8 s; a full queue ({WEBHOOK_QUEUE}) drops the oldest. Repeatable."),
    click.option("--webhook-on", envvar="MRAD_WEBHOOK_ON", show_envvar=True, type=click.Choice(WEBHOOK_ON),
                 help="Which frames to POST: anomalous ones (needs a threshold) or all "
                      f"[default: {defaults.WEBHOOK_ON}]."),
    click.option("--flush-timeout", envvar="MRAD_FLUSH_TIMEOUT", show_envvar=True, type=click.FloatRange(min=0),
                 help="Seconds, at the end of a run, for MQTT and webhooks to deliver what they still hold; what is "
                      "left then is counted as undelivered (kept, with --mqtt-buffer). Closing connections adds a few "
                      f"seconds at most (OPC UA: about 1 s) [default: {defaults.FLUSH_TIMEOUT_S:g}]."),
    click.option("--history", envvar="MRAD_HISTORY", show_envvar=True, metavar="PATH|URL",
                 help="Keep every record as a row of the line's history (mrad-history reads it): a SQLite file "
                      "(made if need be), or postgresql://[USER@]HOST[:PORT]/DATABASE (the 'history' extra; keep the "
                      "password in PGPASSWORD or ~/.pgpass, out of the process list). Written from a thread: "
                      "inspection never waits for the database."),
    click.option("--history-pictures", envvar="MRAD_HISTORY_PICTURES", show_envvar=True,
                 type=click.Path(path_type=Path, file_okay=False),
                 help="Folder for the history's pictures: every anomalous frame with its heatmap, and one good frame "
                      "in --history-good-every (JPEG) [default: none kept]."),
    click.option("--history-good-every", envvar="MRAD_HISTORY_GOOD_EVERY", show_envvar=True,
                 type=click.IntRange(min=0),
                 help=f"Keep the picture of one good frame in this many (0: none) [default: {history.GOOD_EVERY}]."),
    click.option("--history-keep-days", envvar="MRAD_HISTORY_KEEP_DAYS", show_envvar=True,
                 type=click.FloatRange(min=0),
                 help="Pictures older than this many days are deleted (their rows stay) "
                      f"[default: {history.KEEP_DAYS:g}]."),
    click.option("--history-keep-bytes", envvar="MRAD_HISTORY_KEEP_BYTES", show_envvar=True, metavar="SIZE",
                 help="The pictures' bytes at most (500MB, 2GiB, or a number): past it the oldest are deleted "
                      f"first, their rows stay [default: {history.KEEP_BYTES // history.GiB}GiB]."),
    click.option("--history-buffer", envvar="MRAD_HISTORY_BUFFER", show_envvar=True,
                 type=click.Path(path_type=Path, file_okay=False),
                 help="Folder where rows wait while PostgreSQL is away, one SQLite file per station and database: "
                      f"what is left at the end is written by the next run [default: {history.default_buffer()}; "
                      "for a SQLite history: in memory]."),
    click.option("--history-buffer-size", envvar="MRAD_HISTORY_BUFFER_SIZE", show_envvar=True,
                 type=click.IntRange(min=1),
                 help="Rows waiting for the database at most; then the oldest is dropped and counted "
                      f"[default: {history.BUFFER_SIZE}]."),
)


def line_options(function: Callable) -> Callable:
    """Add LINE_OPTIONS to a command, in their order."""
    for option in reversed(LINE_OPTIONS):
        function = option(function)
    return function
