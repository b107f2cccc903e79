"""The bundle: a directory with ``manifest.json`` and the files it names.

The manifest is the single place where export and runtime agree. Format 2
lists the bundle's parts by role:

- ``graphs``: ONNX graphs by name (``encoder`` today), each with its file, its
  inputs and outputs (shape and meaning), its precision, and the providers it
  was checked with at export;
- ``memories``: memories by name (``image`` and ``pixel`` today), each with
  its keys, labels, provenance and hnswlib index files, its size, the index
  parameters, the graph output its queries come from, the output new entries
  are made from, and the learned key projection of MRAD-FT when there is one;
- ``preprocess`` and ``scoring``: the constants of spec sections 1 and 4;
- ``files``: a sha256 for every file.

Format-1 bundles are read through :func:`_upgrade_v1` into the same objects;
their memories cannot grow (keys live only in the index, the encoder has no
feature outputs). Nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import defaults
from .errors import BundleError
from .files import sha256_of, write_atomic

FORMAT_NAME = "mrad-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
MEMORY_KINDS = ("image", "pixel")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the encoder input (spec section 1)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: str = defaults.RESAMPLE


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` holds sizes, or names for dynamic axes ("batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    meaning: str = ""


@dataclass(frozen=True)
class Graph:
    """One ONNX graph of the bundle."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"
    # Providers whose results were compared with the PyTorch model at export, and the largest
    # absolute difference per output found there.
    checked_providers: tuple[str, ...] = ()
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    external_data: str | None = None

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def files(self) -> list[str]:
        return [self.file] + ([self.external_data] if self.external_data else [])


@dataclass(frozen=True)
class HnswParams:
    M: int = defaults.HNSW_M
    ef_construction: int = defaults.HNSW_EF_CONSTRUCTION
    ef_search: int = defaults.HNSW_EF_SEARCH


@dataclass(frozen=True)
class KeyProjection:
    """MRAD-FT's learned key layer, ``key = weight @ x + bias``, applied to every new entry."""

    weight: str  # .npy, (dim, feature dim)
    bias: str  # .npy, (dim,)


@dataclass(frozen=True)
class MemorySpec:
    """One memory: labelled keys that queries from one graph output are compared with.

    ``kind`` says how an image becomes entries: ``image`` gives one entry (its
    normalised image feature); ``pixel`` gives up to two (the normalised means
    of its normal and of its anomalous patch features, spec section 3).
    """

    kind: str
    query: str  # encoder output holding the queries
    feature: str | None  # encoder output new entries are made from; None: the memory cannot grow
    dim: int
    count: int
    keys: str | None  # .npy (count, dim) float32; None: keys live only in the index (format 1)
    labels: str  # .npy (count,) uint8: 0 normal, 1 anomalous
    provenance: str | None  # .jsonl, one object per entry (source, category, defect)
    index: str | None  # hnswlib index over the keys; None: exact retrieval only
    space: str = "ip"
    hnsw: HnswParams = HnswParams()
    key_projection: KeyProjection | None = None

    def files(self) -> list[str]:
        names = [self.keys, self.labels, self.provenance, self.index]
        if self.key_projection:
            names += [self.key_projection.weight, self.key_projection.bias]
        return [n for n in names if n]


@dataclass(frozen=True)
class Scoring:
    """Map and image-score constants (spec section 4) and the default retrieval."""

    grid: int  # patch grid side G: patch probabilities are reshaped to G x G
    image_weight: float = defaults.IMAGE_WEIGHT
    sigma: float = defaults.SIGMA
    truncate: float = defaults.TRUNCATE
    top_fraction: float = defaults.TOP_FRACTION
    retrieval: str = defaults.RETRIEVAL
    top_k: int = defaults.TOP_K


@dataclass(frozen=True)
class Manifest:
    variant: str
    model: dict[str, Any]
    preprocess: Preprocess
    graphs: dict[str, Graph]
    memories: dict[str, MemorySpec]
    scoring: Scoring
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def named_files(self) -> list[str]:
        """Files the runtime opens; each must carry a checksum."""
        names = [n for graph in self.graphs.values() for n in graph.files()]
        return names + [n for memory in self.memories.values() for n in memory.files()]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``directory`` and write the manifest beside them, atomically."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): sha256_of(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    missing = sorted(set(manifest.named_files()) - files.keys())
    if missing:
        raise BundleError(f"cannot write manifest: files {missing} are named but absent from {directory}")
    hashed = dataclasses.replace(manifest, files=files)
    write_atomic(directory / MANIFEST_NAME, (json.dumps(hashed.to_dict(), indent=2) + "\n").encode())
    return hashed


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest (format 1 or 2); with ``verify``, check every file's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"bundle not found: {directory} is not a directory; pass the folder mrad-export wrote")
    if not path.is_file():
        raise BundleError(f"not a bundle: {directory} has no {MANIFEST_NAME}; pass the folder mrad-export wrote")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle is corrupt: {path} is not valid JSON ({exc}); export the bundle again") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise BundleError(f"not an mrad bundle: {path} does not declare format '{FORMAT_NAME}'")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BundleError(
            f"bundle format version {version!r} is not supported by this runtime (it reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); export the bundle again with a matching mrad-edge, "
            "or upgrade the runtime"
        )
    try:
        body = _upgrade_v1(raw) if version == 1 else {k: v for k, v in raw.items() if k not in ("format", "format_version")}
        manifest = from_json(Manifest, body, "manifest")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle is corrupt: {path}: {reason(exc)}; export it again") from exc
    _check(manifest, path)
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise BundleError(f"bundle is corrupt: file {name} named in the manifest is missing; copy the whole bundle again")
        actual = sha256_of(file)
        if actual != expected:
            raise BundleError(
                f"bundle is corrupt: file {name} sha256 {actual[:12]}... does not match the manifest's "
                f"{expected[:12]}...; copy the bundle again or re-export it"
            )


