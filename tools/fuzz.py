"""mrad fuzz: mutated images and bundles against the runtime, each case in a worker process with limits.

    python -m mrad.tools.fuzz --bundle B --images 10000 --bundles 1000 --settings 2000 --seed 0

Image cases save random pictures in every format and pixel mode Pillow
writes, then damage them (truncation, flipped and inserted bytes, forged
header sizes, garbage, empty files, extreme shapes). Bundle cases copy the
bundle and change one thing: a manifest field (deleted, of the wrong type,
out of range, NaN, a path leaving the bundle), a file's bytes (without
updating its checksum: a tampered bundle), a file replaced by one of the
wrong shape or dtype or by a pickle (with its checksum updated), or a file
replaced by a link out of the bundle, a link loop, a folder or a FIFO.

Each case runs in a worker subprocess under a memory limit (address space)
and a time limit; a worker that dies or hangs is replaced. Outcomes:

- ``clear error``: an MradError (BundleError, ImageError, ...) with its message;
- ``accepted``: a result with a finite score in [0, 1] and a finite map of the
  image's size;
- failures: ``crash`` (the worker died), ``hang`` (time limit), ``memory``
  (the memory limit was hit), ``other exception`` (anything but MradError),
  ``bad result`` (NaN or out-of-range score, wrong map), ``tampered accepted``
  (a bundle whose bytes no longer match its checksums was loaded),
  ``outside read`` (a file outside the bundle was opened, as seen by
  Python's audit hook on ``open``).

Every failing input is written to ``--failures`` with a ``case.json`` for
reproduction; the exit code is 1 when any case failed.
"""

from __future__ import annotations

import io
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np
from PIL import Image

from mrad.runtime.commands.common import command
from mrad.runtime.files import sha256_of

FAILURES = ("crash", "hang", "memory", "other exception", "bad result", "tampered accepted", "outside read")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")
# Pixel modes the base pictures are saved in, and the formats that can hold each.
MODES = {"RGB": IMAGE_FORMATS, "L": IMAGE_FORMATS, "RGBA": ("PNG", "TIFF", "WEBP"), "P": ("PNG", "GIF", "BMP"),
         "1": ("PNG", "BMP", "TIFF"), "LA": ("PNG",), "CMYK": ("JPEG", "TIFF"), "I;16": ("PNG", "TIFF"),
         "F": ("TIFF",), "I": ("TIFF", "PNG")}
TIME_LIMIT_S = 30.0
MEMORY_LIMIT_MB = 6144
OUTSIDE_NAME = "outside-sentinel.txt"


# -- the worker: runs cases sent as JSON lines, answers one JSON line each -------------------------------

WORKER = r"""
import json, math, os, resource, sys
limit = int(sys.argv[1]) * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sentinel = sys.argv[2]
touched = []
sys.addaudithook(lambda event, args: touched.append(str(args[0])) if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) and os.fspath(args[0]) == sentinel else None)
import numpy as np
from mrad.runtime import Detector, MradError
detectors = {}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    case = json.loads(line)
    touched.clear()
    answer = {}
    try:
        if "settings" in case:  # a line settings file (mrad-run --config)
            from mrad.runtime.line.settings import line_settings
            settings = line_settings(config=case["settings"])
            numbers = [settings.flush_timeout, settings.mqtt_buffer_size, settings.mqtt_qos]
            print(json.dumps({"outcome": "accepted", "finite": all(math.isfinite(n) for n in numbers),
                              "outside_read": bool(touched)}), flush=True)
            continue
        bundle = case["bundle"]
        if bundle not in detectors or case.get("fresh"):
            detectors.pop(bundle, None)
            detectors[bundle] = Detector(bundle, provider="cpu", retrieval=case.get("retrieval"))
        result = detectors[bundle].predict(case["image"])
        answer = {"outcome": "accepted", "score": result.score, "map": list(result.anomaly_map.shape),
                  "map_finite": bool(np.isfinite(result.anomaly_map).all())}
    except MradError as exc:
        answer = {"outcome": "clear error", "type": type(exc).__name__, "message": str(exc)[:300]}
    except MemoryError as exc:
        answer = {"outcome": "memory", "type": "MemoryError", "message": str(exc)[:300]}
    except Exception as exc:
        answer = {"outcome": "other exception", "type": type(exc).__name__, "message": str(exc)[:300]}
    if case.get("fresh"):
        detectors.pop(case["bundle"], None)
    answer["outside_read"] = bool(touched)
    print(json.dumps(answer), flush=True)
"""


