"""The bundle: a directory with ``manifest.json`` and the files it names.

The manifest is the single place where export and runtime agree. Format 2
lists the bundle's parts by role:

- ``graphs``: ONNX graphs by name (``encoder`` today), each with its file, its
  inputs and outputs (shape and meaning), its precision, the providers it
  was checked with at export, and what ONNX Runtime optimised in it there;
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
import hashlib
import io
import json
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .. import defaults
from ..errors import BundleError
from ..files import read_small, sha256_of, write_atomic
from ..formats.document import Format, FormatError, same

FORMAT_NAME = "mrad-bundle"
# Format 3 is format 2 plus MRAD-CLIP's text stage (scoring.text) and graphs optimised at export
# (graphs.*.optimized); format 2 manifests read unchanged.
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2 ** 20  # manifests are kilobytes; this bounds what a hostile one can make the loader read
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
    # A derived graph (mrad-quantize): how far it moves outputs and scores from the fp32 graph it came from.
    fidelity: dict[str, Any] = field(default_factory=dict)
    # ONNX Runtime's graph optimisations done at export (export/optimise.py): its version, the level, the
    # node counts before and after, the contrib ops written. Empty: the graph is as traced.
    optimized: dict[str, Any] = field(default_factory=dict)

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
class TextScoring:
    """MRAD-CLIP's patch map (spec section 6): patch projections against text features biased by region priors.

    Patches whose pixel-memory share exceeds ``prior_threshold`` form the
    anomalous region, the rest the normal one; the mean of each region's
    ``projection`` vectors (zeros for an empty region) goes into ``graph``,
    which returns the normal and the anomalous text feature. A patch's share
    is ``(s_anomalous + 1 - s_normal) / 2`` with ``s`` the softmax of its
    similarities to the two, divided by ``temperature``. The other fields
    record how the text graph was made.
    """

    prior_threshold: float
    temperature: float
    graph: str = "text"
    projection: str = "patch_projection"  # encoder output: normalised smoothed patch projections
    prompts: tuple[str, ...] = ()
    context_tokens: int = defaults.CLIP_CONTEXT_TOKENS
    deep_tokens: int = defaults.CLIP_DEEP_TOKENS
    deep_layers: int = defaults.CLIP_DEEP_LAYERS
    deep_rounding: str = defaults.CLIP_DEEP_ROUNDING


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
    text: TextScoring | None = None  # MRAD-CLIP: the patch map comes from text alignment


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
        body = dataclasses.asdict(self)
        if body["scoring"]["text"] is None:
            del body["scoring"]["text"]
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **body}


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


def read_manifest(directory: str | Path, verify: bool = True, signed: Mapping[str, str] | None = None) -> Manifest:
    """Read and check a bundle's manifest (any format :data:`MANIFEST` reads); with ``verify``, check every file's
    sha256.

    ``signed``: the digests of the bundle's signature, once checked against a trusted key
    (:func:`~mrad.runtime.core.signing.signed_bundle`). The manifest is then parsed from bytes whose sha256 is the
    signed one, and each of its checksums must be the signed one too; the files themselves are checked as they
    are read for use (:class:`BundleFiles`), not here, so that no file can change between its check and its load.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"bundle not found: {directory} is not a directory; pass the folder mrad-export wrote")
    if not path.is_file():
        raise BundleError(f"not a bundle: {directory} has no {MANIFEST_NAME}; pass the folder mrad-export wrote")
    manifest_file = bundle_file(directory, MANIFEST_NAME)  # a regular file inside the bundle, not a link out
    data = read_regular(manifest_file, MAX_MANIFEST_BYTES, "bundle is corrupt: manifest")
    if signed is not None and hashlib.sha256(data).hexdigest() != signed.get(MANIFEST_NAME):
        raise BundleError(f"bundle {directory} is not signed by a trusted key, or was changed after signing "
                          f"({MANIFEST_NAME} is not the signed one)")
    try:
        raw = json.loads(data.decode(), parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"bundle is corrupt: {path} is not valid JSON ({exc}); export the bundle again") from exc
    try:
        body = MANIFEST.read(raw, "manifest")
    except FormatError as exc:
        if exc.key == "format":
            raise BundleError(f"not an mrad bundle: {path} does not declare format '{FORMAT_NAME}'") from exc
        if exc.key == "format_version":
            raise BundleError(f"bundle format version {json.dumps(raw.get('format_version'))[:20]} is not supported "
                              f"by this runtime ({exc.problem}); export the bundle again with a matching mrad-edge, "
                              "or upgrade the runtime") from exc
        raise BundleError(f"bundle is corrupt: {path}: {exc.problem}; export it again") from exc
    try:
        manifest = from_json(Manifest, body, "manifest")
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle is corrupt: {path}: {reason(exc)}; export it again") from exc
    _check(manifest, path)
    if signed is not None:
        unsigned = sorted(name for name, digest in manifest.files.items() if signed.get(name) != digest)
        if unsigned:
            raise BundleError(f"bundle {directory} is not signed by a trusted key, or was changed after signing "
                              f"(the checksums of {unsigned[:3]} are not the signed ones)")
    elif verify:
        verify_files(directory, manifest)
    return manifest


