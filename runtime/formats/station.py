"""The station file (``station.toml``): one inspection station's recipes, sources and outputs.

The smallest file names one recipe (paths are relative to the file's folder)::

    [[recipes]]
    name = "part-a"
    bundle = "bundles/tiny"

Every key, in the order a station is usually written::

    format_version = 1                  # optional; the only version so far
    name = "line3-cam1"                 # the station's name on the plant's side (OPC UA, MQTT)
    active = "part-a"                   # the recipe scoring at start [default: the first]
    provider = "auto"                   # ONNX Runtime provider for every recipe (mrad-run --provider)
    trusted-keys = ["keys/line.pub"]    # required: every recipe's bundle, enrollment and calibration signed by one
    sign-key = "keys/line.pem"          # signs the enrollments and thresholds made here (its .pub trusted above;
                                        # its password, if any, in MRAD_SIGN_KEY_PASSWORD)
    recipe-file = "active-recipe.txt"   # a script switches recipes by writing a name here

    [[recipes]]
    name = "part-b"
    bundle = "bundles/tiny"
    enrollment = "enrollments/part-b"   # mrad-enroll --enrollment ... [default: <bundle>/enrollment]
    calibration = "part-b.json"         # [default: <bundle>.calibration.json]
    threshold = 0.42                    # fixed: wins over any calibration
    quantile = 0.99                     # of the held-out good parts, when enrolling measures the threshold
    retrieval = "exact"                 # or hnsw [default: the bundle's]
    count-tolerance = 1                 # scenes of many parts: counts this far beyond the enrolled ones are normal
    roi = [0, 0, 160, 120]              # x, y, width, height in frame pixels; or a polygon [[x, y], ...]
    ignore = [[10, 10, 20, 8]]          # rectangles or polygons inside the region left out of scoring
    trusted-keys = ["keys/b.pub"]       # in addition to the station's
    sign-key = "keys/b.pem"             # instead of the station's
    plant = { product = "B-4711", code = 12 }   # names this recipe's results carry to the plant

    [[sources]]                         # what mrad-run reads (its --input, --camera, --genicam add to these)
    camera = "rtsp://10.0.0.5/stream"

    [run]                               # mrad-run's options, each without its dashes
    batch = 1
    when-behind = "drop-oldest"

    [outputs]                           # the sinks: the keys of mrad-run --config, and out, web, save-maps
    out = "records.jsonl"
    mqtt = ["mqtt://broker.plant:1883/line3/cam1"]

Reading is one path: TOML, then :class:`~mrad.runtime.formats.document.Format`
(the version, its upgrade chain, the JSON schema ``schemas/station-v1.schema.json``),
then the checks a schema cannot state (names unique, files present). Every mistake is one line naming
the key, such as ``station.toml: recipes[1].roi: [0, 0, -5, 10] ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MradError
from ..files import DOCUMENT_BYTES
from .document import Format, FormatError, read_toml

FORMAT_VERSION = 1
MAX_STATION_BYTES = DOCUMENT_BYTES  # a station file is a page of text; this bounds what a hostile one can make us parse
OUTPUT_PATHS = ("out", "save-maps")  # outputs that name files, relative to the station file


@dataclass(frozen=True)
class RecipeConfig:
    """One product as the station file describes it; paths are absolute."""

    name: str
    bundle: Path
    enrollment: Path | None = None
    calibration: Path | None = None
    threshold: float | None = None
    quantile: float | None = None
    retrieval: str | None = None
    count_tolerance: int | None = None  # parts counted beyond the enrolled counts still normal [default: the enrollment's]
    roi: tuple | None = None  # (x, y, w, h), or a polygon ((x, y), ...)
    ignore: tuple = ()
    trusted_keys: tuple[Path, ...] = ()
    sign_key: Path | None = None  # signs the enrollment versions and calibrations this recipe writes
    plant: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StationConfig:
    """A whole station file, read and checked."""

    recipes: tuple[RecipeConfig, ...]
    path: Path | None = None
    name: str = "line"
    active: str | None = None
    provider: str | None = None
    recipe_file: Path | None = None
    sources: tuple[tuple[str, str], ...] = ()  # (kind, spec): kind is input, camera or genicam
    run: dict[str, Any] = field(default_factory=dict)  # mrad-run option names without dashes
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [recipe.name for recipe in self.recipes]

    def recipe(self, name: str) -> RecipeConfig:
        for recipe in self.recipes:
            if recipe.name == name:
                return recipe
        raise MradError(f"{self.where}: no recipe named {name[:64]!r}; the recipes are {', '.join(self.names)}")

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "station"


# Older formats become the newest in the upgrade chain (none yet: format 1 is the first). A station file does not
# name its format (it is written by hand); one without format_version is format 1.
STATION = Format(name=None, newest=FORMAT_VERSION, schema="station-v1.schema.json", unversioned=1)


def parse_station(raw: dict, path: Path | None = None) -> StationConfig:
    """A station file's content (as TOML gives it) checked and resolved; ``path`` anchors relative paths."""
    where = str(path) if path else "station"
    try:
        raw = STATION.read(raw)
    except FormatError as exc:
        raise MradError(f"{where}: {exc.problem}") from exc
    base = path.parent if path else Path.cwd()

    def resolved(value: str | None) -> Path | None:
        if value is None:
            return None
        target = Path(value).expanduser()
        return target if target.is_absolute() else (base / target)

    station_keys = tuple(resolved(k) for k in raw.get("trusted-keys", ()))
    recipes, seen = [], set()
    for i, entry in enumerate(raw["recipes"]):
        key = f"recipes[{i}]"
        if entry["name"] in seen:
            raise MradError(f"{where}: {key}.name: {entry['name']!r} names two recipes; each recipe needs its own name")
        seen.add(entry["name"])
        bundle = resolved(entry["bundle"])
        if not bundle.is_dir():
            raise MradError(f"{where}: {key}.bundle: {bundle} is not a folder; give the folder mrad-export wrote")
        roi = _shape(entry.get("roi"), f"{where}: {key}.roi")
        ignore = tuple(_shape(s, f"{where}: {key}.ignore[{j}]") for j, s in enumerate(entry.get("ignore", ())))
        if ignore and roi is None:
            raise MradError(f"{where}: {key}.ignore: ignore masks are cut out of a region: give roi too "
                            "(the whole frame: roi = [0, 0, WIDTH, HEIGHT])")
        keys = station_keys + tuple(resolved(k) for k in entry.get("trusted-keys", ()))
        for j, key_file in enumerate(keys):
            if not key_file.is_file():
                raise MradError(f"{where}: trusted-keys: {key_file} is not a file (a public key in PEM)")
        sign_key = resolved(entry.get("sign-key", raw.get("sign-key")))
        if sign_key is not None and not sign_key.is_file():
            raise MradError(f"{where}: sign-key: {sign_key} is not a file (a private key in PEM)")
        threshold = entry.get("threshold")
        if threshold is not None and not _finite(threshold):
            raise MradError(f"{where}: {key}.threshold: {repr(threshold)[:80]} is not a finite number")
        recipes.append(RecipeConfig(
            name=entry["name"], bundle=bundle, enrollment=resolved(entry.get("enrollment")),
            calibration=resolved(entry.get("calibration")), threshold=threshold, quantile=entry.get("quantile"),
            retrieval=entry.get("retrieval"), count_tolerance=entry.get("count-tolerance"), roi=roi, ignore=ignore, trusted_keys=keys,
            sign_key=sign_key,
            plant=dict(entry.get("plant", {}))))
    active = raw.get("active")
    if active is not None and active not in seen:
        raise MradError(f"{where}: active: {active!r} is not one of the recipes ({', '.join(sorted(seen))})")
    run = dict(raw.get("run", {}))
    if "deadline-ms" in run and not _finite(run["deadline-ms"]):
        raise MradError(f"{where}: run.deadline-ms: {repr(run['deadline-ms'])[:80]} is not a finite number")
    outputs = _outputs(raw.get("outputs", {}), where, resolved)
    sources = tuple((kind, str(resolved(spec)) if kind == "input" else spec)
                    for entry in raw.get("sources", ()) for kind, spec in entry.items())
    return StationConfig(recipes=tuple(recipes), path=path, name=raw.get("name", "line"), active=active,
                         provider=raw.get("provider"), recipe_file=resolved(raw.get("recipe-file")),
                         sources=sources, run=run, outputs=outputs)