class Worker:
    """A subprocess that scores cases; replaced after it dies or hangs."""

    def __init__(self, memory_mb: int, sentinel: Path, script: str = WORKER):
        self.memory_mb, self.sentinel, self.script = memory_mb, sentinel, script
        self.process: subprocess.Popen | None = None

    def run(self, case: dict, time_limit: float) -> dict:
        if self.process is None:
            self._start(time_limit)
        try:
            self.process.stdin.write(json.dumps(case) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        line = self._read_line(time_limit)
        if line is None:
            self.stop()
            return {"outcome": "hang", "message": f"no answer within {time_limit:.0f} s"}
        if not line:
            return self._died()
        return json.loads(line)

    def _start(self, time_limit: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.script, str(self.memory_mb), str(self.sentinel)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        ready = self._read_line(max(time_limit, 60.0))
        if not ready:
            raise click.ClickException("the fuzz worker did not start; is the runtime installed?")

    def _read_line(self, timeout: float) -> str | None:
        """One line of the worker's output; None after ``timeout`` seconds, "" at end of output."""
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        return self.process.stdout.readline() if readable else None

    def _died(self) -> dict:
        code = self.process.wait(timeout=30)
        self.process = None
        if code == -9 or code == 137:
            return {"outcome": "memory", "message": "killed (out of memory)"}
        return {"outcome": "crash", "message": f"worker exited with {code}"}

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


# -- image cases ------------------------------------------------------------------------------------


def base_picture(rng: random.Random) -> tuple[Image.Image, str]:
    mode = rng.choice(sorted(MODES))
    width, height = rng.choice([(1, 1), (1, rng.randint(2, 2000)), (rng.randint(2, 2000), 1)] +
                               [(rng.randint(8, 640), rng.randint(8, 480))] * 6)
    pixels = np.random.default_rng(rng.randrange(2 ** 32)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels, "RGB")
    if mode in ("I;16", "I", "F"):
        grey = pixels[..., 0].astype(np.float64)
        scaled = {"I;16": (grey * 257).astype(np.uint16), "I": (grey * rng.choice([1, 257, 70000])).astype(np.int32),
                  "F": (grey / rng.choice([255.0, 1.0, -3.0])).astype(np.float32)}[mode]
        picture = Image.fromarray(scaled)
    elif mode != "RGB":
        picture = picture.convert(mode)
    return picture, rng.choice(MODES[mode])


def image_bytes(rng: random.Random) -> tuple[bytes, str, str]:
    """A damaged (or intact) image file: its bytes, a suffix, and what was done."""
    picture, fmt = base_picture(rng)
    buffer = io.BytesIO()
    try:
        picture.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):
        picture.convert("RGB").save(buffer, format="PNG")
        fmt = "PNG"
    data = bytearray(buffer.getvalue())
    how = rng.choice(["intact", "truncate", "flip", "insert", "header size", "garbage", "empty", "prefix"])
    if how == "truncate":
        data = data[: rng.randrange(len(data))]
    elif how == "flip":
        for _ in range(rng.randint(1, 40)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "insert":
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif how == "header size":
        for offset in range(8, min(len(data), 40)):  # where format headers keep their sizes
            if rng.random() < 0.3:
                data[offset] = rng.choice([0x00, 0xFF, 0x7F, 0x80])
    elif how == "garbage":
        data = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    elif how == "empty":
        data = bytearray()
    elif how == "prefix":
        data = data[: min(len(data), 64)] * rng.randint(1, 50)
    return bytes(data), fmt.lower(), f"{picture.mode} {picture.size[0]}x{picture.size[1]} {fmt}, {how}"


# -- bundle cases -----------------------------------------------------------------------------------

WRONG_VALUES = [None, "x", -1, 0, 1, 10 ** 12, 1e308, -1e308, True, [], {}, [1, 2], "../" + OUTSIDE_NAME, "/etc/passwd",
                0.5, "NaN"]


def leaves(value, path=()):
    """Every path into a JSON value (objects and lists included)."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaves(child, path + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from leaves(child, path + (i,))


def mutate_at(document: dict, path: tuple, rng: random.Random, values: list, what: str) -> tuple[dict, str, object]:
    """One change at ``path`` of a JSON-like document: the key deleted, an unknown key added beside it, or its value
    replaced by one of ``values``; returns the document, what was done, and the value put in (None otherwise)."""
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    last, where = path[-1], ".".join(map(str, path))
    action = rng.choice(["delete", "replace", "replace", "replace", "add key"])
    if action == "delete" and isinstance(parent, dict):
        del parent[last]
        return document, f"{what} {where} deleted", None
    if action == "add key" and isinstance(parent, dict):
        parent["unexpected"] = 1
        return document, f"{what} {where}: unknown key added beside it", None
    parent[last] = rng.choice(values)
    return document, f"{what} {where} = {repr(parent[last])[:40]}", parent[last]


def mutate_manifest(manifest: dict, rng: random.Random) -> tuple[dict | str, str]:
    paths = [p for p in leaves(manifest) if p and p[0] != "files"] + [("files",) + p for p in
                                                                     [(k,) for k in manifest["files"]]]
    path = rng.choice(paths)
    manifest, what, value = mutate_at(manifest, path, rng, WRONG_VALUES, "manifest")
    if value == "NaN":  # JSON's bare NaN constant, which json.dumps writes only for a float: a marker replaced
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = "__NAN__"
        return json.dumps(manifest, indent=1).replace('"__NAN__"', "NaN"), what.replace("'NaN'", "NaN")
    return manifest, what


STATION_VALUES = WRONG_VALUES + [float("nan"), float("inf"), "x" * 100_000, [[0, 0]] * 10_000, {"a": {"b": []}},
                                  [0, 0, 1e308, 1], [[0.5, 0.5], [float("nan"), 1], [2, 2]], "part-a"]


def station_sample(bundle: Path) -> dict:
    """A valid station file's content (as TOML reads it) using ``bundle``: every kind of key present once."""
    return {"format_version": 1, "name": "line3", "active": "part-a", "provider": "cpu",
            "recipes": [{"name": "part-a", "bundle": str(bundle)},
                        {"name": "part-b", "bundle": str(bundle), "threshold": 0.4, "quantile": 0.99,
                         "retrieval": "exact", "roi": [0, 0, 60, 50], "ignore": [[1, 1, 4, 4], [[5, 5], [9, 5], [7, 9]]],
                         "plant": {"product": "B-4711", "code": 12}}],
            "sources": [{"input": str(bundle)}], "run": {"batch": 2, "when-behind": "drop-oldest", "deadline-ms": 200},
            "outputs": {"out": "records.jsonl", "mqtt": ["mqtt://127.0.0.1:1883/l/c"], "webhook-on": "all"}}


def mutate_station(station: dict, rng: random.Random) -> tuple[dict, str]:
    """One change to a station file's content: a key deleted, added or given a hostile value."""
    station, what, _ = mutate_at(station, rng.choice([p for p in leaves(station) if p]), rng, STATION_VALUES, "station")
    return station, what


SETTINGS_SAMPLE = {"station": "cam1", "mqtt": ["mqtt://127.0.0.1:1883/l/c"], "mqtt-qos": 1, "mqtt-buffer": "buffer",
                   "mqtt-buffer-size": 100, "opcua": "opc.tcp://127.0.0.1:4840/m", "webhook": ["http://127.0.0.1:9/h"],
                   "webhook-on": "all", "flush-timeout": 10}
SETTINGS_VALUES = STATION_VALUES + ["mqtt://h/#", "mqtt://h/a?b", "mqtt://h/$SYS/x", "http://h:0/", "http://h/\r\nX: 1",
                                    "http://u:p@h/?token=t", "opc.tcp://0.0.0.0:4840/m", -0.0, 3601, 2 ** 63]


def toml_value(value) -> str:
    """``value`` written as TOML (what a user could type; None has no TOML form: an empty string stands in)."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not np.isfinite(value):
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"


def settings_bytes(rng: random.Random) -> tuple[bytes, str]:
    """A settings file: the sample with one hostile change, or bytes no settings file should hold."""
    kind = rng.choice(["mutated"] * 6 + ["binary", "utf-16", "nested", "huge", "cut", "nul"])
    sample = json.loads(json.dumps(SETTINGS_SAMPLE))
    text = lambda document: "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in document.items())  # noqa: E731
    if kind == "mutated":
        document, what, _ = mutate_at(sample, rng.choice([p for p in leaves(sample) if p]), rng, SETTINGS_VALUES,
                                      "settings")
        return text(document).encode(), what
    whole = text(sample).encode()
    made = {"binary": bytes(rng.getrandbits(8) for _ in range(512)), "utf-16": text(sample).encode("utf-16"),
            "nested": b"x = " + b"[" * 50_000 + b"]" * 50_000, "huge": b"# " + b"x" * (2 << 20) + b"\n",
            "cut": whole[: rng.randrange(1, len(whole))], "nul": whole.replace(b"=", b"\x00=", 1)}[kind]
    return made, f"settings file: {kind}"


def wrong_array(rng: random.Random, original: np.ndarray) -> np.ndarray:
    kind = rng.choice(["shape", "dtype", "object", "empty", "nan", "huge"])
    if kind == "shape":
        return np.zeros(tuple(max(1, s + rng.choice([-1, 1, 5])) for s in original.shape) or (3,), original.dtype)
    if kind == "dtype":
        return original.astype(rng.choice([np.float64, np.int64, np.float16, np.uint8]))
    if kind == "object":
        return np.array([{"x": 1}] * max(1, len(original)), dtype=object)
    if kind == "empty":
        return np.zeros((0,) + original.shape[1:], original.dtype)
    if kind == "nan":
        return np.full(original.shape, np.nan, np.float32)
    return np.full(original.shape, 3.4e38, np.float32)


def mutate_bundle(bundle: Path, rng: random.Random, outside: Path) -> tuple[str, bool]:
    """Change one thing in a bundle copy; returns what, and whether the change leaves the checksums stale."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    named = sorted(manifest["files"])
    target = rng.choice(named)
    file = bundle / target
    kind = rng.choice(["manifest"] * 4 + ["tamper", "rehashed array", "rehashed bytes", "link out", "link loop",
                                          "folder", "fifo", "missing", "path out"])

    def rehash(name: str, path: Path) -> None:
        manifest["files"][name] = sha256_of(path)
        manifest_path.write_text(json.dumps(manifest, indent=1))

    if kind == "manifest":
        changed, what = mutate_manifest(manifest, rng)
        manifest_path.write_text(changed if isinstance(changed, str) else json.dumps(changed, indent=1))
        return what, False
    if kind == "tamper":
        data = bytearray(file.read_bytes())
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            data = bytearray(b"x")
        file.write_bytes(bytes(data))
        return f"{target}: a byte flipped, checksum not updated", True
    if kind == "rehashed array" and target.endswith(".npy"):
        original = np.load(file, allow_pickle=False)
        np.save(file, wrong_array(rng, original), allow_pickle=True)
        rehash(target, file)
        return f"{target}: replaced by an array of the wrong kind, checksum updated", False
    if kind in ("rehashed array", "rehashed bytes"):
        data = file.read_bytes()
        choice = rng.choice(["truncate", "garbage", "empty"])
        file.write_bytes(data[: rng.randrange(max(len(data), 1))] if choice == "truncate" else
                         (bytes(rng.randrange(256) for _ in range(512)) if choice == "garbage" else b""))
        rehash(target, file)
        return f"{target}: {choice}, checksum updated", False
    if kind == "link out":
        file.unlink()
        file.symlink_to(outside)
        rehash(target, outside)
        return f"{target}: a link to a file outside the bundle, checksum of that file", False
    if kind == "link loop":
        file.unlink()
        file.symlink_to(file.name)
        return f"{target}: a link to itself", False
    if kind == "folder":
        file.unlink()
        file.mkdir()
        return f"{target}: a folder", False
    if kind == "fifo":
        file.unlink()
        os.mkfifo(file)
        return f"{target}: a FIFO", False
    if kind == "missing":
        file.unlink()
        return f"{target}: deleted", False
    # path out: the manifest names the outside file, with its checksum
    for spec in list(manifest.get("memories", {}).values()) + list(manifest.get("graphs", {}).values()):
        for field in ("labels", "keys", "provenance", "index", "file"):
            if spec.get(field) == target:
                spec[field] = rng.choice([str(outside), "../" + outside.name, "./../" + outside.name])
                manifest["files"][spec[field]] = sha256_of(outside)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return f"{target}: the manifest names a file outside the bundle instead", False


# -- the run ----------------------------------------------------------------------------------------


def verdict(answer: dict, stale_checksums: bool, image_size: tuple[int, int] | None) -> str:
    if answer.get("outside_read"):
        return "outside read"
    outcome = answer["outcome"]
    if outcome != "accepted":
        return outcome
    if "finite" in answer:  # a settings file: accepted only with every number finite
        return "accepted" if answer["finite"] else "bad result"
    if stale_checksums:
        return "tampered accepted"
    score, shape = answer["score"], answer["map"]
    if not (answer["map_finite"] and np.isfinite(score) and 0.0 <= score <= 1.0):
        return "bad result"
    if image_size is not None and shape != [image_size[1], image_size[0]]:
        return "bad result"
    return "accepted"


class Tally:
    """Counts outcomes per kind of case, prints them with --verbose, keeps every failing input."""

    def __init__(self, counts: dict[str, Counter], folder: Path, verbose: bool):
        self.counts, self.folder, self.verbose = counts, folder, verbose

    def add(self, kind: str, i: int, what: str, case: dict, answer: dict, result: str, source: Path) -> None:
        self.counts[kind][result] += 1
        if self.verbose:
            click.echo(f"{kind} {i}: {what}: {result} {answer.get('message', '')[:120]}", err=True)
        if result not in FAILURES:
            return
        target = self.folder / f"{kind}-{i:06d}"
        target.mkdir(parents=True, exist_ok=True)
        if source.is_dir():  # a FIFO or a link loop inside is copied as what it is
            shutil.copytree(source, target / source.name, symlinks=True, dirs_exist_ok=True,
                            ignore=lambda folder, names: [n for n in names if _special(Path(folder) / n)])
        elif source.exists():
            shutil.copy(source, target / source.name)
        (target / "case.json").write_text(json.dumps({"case": case, "what": what, "answer": answer}, indent=1) + "\n")


def _special(path: Path) -> bool:
    return path.exists() and not path.is_symlink() and not (path.is_file() or path.is_dir())


@command("fuzz")
@click.option("--bundle", required=True, type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--images", default=200, show_default=True, type=click.IntRange(min=0), help="Image cases.")
@click.option("--bundles", "bundles", default=50, show_default=True, type=click.IntRange(min=0), help="Bundle cases.")
@click.option("--settings", "settings_cases", default=0, show_default=True, type=click.IntRange(min=0),
              help="Line settings files (mrad-run --config) to try: the sample with one hostile value, or bytes no "
                   "settings file holds (binary, UTF-16, deep nesting, huge, cut).")
@click.option("--seed", default=0, show_default=True)
@click.option("--time-limit", default=TIME_LIMIT_S, show_default=True, type=click.FloatRange(min=1),
              help="Seconds one case may take.")
@click.option("--memory-mb", default=MEMORY_LIMIT_MB, show_default=True, type=click.IntRange(min=256),
              help="Address-space limit of the worker (ONNX Runtime reserves much more than it touches).")
@click.option("--failures", type=click.Path(path_type=Path, file_okay=False), default=Path("fuzz-failures"),
              show_default=True, help="Where failing inputs are written for reproduction.")
@click.option("--verbose", is_flag=True, help="One line per case: what was done and the outcome (and the libraries' own warnings and "
                   "logs).")
def main(bundle, images, bundles, settings_cases, seed, time_limit, memory_mb, failures, verbose):
    """Mutated images, bundles and settings files against the runtime; a table of outcomes; exit 1 on any failure."""
    counts = {"images": Counter(), "bundles": Counter(), "settings": Counter()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mrad-fuzz-") as scratch:
        scratch = Path(scratch)
        outside = scratch / OUTSIDE_NAME
        outside.write_text("a file outside every bundle: no case may open it\n")
        worker = Worker(memory_mb, outside)
        reference = scratch / "reference.png"
        Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(reference)
        tally = Tally(counts, failures, verbose)
        try:
            for i in range(images):
                rng = random.Random(f"{seed}-image-{i}")
                data, suffix, what = image_bytes(rng)
                path = scratch / f"image.{suffix}"
                path.write_bytes(data)
                case = {"bundle": str(bundle), "image": str(path)}
                answer = worker.run(case, time_limit)
                tally.add("images", i, what, case, answer, verdict(answer, False, _declared_size(path)), path)
            for i in range(bundles):
                rng = random.Random(f"{seed}-bundle-{i}")
                copy = scratch / "bundle"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("enrollment"))
                what, stale = mutate_bundle(copy, rng, outside)
                case = {"bundle": str(copy), "image": str(reference), "fresh": True,
                        "retrieval": rng.choice(["exact", "hnsw"])}
                answer = worker.run(case, time_limit)
                tally.add("bundles", i, what, case, answer, verdict(answer, stale, (80, 64)), copy)
            for i in range(settings_cases):
                data, what = settings_bytes(random.Random(f"{seed}-settings-{i}"))
                path = scratch / "line.toml"
                path.write_bytes(data)
                case = {"settings": str(path)}
                answer = worker.run(case, time_limit)
                tally.add("settings", i, what, case, answer, verdict(answer, False, None), path)
        finally:
            worker.stop()
    elapsed = time.perf_counter() - started
    click.echo(format_table(counts))
    failed = sum(counts[k][f] for k in counts for f in FAILURES)
    click.echo(f"{images} image cases, {bundles} bundle cases, {settings_cases} settings cases in {elapsed:.0f} s; "
               f"failures: {failed}"
               + (f" (inputs in {failures})" if failed else ""))
    sys.exit(1 if failed else 0)


def _declared_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as opened:
            return opened.size
    except Exception:  # noqa: BLE001 - any unreadable file has no size to compare
        return None


def format_table(counts: dict[str, Counter]) -> str:
    outcomes = ["clear error", "accepted", *FAILURES]
    lines = [f"{'':10}" + "".join(f"{o:>18}" for o in outcomes)]
    for kind, counter in counts.items():
        lines.append(f"{kind:10}" + "".join(f"{counter.get(o, 0):>18}" for o in outcomes))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
