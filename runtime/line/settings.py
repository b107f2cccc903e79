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
    history = "history/line3.sqlite"                         # or "postgresql://mes.plant/line3"
    history-pictures = "history/pictures"                   # relative: from the file's folder
    history-good-every = 100
    history-keep-days = 30
    history-keep-bytes = "2GiB"
    history-buffer = "history/buffer"
    history-buffer-size = 100000

An option given on the command line replaces the file's value; --mqtt and
--webhook add to the file's lists. Every value is checked here, once, and a
bad one is refused with the key (or option) named.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .. import defaults
from .. import history as history_defaults
from ..errors import MradError
from ..files import DOCUMENT_BYTES
from ..formats.document import read_toml


def need(module: str):
    """Import a client library of the ``protocols`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise MradError(f"{module.split('.')[0]} is not installed; it comes with the 'protocols' extra (MQTT, OPC UA, "
                        f"--config on Python 3.10): pip install \"mrad-edge[protocols]\" (or [line], which adds "
                        "GenICam cameras)") from exc

WEBHOOK_ON = ("anomalous", "all")
SETTINGS_BYTES = DOCUMENT_BYTES
MESSAGE_CHARS = 200
URL_CHARS = 2048
MAX_TARGETS = 16  # MQTT brokers or webhooks of one run
NAME_CHARS = 64  # a station's name
MAX_QUEUED = 10_000_000  # records an MQTT buffer may hold
MAX_FLUSH_S = 3600  # of a refused value's description in an error
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
    history: Path | str | None = None  # a SQLite file, or a postgresql:// URL (its password shown nowhere)
    history_pictures: Path | None = None
    history_good_every: int = history_defaults.GOOD_EVERY
    history_keep_days: float = history_defaults.KEEP_DAYS
    history_keep_bytes: int = history_defaults.KEEP_BYTES
    history_buffer: Path | None = None
    history_buffer_size: int = history_defaults.BUFFER_SIZE


def _url(value, schemes: tuple[str, ...], form: str):
    if not isinstance(value, str):
        raise ValueError(f"expected a URL ({form}), got {value!r}")
    if len(value) > URL_CHARS or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value[:60]!r}: a URL is at most {URL_CHARS} printable characters, without spaces or "
                         "line breaks")
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{shown_url(value)!r}: {exc}") from exc
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{shown_url(value)!r} is not a URL of the form {form}")
    if port == 0:
        raise ValueError(f"{shown_url(value)!r}: port 0 is no port to connect to (1 to 65535)")
    return parts, port


def shown_url(url: str) -> str:
    """``url`` as records, events, the summary and the page show it: no user name or password, query values
    hidden (a token in a webhook URL is a secret)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]  # the user and password left out; the port as given, even a wrong one
    query = "&".join(f"{item.split('=', 1)[0]}=***" if "=" in item else "***"
                     for item in parts.query.split("&") if item)
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


def mqtt_target(value) -> MqttTarget:
    parts, port = _url(value, ("mqtt", "mqtts"), "mqtt://HOST[:PORT]/TOPIC, or mqtts:// for TLS")
    topic = parts.path.lstrip("/")
    # '#' and '?' would be read as a URL's fragment and query, and cut silently from the topic
    if not topic or "+" in topic or "#" in value or "?" in value or topic.startswith("$"):
        raise ValueError(f"{shown_url(value)!r} needs a topic after the host, without the wildcards + and # and "
                         "not a broker's own $ topic")
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


def history_target(value):
    """A SQLite file's path, or a postgresql:// URL with a database."""
    if isinstance(value, str) and "://" in value:
        parts, _ = _url(value, ("postgresql", "postgres"), "postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE")
        if not parts.path.strip("/"):
            raise ValueError(f"{shown_url(value)!r} names no database: postgresql://HOST[:PORT]/DATABASE")
        return value
    return _folder(value)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def _bytes(value):
    """A number of bytes: an integer, or a string such as "500MB" or "2GiB"."""
    if isinstance(value, str) and (found := _SIZE.fullmatch(value.strip())):
        unit = (found[2] or "").lower().rstrip("b")
        scale = 1024 ** ("kmgt".index(unit[0]) + 1) if unit.endswith("i") else _SIZE_UNITS[unit]
        value = int(float(found[1]) * scale)
    return _number(int, 0, history_defaults.MAX_KEEP_BYTES)(value)