def _outputs(table: dict, where: str, resolved) -> dict:
    """The outputs table: the line sinks' keys (checked by their own module), and out, web, save-maps."""
    from ..line.settings import KEYS, PATHS, checked

    outputs = {}
    for key, value in table.items():
        if key in OUTPUT_PATHS:
            if not isinstance(value, str) or not value:
                raise MradError(f"{where}: outputs.{key}: expected a path, got {repr(value)[:80]}")
            outputs[key] = value if value == "-" else str(resolved(value))
        elif key == "web":
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise MradError(f"{where}: outputs.web: expected [HOST:]PORT, got {repr(value)[:80]}")
            outputs[key] = str(value)
        elif key in KEYS:
            outputs[key] = checked(key, value, f"{where}: outputs.{key}")
            if key in PATHS and isinstance(outputs[key], Path) and not outputs[key].is_absolute():
                outputs[key] = resolved(str(outputs[key]))  # a history URL stays a string
        else:
            raise MradError(f"{where}: outputs.{key}: unknown key; the keys here are "
                            f"{', '.join(sorted((*KEYS, *OUTPUT_PATHS, 'web')))}")
    return outputs


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _shape(value, where: str) -> tuple | None:
    """A rectangle (x, y, w, h) or a polygon ((x, y), ...), checked; None when not given."""
    if value is None:
        return None
    if not any(isinstance(v, (list, tuple)) for v in value):  # the schema let only whole numbers through
        x, y, w, h = value = tuple(int(v) for v in value)
        if w < 1 or h < 1 or x < 0 or y < 0:
            raise MradError(f"{where}: {list(value)} is not a rectangle inside a frame: x and y must be 0 or more, "
                            "width and height 1 or more")
        return value
    points = tuple((float(p[0]), float(p[1])) for p in value)
    if not all(_finite(c) and c >= 0 for p in points for c in p):
        raise MradError(f"{where}: polygon points must be finite pixel coordinates of 0 or more")
    return points


def read_station(path: str | Path) -> StationConfig:
    """Read and check a station file."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise MradError(f"station file {path} not found")
    raw = read_toml(path, "station file", MAX_STATION_BYTES)
    return parse_station(raw, path)