def _no_constants(name: str):
    """JSON's NaN and Infinity are not numbers a manifest may hold (every range check passes NaN)."""
    raise ValueError(f"{name} is not a number a manifest may hold")


def bundle_file(directory: Path, name: str, what: str = "bundle") -> Path:
    """The path of a file a manifest names, checked: inside ``directory`` (symlinks resolved) and a regular file.

    ``what`` names the container in messages ("bundle", "enrollment").

    FIFOs, devices and folders are refused (opening a FIFO would hang the
    runtime); so is any link that leads out of the bundle.
    """
    root = Path(directory).resolve()
    path = Path(directory) / name
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, or a symlink loop
        raise BundleError(f"{what} is corrupt: file {name} named in the manifest is missing or unreadable ({exc}); "
                          f"copy the whole {what} again") from exc
    if resolved != root and root not in resolved.parents:
        raise BundleError(f"{what} is corrupt: file {name} leads outside the {what} directory (a link to {resolved})")
    mode = os.stat(resolved).st_mode
    if not stat.S_ISREG(mode):
        raise BundleError(f"{what} is corrupt: {name} is not a regular file")
    return resolved


def read_array(directory: Path, name: str, what: str = "bundle"):
    """A NumPy array file of a bundle (or an enrollment), checked by :func:`bundle_file` and never unpickled."""
    return BundleFiles(Path(directory), what=what).array(name)


def read_regular(path: Path, limit: int | None = None, what: str = "file") -> bytes:
    """:func:`~mrad.runtime.files.read_small` for a bundle's files: a BundleError naming ``what`` otherwise."""
    return read_small(path, what, limit, BundleError)


