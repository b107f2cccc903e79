"""The line settings of mrad-run, from a TOML file (``--config``) and the command line.

Each key of the file is a mrad-run option without its leading dashes::

    station = "line3-cam1"
    mqtt = ["mqtt://broker.plant:1883/plant/line3/cam1"]    # or one string
    mqtt-qos = 1
    mqtt-buffer = "mqtt-buffer"                              # relative: from the file's folder
    mqtt-buffer-size = 10000
    opcua = "opc.tcp://127.0.0.1:4840/mrad"
    webhook = ["http://mes.plant/api/defects"]
    webhook-on = "anomalous"
    flush-timeout = 10

An option given on the command line replaces the file's value; --mqtt and
--webhook add to the file's lists. Every value is checked here, once, and a
bad one is refused with the key (or option) named.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .. import defaults
from ..errors import MradError


def need(module: str):
    """Import a client library of the ``protocols`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MradError(f"{module.split('.')[0]} is not installed; it comes with the 'protocols' extra (MQTT, OPC UA, "
                        f"--config on Python 3.10): pip install \"mrad-edge[protocols]\" (or [line], which adds "
                        "GenICam cameras)") from exc

WEBHOOK_ON = ("anomalous", "all")
MESSAGE_CHARS = 200  # of a refused value's description in an error
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class MqttTarget:
    url: str  # as shown in records and the summary: the password left out
    host: str
    port: int
    topic: str
    tls: bool = False
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class LineSettings:
    station: str = "line"
    mqtt: tuple[MqttTarget, ...] = ()
    mqtt_qos: int = defaults.MQTT_QOS
    mqtt_buffer: Path | None = None
    mqtt_buffer_size: int = defaults.MQTT_BUFFER_SIZE
    opcua: str | None = None
    webhook: tuple[str, ...] = ()
    webhook_on: str = defaults.WEBHOOK_ON
    flush_timeout: float = defaults.FLUSH_TIMEOUT_S


def _url(value, schemes: tuple[str, ...], form: str):
    if not isinstance(value, str):
        raise ValueError(f"expected a URL ({form}), got {value!r}")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from exc
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{value!r} is not a URL of the form {form}")
    return parts, port


def mqtt_target(value) -> MqttTarget:
    parts, port = _url(value, ("mqtt", "mqtts"), "mqtt://HOST[:PORT]/TOPIC, or mqtts:// for TLS")
    topic = parts.path.lstrip("/")
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"{value!r} needs a topic after the host, without the wildcards + and #")
    tls = parts.scheme == "mqtts"
    port = port or (8883 if tls else 1883)
    user = f"{parts.username}@" if parts.username else ""
    return MqttTarget(f"{parts.scheme}://{user}{parts.hostname}:{port}/{topic}", parts.hostname, port, topic, tls,
                      parts.username, parts.password)


def opcua_endpoint(value) -> str:
    parts, port = _url(value, ("opc.tcp",), "opc.tcp://HOST[:PORT]/PATH")
    return f"opc.tcp://{parts.hostname}:{port or 4840}{parts.path or '/'}"


def webhook_url(value) -> str:
    _url(value, ("http", "https"), "http(s)://HOST[:PORT]/PATH")
    return value


def _many(check):
    def many(value):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"expected a URL or a list of URLs, got {value!r}")
        return tuple(check(v) for v in values)
    return many


def _choice(*allowed):
    def choice(value):
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    return choice


def _number(kind, least):
    def number(value):
        if isinstance(value, bool) or not isinstance(value, kind) or value < least:
            raise ValueError(f"expected a{'n integer' if kind is int else ' number'} >= {least}, got {value!r}")
        return value
    return number


def _name(value):
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"expected a name of letters, digits, '_', '.' or '-', got {value!r}")
    return value


def _folder(value):
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"expected a folder, got {value!r}")
    return Path(value)


# Each setting: its key (the option without dashes) and how a value is checked and converted.
KEYS = {
    "station": _name,
    "mqtt": _many(mqtt_target),
    "mqtt-qos": _choice(0, 1, 2),
    "mqtt-buffer": _folder,
    "mqtt-buffer-size": _number(int, 1),
    "opcua": opcua_endpoint,
    "webhook": _many(webhook_url),
    "webhook-on": _choice(*WEBHOOK_ON),
    "flush-timeout": _number((int, float), 0),
}
ADDED = ("mqtt", "webhook")  # repeatable options: the command line adds to the file's list


def checked(key: str, value, where: str):
    """``value`` checked and converted; ``where`` names it in the error ("line.toml: mqtt-qos", "--mqtt-qos")."""
    try:
        return KEYS[key](value)
    except ValueError as exc:  # a hostile value is not echoed whole: the message stays one short line
        text = " ".join(str(exc).split())
        raise MradError(f"{where}: {text[:MESSAGE_CHARS]}{'...' if len(text) > MESSAGE_CHARS else ''}") from exc


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = need("tomli")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise MradError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise MradError(f"{path} cannot be read: {exc}") from exc


def line_settings(config: Path | None = None, base: dict | None = None, **options) -> LineSettings:
    """The settings of ``base`` (a station file's outputs, already checked), then ``config`` (a TOML file), then
    ``options`` (mrad-run's, '_' for '-'; None or empty: not given), each checked."""
    values = {key: value for key, value in (base or {}).items() if key in KEYS}
    if config is not None:
        for key, value in _read_toml(Path(config)).items():
            if key not in KEYS:
                raise MradError(f"{config}: unknown key {key!r}; the keys are {', '.join(KEYS)}")
            values[key] = checked(key, value, f"{config}: {key}")
            if key == "mqtt-buffer" and not values[key].is_absolute():
                values[key] = Path(config).parent / values[key]
    for name, value in options.items():
        key = name.replace("_", "-")
        if key not in KEYS:
            raise TypeError(f"line_settings() got an unknown option {name!r}")
        if value is None or value == ():
            continue
        value = checked(key, value, f"--{key}")
        values[key] = values.get(key, ()) + value if key in ADDED else value
    return LineSettings(**{key.replace("-", "_"): value for key, value in values.items()})


def check_threshold(settings: LineSettings, threshold: float | None) -> None:
    """Refuse webhooks on anomalous frames when no threshold decides which frames are."""
    if settings.webhook and settings.webhook_on == "anomalous" and threshold is None:
        raise MradError("webhooks on anomalous frames need a threshold: pass --threshold, run mrad-calibrate, "
                        "or use --webhook-on all")


# mrad-run's run settings: what a station file's [run] table may set. These defaults are the only ones: the
# command's options take them (and so its --help shows them); a value given on the command line or in the option's
# environment variable (MRAD_BATCH, ...) wins over the station file, which wins over these.
RUN_DEFAULTS = {
    "batch": 1,
    "when-behind": "queue",
    "queue-size": None,  # twice the batch
    "deadline-ms": None,
    "reconnect-timeout": defaults.RECONNECT_TIMEOUT_S,
    "max-pixels": defaults.MAX_IMAGE_PIXELS,
    "max-frames": None,
    "loop": False,
    "evidence": False,
}


def run_settings(ctx, file: dict, **given) -> dict:
    """The run settings: each option's value when the command line or its environment variable gave it, else the
    station file's, else the default. ``ctx``: the click context (it knows where each value came from)."""
    from click.core import ParameterSource

    settings = dict(RUN_DEFAULTS)
    for name, value in given.items():
        key = name.replace("_", "-")
        source = ctx.get_parameter_source(name)
        if source not in (ParameterSource.DEFAULT, None):
            settings[key] = value
        elif key in file:
            settings[key] = file[key]
        elif value is not None:
            settings[key] = value
    return settings
