"""The bundle: a directory with ``manifest.json`` and the files it names.

The manifest is the single place where export and runtime agree: input size,
normalisation, grid, memory layout, scoring constants and a sha256 per file.
The export stage builds a :class:`Manifest` and calls :func:`write_manifest`;
the runtime calls :func:`read_manifest`. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_NAME = "mrad-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RETRIEVAL_MODES = ("exact", "hnsw")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the encoder input (spec section 1)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"


@dataclass(frozen=True)
class Encoder:
    """The ONNX encoder: one image batch in, two query tensors out.

    ``image_output`` is (batch, image_dim) and ``patch_output`` is
    (batch, grid * grid, patch_dim); both are already the retrieval queries
    (normalised, and for MRAD-FT projected by the learned query layers).
    """

    file: str
    input: str
    image_output: str
    patch_output: str
    grid: int
    external_data: str | None = None


@dataclass(frozen=True)
class MemoryLevel:
    """One level of the memory bank: an hnswlib index and a label per entry.

    Labels are 0 (normal) or 1 (anomalous); the spec's one-hot values are
    recovered from them. Keys live only in the index.
    """

    index: str
    labels: str
    space: str
    dim: int
    count: int


@dataclass(frozen=True)
class Retrieval:
    """How retrieval is done by default, and the parameters of the hnsw mode."""

    default: str
    top_k: int
    ef_search: int


@dataclass(frozen=True)
class Scoring:
    """Map and image-score constants of spec section 4."""

    image_weight: float
    sigma: float
    truncate: float
    top_fraction: float


@dataclass(frozen=True)
class Manifest:
    variant: str
    model: dict[str, Any]
    preprocess: Preprocess
    encoder: Encoder
    image_memory: MemoryLevel
    pixel_memory: MemoryLevel
    scoring: Scoring
    retrieval: Retrieval
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def named_files(self) -> list[str]:
        """Files the runtime opens; each must carry a checksum."""
        names = [self.encoder.file, self.image_memory.index, self.image_memory.labels,
                 self.pixel_memory.index, self.pixel_memory.labels]
        return names + ([self.encoder.external_data] if self.encoder.external_data else [])

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``directory`` and write the manifest beside them."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): sha256_of(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    missing = sorted(set(manifest.named_files()) - files.keys())
    if missing:
        raise BundleError(f"cannot write manifest: files {missing} are named but absent from {directory}")
    hashed = Manifest(**{f.name: getattr(manifest, f.name) for f in fields(Manifest) if f.name != "files"}, files=files)
    (directory / MANIFEST_NAME).write_text(json.dumps(hashed.to_dict(), indent=2) + "\n")
    return hashed


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest; with ``verify``, check every file's sha256."""
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
    if version != FORMAT_VERSION:
        raise BundleError(
            f"bundle format version {version!r} is not supported by this runtime (it reads version "
            f"{FORMAT_VERSION}); export the bundle again with a matching mrad-edge, or upgrade the runtime"
        )
    manifest = _parse(raw, path)
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


def _parse(raw: dict[str, Any], path: Path) -> Manifest:
    sections = {
        "preprocess": Preprocess,
        "encoder": Encoder,
        "image_memory": MemoryLevel,
        "pixel_memory": MemoryLevel,
        "scoring": Scoring,
        "retrieval": Retrieval,
    }
    try:
        parsed = {name: _section(cls, raw[name]) for name, cls in sections.items()}
        manifest = Manifest(
            variant=raw["variant"],
            model=dict(raw["model"]),
            provenance=dict(raw.get("provenance", {})),
            files=dict(raw["files"]),
            **parsed,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle is corrupt: {path} lacks or mangles a required entry ({exc!r}); export it again") from exc
    unhashed = [n for n in manifest.named_files() if n not in manifest.files]
    if unhashed:
        raise BundleError(f"bundle is corrupt: {path} names {unhashed} without a checksum; export it again")
    if manifest.retrieval.default not in RETRIEVAL_MODES:
        raise BundleError(f"bundle is corrupt: unknown default retrieval {manifest.retrieval.default!r}")
    return manifest


def _section(cls, values: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in {cls.__name__.lower()}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)