def _many(check):
    def many(value):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"expected a URL or a list of URLs, got {str(value)[:60]!r}")
        if len(values) > MAX_TARGETS:
            raise ValueError(f"{len(values)} URLs; at most {MAX_TARGETS}")
        return tuple(check(v) for v in values)
    return many


def _choice(*allowed):
    def choice(value):
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    return choice


def _number(kind, least, most):
    def number(value):
        if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
                or not least <= value <= most):
            raise ValueError(f"expected a{'n integer' if kind is int else ' number'} from {least} to {most}, "
                             f"got {str(value)[:40]}")
        return value
    return number


def _name(value):
    if not isinstance(value, str) or len(value) > NAME_CHARS or not _NAME.fullmatch(value):
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
    "mqtt-buffer-size": _number(int, 1, MAX_QUEUED),
    "opcua": opcua_endpoint,
    "webhook": _many(webhook_url),
    "webhook-on": _choice(*WEBHOOK_ON),
    "flush-timeout": _number((int, float), 0, MAX_FLUSH_S),
    "history": history_target,
    "history-pictures": _folder,
    "history-good-every": _number(int, 0, history_defaults.MAX_GOOD_EVERY),
    "history-keep-days": _number((int, float), 0, history_defaults.MAX_KEEP_DAYS),
    "history-keep-bytes": _bytes,
    "history-buffer": _folder,
    "history-buffer-size": _number(int, 1, history_defaults.MAX_BUFFER_SIZE),
}
PATHS = ("mqtt-buffer", "history", "history-pictures", "history-buffer")  # relative: from the settings file's folder
ADDED = ("mqtt", "webhook")  # repeatable options: the command line adds to the file's list


def checked(key: str, value, where: str):
    """``value`` checked and converted; ``where`` names it in the error ("line.toml: mqtt-qos", "--mqtt-qos")."""
    try:
        return KEYS[key](value)
    except ValueError as exc:  # a hostile value is not echoed whole: the message stays one short line
        text = " ".join(str(exc).split())
        raise MradError(f"{where}: {text[:MESSAGE_CHARS]}{'...' if len(text) > MESSAGE_CHARS else ''}") from exc


def _read_toml(path: Path) -> dict:
    return read_toml(path, "settings file", SETTINGS_BYTES)


def line_settings(config: Path | None = None, base: dict | None = None, **options) -> LineSettings:
    """The settings of ``base`` (a station file's outputs, already checked), then ``config`` (a TOML file), then
    ``options`` (mrad-run's, '_' for '-'; None or empty: not given), each checked."""
    values = {key: value for key, value in (base or {}).items() if key in KEYS}
    if config is not None:
        for key, value in _read_toml(Path(config)).items():
            if key not in KEYS:
                raise MradError(f"{config}: unknown key {key!r}; the keys are {', '.join(KEYS)}")
            values[key] = checked(key, value, f"{config}: {key}")
            if key in PATHS and isinstance(values[key], Path) and not values[key].is_absolute():
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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def exposure_warnings(settings: LineSettings) -> list[str]:
    """What the settings open beyond this machine without protection, for the command to say at start."""
    said = []
    if settings.opcua:
        host = urlsplit(settings.opcua).hostname or ""
        if host not in LOOPBACK_HOSTS and not host.startswith("127."):
            everywhere = " (every interface)" if host in ("0.0.0.0", "::") else ""
            said.append(f"OPC UA is served on {host}{everywhere} without security: anyone on that network reads "
                        "the verdicts; bind it to loopback or the line's own network")
    return said


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