@dataclass(frozen=True)
class BundleFiles:
    """The files of a bundle (or of an enrollment version) as its loaders read them.

    With ``digests`` (name -> sha256), each file is read once and its sha256 checked on the very bytes returned,
    which are then what is loaded: a file changed after a signature or checksum check is refused, never used.
    Without, loaders may open files by their path, as :func:`read_manifest` checked them already (or ``verify``
    was off). ``what`` names the container in messages; ``remedy`` says what to do about a corrupt file.
    """

    directory: Path
    digests: Mapping[str, str] | None = None
    what: str = "bundle"
    remedy: str = "copy the bundle again or re-export it"

    @property
    def checked(self) -> bool:
        return self.digests is not None

    def path(self, name: str) -> Path:
        return bundle_file(self.directory, name, self.what)

    def read(self, name: str) -> bytes:
        data = read_regular(self.path(name), what=f"{self.what} is corrupt: file")
        if self.digests is not None:
            expected, actual = self.digests.get(name) or "none", hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise BundleError(f"{self.what} is corrupt: file {name} does not match its sha256 ({actual[:12]}... "
                                  f"where the manifest says {expected[:12]}...); {self.remedy}")
        return data

    def array(self, name: str):
        """A NumPy array file, never unpickled: from the checked bytes when there are digests."""
        import numpy as np

        try:
            array = np.load(io.BytesIO(self.read(name)) if self.checked else self.path(name), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # object arrays (pickles), malformed headers, truncation
            raise BundleError(f"{self.what} is corrupt: {name} is not a plain array file ({exc})") from exc
        if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
            raise BundleError(f"{self.what} is corrupt: {name} is not a plain array file (an archive)")
        return array

    def text(self, name: str) -> str:
        try:
            return self.read(name).decode() if self.checked else self.path(name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"{self.what} is corrupt: {name} is not text ({exc})") from exc


def files_of(directory: "str | Path | BundleFiles") -> BundleFiles:
    """A loader's ``directory`` argument as :class:`BundleFiles` (a plain path: files opened by path)."""
    return directory if isinstance(directory, BundleFiles) else BundleFiles(Path(directory))


def verify_files(directory: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        actual = sha256_of(bundle_file(directory, name))
        if actual != expected:
            raise BundleError(
                f"bundle is corrupt: file {name} sha256 {actual[:12]}... does not match the manifest's "
                f"{expected[:12]}...; copy the bundle again or re-export it"
            )


def _check(manifest: Manifest, path: Path) -> None:
    """Relations between fields that the schema cannot state; each problem is named."""
    unhashed = [n for n in manifest.named_files() if n not in manifest.files]
    if unhashed:
        raise BundleError(f"bundle is corrupt: {path} names {unhashed} without a checksum; export it again")
    problems = []
    side, grid = manifest.preprocess.image_size, manifest.scoring.grid
    if side % grid:
        problems.append(f"preprocess.image_size {side} is not a multiple of scoring.grid {grid}")
    if int(side * side * manifest.scoring.top_fraction) < 1:
        problems.append(f"scoring.top_fraction {manifest.scoring.top_fraction} leaves no map value to average")
    encoder = manifest.graphs["encoder"]
    if len(encoder.inputs) != 1 or list(encoder.inputs[0].shape[1:]) != [3, side, side]:
        problems.append(f"the encoder input must be one (batch, 3, {side}, {side}) tensor")
    outputs = {o.name: o for o in encoder.outputs}
    for tensor in encoder.inputs + encoder.outputs:
        if not all(isinstance(axis, int) for axis in tensor.shape[1:]):
            problems.append(f"encoder tensor {tensor.name} has a named axis past the batch axis ({list(tensor.shape)})")
    problems += _text_problems(manifest, outputs)
    for name in MEMORY_KINDS:
        if manifest.memories[name].kind != name:
            problems.append(f"memory {name} must be of kind {name!r}")
    for name, memory in manifest.memories.items():
        query, feature = outputs.get(memory.query), outputs.get(memory.feature) if memory.feature else None
        if query is None or (memory.feature and feature is None):
            problems.append(f"memory {name} reads encoder outputs the encoder does not declare")
            continue
        if query.shape[-1] != memory.dim:
            problems.append(f"memory {name} has dim {memory.dim} but its queries ({memory.query}) have {query.shape[-1]}")
        if memory.kind == "pixel" and (len(query.shape) != 3 or query.shape[1] != grid * grid):
            problems.append(f"memory {name} queries must be (batch, {grid * grid}, dim) for grid {grid}")
        if feature is not None and memory.key_projection is None and feature.shape[-1] != memory.dim:
            problems.append(f"memory {name} makes entries of {feature.shape[-1]} values from {memory.feature} "
                            f"for keys of {memory.dim}")
    if problems:
        raise BundleError(f"bundle is corrupt: {path}: " + "; ".join(problems))


def _text_problems(manifest: Manifest, outputs: dict[str, TensorSpec]) -> list[str]:
    """MRAD-CLIP's pieces must fit together: the projection output, the text graph's priors and features."""
    text = manifest.scoring.text
    if (text is None) != (manifest.variant != "clip"):
        return [f"variant {manifest.variant!r} and scoring.text do not go together (scoring.text is for clip bundles)"]
    if text is None:
        return []
    projection, graph = outputs.get(text.projection), manifest.graphs.get(text.graph)
    grid = manifest.scoring.grid
    if projection is None or list(projection.shape[1:2]) != [grid * grid] or len(projection.shape) != 3:
        return [f"scoring.text.projection {text.projection!r} must be an encoder output of (batch, {grid * grid}, dim)"]
    if text.graph == "encoder" or graph is None:
        return [f"scoring.text.graph {text.graph!r} must name a graph of its own"]
    dim = projection.shape[-1]
    if (len(graph.inputs), len(graph.outputs)) != (1, 1) or list(graph.inputs[0].shape[1:]) != [2, dim] \
            or list(graph.outputs[0].shape[1:]) != [2, dim]:
        return [f"graph {text.graph} must take (batch, 2, {dim}) region priors and give (batch, 2, {dim}) features"]
    return []


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in format-2 form (read-only: its memories cannot grow). The one place format 1 is read:
    what else differs (keys kept only in the index) follows from the form given here (``keys: None``)."""
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


# The manifest's formats: 1 (the first runtime's) is rewritten into 2's form; 3 added optional keys to 2.
MANIFEST = Format(name=FORMAT_NAME, newest=FORMAT_VERSION, upgrades={1: _upgrade_v1, 2: same},
                  schema="bundle-v2.schema.json", folder="bundle directory")