def _check(manifest: Manifest, path: Path) -> None:
    for name in list(manifest.files) + manifest.named_files():
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or "\\" in name or not name:
            raise BundleError(f"bundle is corrupt: {path} names file {name!r} outside the bundle directory")
    unhashed = [n for n in manifest.named_files() if n not in manifest.files]
    if unhashed:
        raise BundleError(f"bundle is corrupt: {path} names {unhashed} without a checksum; export it again")
    if "encoder" not in manifest.graphs:
        raise BundleError(f"bundle is corrupt: {path} has no encoder graph")
    scoring = manifest.scoring
    if scoring.retrieval not in defaults.RETRIEVAL_MODES:
        raise BundleError(f"bundle is corrupt: unknown default retrieval {scoring.retrieval!r}")
    problems = []
    if scoring.grid < 1 or scoring.top_k < 1 or not 0 < scoring.top_fraction <= 1 or scoring.sigma <= 0:
        problems.append("scoring holds a grid, top_k, top_fraction or sigma out of range")
    if manifest.preprocess.image_size < 1:
        problems.append("preprocess.image_size must be positive")
    encoder_outputs = {o.name for o in manifest.graphs["encoder"].outputs}
    for name, memory in manifest.memories.items():
        if memory.kind not in MEMORY_KINDS:
            problems.append(f"memory {name} has unknown kind {memory.kind!r}")
        if memory.query not in encoder_outputs or (memory.feature and memory.feature not in encoder_outputs):
            problems.append(f"memory {name} reads encoder outputs the encoder does not declare")
        if memory.dim < 1 or memory.count < 1:
            problems.append(f"memory {name} must have a positive dim and count")
    for name, graph in manifest.graphs.items():
        if graph.precision not in PRECISIONS:
            problems.append(f"graph {name} has unknown precision {graph.precision!r}")
    if problems:
        raise BundleError(f"bundle is corrupt: {path}: " + "; ".join(problems))


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in format-2 form (read-only: its memories cannot grow)."""
    encoder, retrieval = raw["encoder"], raw["retrieval"]
    grid, side = encoder["grid"], raw["preprocess"]["image_size"]
    levels = {"image": (raw["image_memory"], encoder["image_output"], ["batch", raw["image_memory"]["dim"]]),
              "pixel": (raw["pixel_memory"], encoder["patch_output"], ["batch", grid * grid, raw["pixel_memory"]["dim"]])}
    return {
        "variant": raw["variant"],
        "model": raw["model"],
        "preprocess": raw["preprocess"],
        "graphs": {"encoder": {
            "file": encoder["file"],
            "external_data": encoder.get("external_data"),
            "inputs": [{"name": encoder["input"], "shape": ["batch", 3, side, side], "dtype": "float32",
                        "meaning": "normalised RGB images"}],
            "outputs": [{"name": output, "shape": shape, "dtype": "float32", "meaning": f"{name} retrieval queries"}
                        for name, (_, output, shape) in levels.items()],
        }},
        "memories": {name: {
            "kind": name, "query": output, "feature": None, "dim": level["dim"], "count": level["count"],
            "keys": None, "labels": level["labels"], "provenance": None, "index": level["index"],
            "space": level["space"],
            "hnsw": {"M": defaults.HNSW_M, "ef_construction": defaults.HNSW_EF_CONSTRUCTION,
                     "ef_search": retrieval["ef_search"]},
        } for name, (level, output, _) in levels.items()},
        "scoring": {**raw["scoring"], "grid": grid, "retrieval": retrieval["default"], "top_k": retrieval["top_k"]},
        "provenance": {**raw.get("provenance", {}), "format_version": 1},
        "files": raw["files"],
    }


def from_json(cls, values: Any, where: str):
    """Build dataclass ``cls`` from JSON ``values``, checking keys and types field by field."""
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be an object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields.keys())
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    hints = typing.get_type_hints(cls)
    built = {}
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f"{where}.{name}")
            continue
        built[name] = _convert(hints[name], values[name], f"{where}.{name}")
    return cls(**built)


def _convert(hint, value: Any, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _convert(option, value, where)
            except (TypeError, ValueError, KeyError):
                continue
        raise TypeError(f"{where} has the wrong type ({type(value).__name__})")
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{where} must be a list")
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be an object")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{where} must be an integer")
    if hint in (str, bool) and not isinstance(value, hint):
        raise TypeError(f"{where} must be a {hint.__name__}")
    return value


def reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"required entry {exc.args[0]} is missing"
    return str(exc)
