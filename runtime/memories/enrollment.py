"""The line's own memories: few-shot normal parts and labelled defects, enrolled without re-export.

Two methods shape this module. The multi-scale memory comparison (VAND 2023,
few-shot track) keeps the patch tokens of a product's normal shots pooled at
several scales and scores each test patch by its distance to the nearest
normal patch of the same scale. DMAD keeps a second memory of defect features
beside the normal one, so that a defect of a kind already seen stands out.

The target memory has one level per scale (``patch_1``, ``patch_3``,
``patch_5`` by default) and an ``image`` level, each for the two labels
``normal`` and ``defect``. Every entry is a unit vector. With ``sim`` the
largest inner product of a query with the entries of one label and level:

    d = (1 - sim) / 2                                            distance in [0, 1]
    t = d_normal                                                 no defect enrolled at that level
    t = d_normal * (1 + tanh(max(0, d_normal - d_defect) / T))   with defects (dual memory)

The dual factor is 1 wherever the nearest normal entry is at least as near
as the nearest defect (a normal region that resembles no defect is not
raised, and a defect of a new kind is not lowered either), and rises towards
2 as a query comes nearer to a known defect than to anything normal. A
patch's target value is the mean of ``t`` over the scales; the image's is
``t`` at the ``image`` level.

Fusion with the zero-shot MRAD output happens on the patch probabilities
(before the linear map pipeline of spec section 4) and on ``p_img``:

    m     = (1 - a) * m_zero_shot + a * t_patch          a = settings.map_weight
    p_img = (1 - b) * p_zero_shot + b * t_image          b = settings.image_weight

The map and image score then follow spec section 4 unchanged. With no normal
part enrolled the target memory gives nothing and results are the zero-shot
ones, bit for bit.

Scenes of many parts add an individual memory (:class:`ObjectMemory`): each
normal image is segmented into parts, each part cropped and encoded, and its
features kept in a second target memory of the same settings; its segmenter
settings, background model and part counts are kept in the manifest beside
it. :mod:`~mrad.runtime.memories.objects` states how it is scored and fused. Defect
images join the global memory only.

Persistence: each enrollment is a version directory under the bundle's
``enrollment/`` folder (immutable once written), with its own manifest
(``enrollment.json``: format version, counts, sources, settings, a sha256 per
file). ``HEAD`` names the current version and keeps the sha256 of each kept
version's ``enrollment.json`` as it was written, so that its settings and
sources are covered by a hash as its arrays are; it is replaced atomically
after the version directory is complete, so a crash at any point leaves the
previous enrollment in place. Rollback moves ``HEAD`` to the parent version;
clear writes an empty version. A version is a folder of its own: a link in
its place is refused.

Signed enrollments: saved with a :class:`~mrad.runtime.core.signing.Signer`,
a version also holds ``enrollment.sig`` (model-signing's format, over every
file of the version). Where trusted keys are required, a version without
one of their signatures is refused, and every file is loaded from the bytes
whose signed sha256 was checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
from PIL import Image

from .. import defaults
from ..core import signing
from ..core.bundle import MANIFEST_NAME, BundleFiles, HnswParams, bundle_file, from_json, reason
from ..errors import BundleError, MradError
from ..files import save_array, sha256_of, sync_directory, write_atomic
from ..formats.document import Format, FormatError
from ..core.memory import ANOMALOUS, normalize, patch_groups
from ..core.search import Nearest, greedy_coreset, novel_swaps, pool_patches
from .objects import Background, ObjectSettings, Segmenter, count_range, open_segmenter
from ..core.preprocess import ImageLike, load_mask, load_rgb
from ..line.records import now

MaskLike = Union[str, os.PathLike, np.ndarray, None]

FORMAT_NAME = "mrad-enrollment"
FORMAT_VERSION = 1
# Its fields are checked by from_json (types) and EnrollmentSettings.problems (ranges); no older version exists.
ENROLLMENT = Format(name=FORMAT_NAME, newest=FORMAT_VERSION)
LABELS = ("normal", "defect")
FOLDER = "enrollment"
HEAD_NAME = "HEAD"
VERSION_MANIFEST = "enrollment.json"
SIGNATURE_NAME = "enrollment.sig"  # a signed version's signature, in its folder
CORRUPT_REMEDY = "roll back (mrad-enroll --rollback) or --clear"
# What to do when the current version cannot be loaded at all (the commands load it before acting).
START_OVER = "enroll into a new --enrollment folder, or move {head} aside to start from nothing"
# Transformed copies of a shot, applied alike to the image and (as a square array) to its mask.
_TRANSPOSES = {"hflip": Image.Transpose.FLIP_LEFT_RIGHT, "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
               "rot90": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180,
               "rot270": Image.Transpose.ROTATE_270}
_MASK_TRANSFORMS = {"hflip": lambda m: m[:, ::-1], "vflip": lambda m: m[::-1], "rot90": lambda m: np.rot90(m, 1),
                    "rot180": lambda m: np.rot90(m, 2), "rot270": lambda m: np.rot90(m, 3)}
AUGMENTATIONS = tuple(_TRANSPOSES)
# Encoder outputs the target memory is made from and queried with.
IMAGE_OUTPUT, TOKENS_OUTPUT = "image_feature", "patch_tokens"


@dataclass(frozen=True)
class EnrollmentSettings:
    """How the target memory is built, searched and fused; recorded in every version's manifest."""

    scales: tuple[int, ...] = defaults.ENROLL_SCALES
    map_weight: float = defaults.ENROLL_MAP_WEIGHT
    image_weight: float = defaults.ENROLL_IMAGE_WEIGHT
    dual_temperature: float = defaults.DUAL_TEMPERATURE
    cap: int = defaults.ENROLL_CAP
    exact_below: int = defaults.ENROLL_EXACT_BELOW
    augment: tuple[str, ...] = ()
    hnsw: HnswParams = HnswParams(ef_construction=defaults.ENROLL_HNSW_EF_CONSTRUCTION,
                                  ef_search=defaults.ENROLL_HNSW_EF_SEARCH)

    def problems(self) -> list[str]:
        found = []
        if not self.scales or any(k < 1 or k % 2 == 0 for k in self.scales) or len(set(self.scales)) != len(self.scales):
            found.append(f"scales must be distinct odd sizes of 1 or more, got {list(self.scales)}")
        for name in ("map_weight", "image_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                found.append(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not self.dual_temperature > 0:
            found.append(f"dual_temperature must be positive, got {self.dual_temperature}")
        if self.cap < 1 or self.exact_below < 1:
            found.append("cap and exact_below must be positive")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            found.append(f"unknown augmentations {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        if self.hnsw.M < 2 or self.hnsw.ef_construction < 1 or self.hnsw.ef_search < 1:
            found.append("hnsw parameters out of range")
        return found

    def checked(self) -> "EnrollmentSettings":
        problems = self.problems()
        if problems:
            raise MradError("enrollment settings: " + "; ".join(problems))
        return self

    @property
    def levels(self) -> tuple[str, ...]:
        return ("image",) + tuple(f"patch_{k}" for k in self.scales)


@dataclass(frozen=True)
class Source:
    """One enrolled image (each augmented copy is its own source)."""

    name: str
    label: str
    mask: str | None = None
    augment: str = ""


@dataclass(frozen=True)
class Comparison:
    """The target memory's verdict material for a batch.

    ``image`` (batch,) and ``patch`` (batch, G*G) are the target values ``t``;
    ``nearest`` maps "label/level" to the distance and source number of the
    nearest entry, per image (image level) or per patch (patch levels).
    """

    image: np.ndarray
    patch: np.ndarray
    nearest: dict[str, tuple[np.ndarray, np.ndarray]]


def prepared_shots(image: ImageLike, label: str, mask: MaskLike, name: str, augment: Sequence[str], side: int,
                   grid: int, max_pixels: int = defaults.MAX_IMAGE_PIXELS
                   ) -> list[tuple[Image.Image, Source, np.ndarray | None]]:
    """One image to enroll -> (RGB image, source record, patch grouping) for it and each augmented copy.

    The grouping (:func:`~mrad.runtime.core.memory.patch_groups` of the mask at
    the input size) is ``None`` for normal images and for defects without a mask.
    """
    rgb = load_rgb(image, max_pixels)
    square = load_mask(mask, (side, side), rgb.size[::-1]) if mask is not None and label == "defect" else None
    mask_name = None if mask is None else ("array" if isinstance(mask, np.ndarray) else str(mask))
    shots = []
    for how in ("",) + tuple(augment):
        moved = rgb.transpose(_TRANSPOSES[how]) if how else rgb
        groups = None
        if square is not None:
            groups = patch_groups(np.ascontiguousarray(_MASK_TRANSFORMS[how](square) if how else square), grid)
        shots.append((moved, Source(name=name, label=label, mask=mask_name, augment=how), groups))
    return shots


def distance(similarity: np.ndarray) -> np.ndarray:
    return np.clip((1.0 - similarity) / 2.0, 0.0, 1.0).astype(np.float32)


def dual(normal: np.ndarray, defect: np.ndarray | None, temperature: float) -> np.ndarray:
    """Target value from the distances to the nearest normal and the nearest defect entry (module docstring)."""
    if defect is None:
        return normal
    return (normal * (1.0 + np.tanh(np.maximum(normal - defect, 0.0) / temperature))).astype(np.float32)


class TargetMemory:
    """The normal and defect memories of one line, at every level; safe to score while another thread enrolls.

    ``grid`` is the patch grid side; ``image_dim`` and ``token_dim`` the sizes
    of the encoder's image feature and patch tokens.
    """

    def __init__(self, settings: EnrollmentSettings, grid: int, image_dim: int, token_dim: int):
        self.settings, self.grid = settings.checked(), grid
        self.image_dim, self.token_dim = image_dim, token_dim
        self.sources: list[Source] = []
        self._levels = {
            f"{label}/{level}": Nearest(image_dim if level == "image" else token_dim, settings.exact_below, settings.hnsw)
            for label in LABELS for level in settings.levels
        }
        self._owners = {name: np.zeros(0, np.int32) for name in self._levels}
        # Per full level, each entry's distance to its nearest neighbour in the level (for swaps).
        self._radius: dict[str, np.ndarray | None] = {}
        # Scoring and swapping entries in hold _lock: a query sees all of a batch or none of it.
        # Writers also hold _writing for their whole work, so one enrollment runs at a time.
        self._lock = threading.Lock()
        self._writing = threading.RLock()

    @property
    def counts(self) -> dict[str, int]:
        """Entries per "label/level"."""
        return {name: len(level) for name, level in self._levels.items()}

    @property
    def active(self) -> bool:
        """Whether scoring uses the target memory: it needs normal parts."""
        return len(self._levels["normal/image"]) > 0

    def level_keys(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Keys and source numbers of one "label/level"."""
        return self._levels[name].keys, self._owners[name]

    # -- enrolling ------------------------------------------------------------------------------

    def add(self, image_features: np.ndarray, tokens: np.ndarray, sources: Sequence[Source],
            groups: Sequence[np.ndarray | None], compact: bool = True,
            patches: Sequence[np.ndarray | None] | None = None) -> None:
        """Enroll a batch: ``image_features`` (n, D), ``tokens`` (n, G*G, W), one source and one patch grouping each.

        A normal image adds its image feature and every patch at every scale.
        A defect image adds its image feature to the defect memory, and the
        patches inside its mask (``groups`` from
        :func:`~mrad.runtime.core.memory.patch_groups`; ``None`` without a mask) to
        the defect patch memory. ``compact``: cut levels over the cap at once
        (pass False for all batches of one enrollment but the last, or call
        :meth:`compact` after them; a level past twice the cap is cut anyway).
        ``patches``: per normal source, the patches that join (boolean, G*G;
        None: all of them), so that a part's crop leaves its filled-in
        surroundings out.
        """
        if not len(sources):
            return
        if image_features.shape != (len(sources), self.image_dim) or tokens.shape[1:] != (self.grid ** 2, self.token_dim):
            raise MradError(f"enrollment features of shape {image_features.shape} and {tokens.shape} do not fit a memory "
                            f"of image dim {self.image_dim}, {self.grid ** 2} patches of dim {self.token_dim}")
        for source in sources:
            if source.label not in LABELS:
                raise MradError(f"label must be one of {', '.join(LABELS)}, got {source.label!r}")
        additions: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in self._levels}
        pooled = {k: normalize(pool_patches(tokens, self.grid, k)) for k in self.settings.scales}
        image_keys = normalize(image_features)
        with self._writing:
            first = len(self.sources)
            for i, (source, grouping) in enumerate(zip(sources, groups)):
                owner = first + i
                additions[f"{source.label}/image"].append((image_keys[i : i + 1], np.array([owner], np.int32)))
                if source.label == "normal" and patches is not None and patches[i] is not None:
                    chosen = np.flatnonzero(patches[i])
                elif source.label == "normal":
                    chosen = np.arange(self.grid ** 2)
                elif grouping is not None:
                    chosen = np.flatnonzero(grouping == ANOMALOUS)
                else:
                    chosen = np.zeros(0, np.int64)
                for k in self.settings.scales:
                    additions[f"{source.label}/patch_{k}"].append(
                        (pooled[k][i, chosen], np.full(len(chosen), owner, np.int32)))
            merged = {name: (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
                      for name, parts in additions.items() if parts}
            swaps = {name: self._swaps(name, keys) for name, (keys, _) in merged.items()
                     if len(self._levels[name]) >= self.settings.cap}
            with self._lock:
                self.sources.extend(sources)
                for name, (keys, owners) in merged.items():
                    if name in swaps:
                        rows, chosen = swaps[name]
                        self._levels[name].replace_rows(rows, keys[chosen])
                        self._owners[name] = self._owners[name].copy()
                        self._owners[name][rows] = owners[chosen]
                    else:
                        self._levels[name].add(keys)
                        self._owners[name] = np.concatenate([self._owners[name], owners])
            if compact or any(len(level) > 2 * self.settings.cap for level in self._levels.values()):
                self.compact()  # a long enrollment is cut as it goes, so memory stays within twice the cap

    def _swaps(self, name: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a full level: which kept rows the new ``keys`` replace, and which of them (see ``novel_swaps``)."""
        level = self._levels[name]
        if self._radius.get(name) is None:
            self._radius[name] = level.radii()
        similarity, _ = level.nearest(keys)
        rows, chosen, radii = novel_swaps(self._radius[name], keys, 1.0 - similarity)
        self._radius[name] = self._radius[name].copy()
        self._radius[name][rows] = radii
        return rows, chosen

    def compact(self) -> None:
        """Cut every level over the cap to a greedy coreset of itself.

        This happens once per level, when an enrollment first takes it past
        the cap; from then on new entries are swapped in (:func:`novel_swaps`).
        The selection runs outside the scoring lock (it takes seconds at
        ViT-L sizes), so the line keeps scoring with the uncut memory until the
        cut one is swapped in.
        """
        with self._writing:
            kept = {}
            for name, level in self._levels.items():
                if len(level) > self.settings.cap:
                    kept[name] = greedy_coreset(level.keys, self.settings.cap)
            with self._lock:
                for name, rows in kept.items():
                    self._levels[name].replace(self._levels[name].keys[rows])
                    self._owners[name] = self._owners[name][rows]
                    self._radius[name] = None

    # -- scoring --------------------------------------------------------------------------------

    def compare(self, image_features: np.ndarray, tokens: np.ndarray) -> Comparison:
        """Target values of a batch (see the module docstring for the formula)."""
        batch, patches = len(image_features), self.grid ** 2
        pooled = {k: normalize(pool_patches(tokens, self.grid, k)).reshape(batch * patches, -1)
                  for k in self.settings.scales}
        image_queries = normalize(image_features)
        nearest: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        temperature = self.settings.dual_temperature
        with self._lock:
            if not self.active:
                raise MradError("nothing normal is enrolled: the target memory cannot score")

            def search(name: str, queries: np.ndarray) -> np.ndarray | None:
                level = self._levels[name]
                if not len(level):
                    return None
                similarity, rows = level.nearest(queries)
                nearest[name] = (distance(similarity), self._owners[name][rows])
                return nearest[name][0]

            image = dual(search("normal/image", image_queries), search("defect/image", image_queries), temperature)
            patch = np.zeros(batch * patches, np.float32)
            for k, queries in pooled.items():
                patch += dual(search(f"normal/patch_{k}", queries), search(f"defect/patch_{k}", queries), temperature)
        patch /= len(pooled)
        nearest = {name: (d.reshape(batch, -1).squeeze(-1) if name.endswith("image") else d.reshape(batch, patches),
                          o.reshape(batch, -1).squeeze(-1) if name.endswith("image") else o.reshape(batch, patches))
                   for name, (d, o) in nearest.items()}
        return Comparison(image=image, patch=patch.reshape(batch, patches), nearest=nearest)

    def with_settings(self, settings: EnrollmentSettings) -> "TargetMemory":
        """The same entries under new settings: any settings while empty, else only fusion weights and temperature."""
        kept = ("scales", "cap", "exact_below", "hnsw", "augment")
        if self.sources and any(getattr(settings, k) != getattr(self.settings, k) for k in kept):
            raise MradError("only the fusion weights and the dual temperature can change on an existing enrollment; "
                            "--clear it to change scales, cap, augmentation or search settings")
        return TargetMemory.restored(settings, self.grid, self.image_dim, self.token_dim, *self.snapshot())

    def snapshot(self) -> tuple[tuple[Source, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The sources and, per "label/level", keys and source numbers: a consistent copy, taken between writers."""
        with self._writing:
            return tuple(self.sources), {name: (level.keys, self._owners[name]) for name, level in self._levels.items()}

    @classmethod
    def restored(cls, settings: EnrollmentSettings, grid: int, image_dim: int, token_dim: int,
                 sources: Sequence[Source], levels: dict[str, tuple[np.ndarray, np.ndarray]]) -> "TargetMemory":
        """A target memory holding given entries (from :meth:`snapshot`, or read from disk)."""
        memory = cls(settings, grid, image_dim, token_dim)
        unknown = sorted(set(levels) - set(memory._levels))
        if unknown:
            raise MradError(f"unknown memory levels {unknown} for scales {list(settings.scales)}")
        memory.sources = list(sources)
        for name, (keys, owners) in levels.items():
            if len(keys) != len(owners) or (len(owners) and (owners.min() < 0 or owners.max() >= len(sources))):
                raise MradError(f"level {name}: {len(keys)} keys with {len(owners)} source numbers in 0..{len(sources) - 1}")
            if len(keys):
                memory._levels[name].add(keys)
                memory._owners[name] = np.asarray(owners, np.int32)
        return memory


class ObjectMemory:
    """The per-part memory of an enrollment: how parts are found, the parts' target memory, the counts enrolled.

    ``counts``: the parts found in each enrolled normal image (augmented
    copies left out).
    """

    def __init__(self, settings: ObjectSettings, background: Background | None, memory: TargetMemory,
                 counts: Sequence[int] = ()):
        self.settings, self.background, self.memory = settings.checked(), background, memory
        self.counts = list(counts)
        self._segmenter: Segmenter | None = None

    @property
    def active(self) -> bool:
        return self.memory.active

    def segmenter(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = open_segmenter(self.settings, self.background)
        return self._segmenter

    def allowed_counts(self) -> tuple[int, int]:
        """Part counts a normal frame may show (any, while nothing is enrolled)."""
        if not self.counts:
            return 0, 2 ** 31
        return count_range(self.counts, self.settings.count_tolerance)

    def with_settings(self, settings: EnrollmentSettings, objects: ObjectSettings | None = None) -> "ObjectMemory":
        """The same parts under new enrollment settings, and new object settings (only fusion and tolerance)."""
        objects = objects or self.settings
        kept = ("segmenter", "model", "model_sha256", "threshold", "min_contrast", "min_area", "max_area",
                "morphology", "margin", "upright", "fill", "points_per_side", "predicted_iou", "nms_iou")
        if self.memory.sources and any(getattr(objects, k) != getattr(self.settings, k) for k in kept):
            raise MradError("only the object fusion weights and count tolerance can change once parts are enrolled; "
                            "--clear to segment or crop differently")
        return ObjectMemory(objects, self.background, self.memory.with_settings(settings), self.counts)


# -- persistence ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelFiles:
    count: int
    keys: str  # .npy (count, dim) float32, unit rows
    owners: str  # .npy (count,) int32: the source each entry comes from


@dataclass(frozen=True)
class ObjectsRecord:
    """The per-part memory of a version: segmenter and fusion settings, background model, counts, entries."""

    settings: ObjectSettings
    background: Background | None
    counts: tuple[int, ...]
    sources: tuple[Source, ...]
    levels: dict[str, LevelFiles]


@dataclass(frozen=True)
class EnrollmentManifest:
    """What one enrollment version holds; written as ``enrollment.json`` in its directory."""

    version: int
    parent: int | None
    created: str
    action: str  # "enroll", "clear" or "settings"
    bundle: str  # sha256 of the bundle's manifest.json: an enrollment belongs to one bundle
    grid: int
    image_dim: int
    token_dim: int
    settings: EnrollmentSettings
    sources: tuple[Source, ...]
    levels: dict[str, LevelFiles]
    files: dict[str, str] = field(default_factory=dict)
    objects: ObjectsRecord | None = None

    def counts(self) -> dict[str, int]:
        images = {label: sum(1 for s in self.sources if s.label == label and not s.augment) for label in LABELS}
        counts = {**{f"{label}_images": n for label, n in images.items()},
                  **{name: level.count for name, level in self.levels.items()}}
        if self.objects is not None:
            counts.update(object_images=len(self.objects.counts), objects=sum(self.objects.counts),
                          **{f"objects:{name}": level.count for name, level in self.objects.levels.items()})
        return counts

    def to_dict(self) -> dict:
        written = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}
        if self.objects is None:  # an enrollment without parts stays readable by runtimes that predate them
            del written["objects"]
        return written


class EnrollmentStore:
    """The versions of a bundle's enrollment on disk: load, commit, list, roll back, clear.

    ``folder`` defaults to the bundle's ``enrollment/``; pass another one when
    the bundle directory is read-only.
    """

    def __init__(self, bundle: Path, folder: Path | None = None, bundle_sha: str | None = None,
                 trusted_keys: Sequence[str | Path] = ()):
        """``bundle_sha``: the sha256 of the bundle's manifest as loaded (default: read from the bundle);
        ``trusted_keys``: where given, a version is loaded only with one of their signatures."""
        self.bundle = Path(bundle)
        self.root = Path(folder) if folder else self.bundle / FOLDER
        self._bundle_sha = bundle_sha
        self.trusted_keys = tuple(trusted_keys)

    @property
    def bundle_sha(self) -> str:
        if self._bundle_sha is None:
            self._bundle_sha = sha256_of(self.bundle / MANIFEST_NAME)
        return self._bundle_sha

    def head(self) -> int | None:
        """The current version number, or None when nothing was ever enrolled."""
        return self._head()[0]

    def _head(self) -> tuple[int | None, dict[int, str]]:
        """The current version, and the sha256 of each kept version's manifest (none in a HEAD of before)."""
        path = self.root / HEAD_NAME
        if not path.exists() and not path.is_symlink():
            return None, {}
        try:
            raw = json.loads(bundle_file(self.root, HEAD_NAME, "enrollment").read_text())
            version, digests = raw["version"], {int(k): v for k, v in raw.get("sha256", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"enrollment is corrupt: {path} cannot be read ({exc}); "
                              "run mrad-enroll --clear to start over") from exc
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise BundleError(f"enrollment is corrupt: {path} names version {version!r}")
        if not all(isinstance(d, str) for d in digests.values()):
            raise BundleError(f"enrollment is corrupt: {path} holds sha256 values that are not text")
        return version, digests

    def versions(self) -> list[EnrollmentManifest]:
        """Every complete version on disk, oldest first (unreadable ones are skipped)."""
        found = []
        for directory in sorted(self.root.glob("v[0-9]*")) if self.root.is_dir() else []:
            with contextlib.suppress(BundleError, ValueError):
                found.append(self.read(int(directory.name[1:]), verify=False))
        return found

    def read(self, version: int, verify: bool = True) -> EnrollmentManifest:
        """Version ``version``'s manifest; with ``verify``, its files' sha256 too (and, where trusted keys are
        required, its signature, always)."""
        manifest = self._read(version, verify)[0]
        if verify:
            files = BundleFiles(self._version_folder(version), manifest.files, "enrollment", CORRUPT_REMEDY)
            for name in manifest.files:
                files.read(name)
        return manifest

    def _read(self, version: int, verify: bool) -> tuple[EnrollmentManifest, signing.Signed | None, bytes]:
        """A version's manifest, checked, with its signature (where keys are required) and its bytes as read."""
        directory = self._version_folder(version)
        path = directory / VERSION_MANIFEST
        signed = self._signed(version, directory) if self.trusted_keys else None
        try:
            data = BundleFiles(directory, what="enrollment").read(VERSION_MANIFEST)  # its digest: compared below
            raw = json.loads(data.decode())
        except (BundleError, ValueError) as exc:
            raise BundleError(f"enrollment is corrupt: version {version} has no readable {VERSION_MANIFEST} ({exc})") from exc
        if signed is not None and hashlib.sha256(data).hexdigest() != signed.digests.get(VERSION_MANIFEST):
            raise BundleError(f"enrollment version {version} in {self.root} is not signed by a trusted key, or was "
                              f"changed after signing ({VERSION_MANIFEST} is not the signed one); "
                              + START_OVER.format(head=self.root / HEAD_NAME))
        try:
            body = ENROLLMENT.read(raw, "enrollment")
        except FormatError as exc:
            raise BundleError(f"enrollment is corrupt: {path}: {exc.problem}") from exc
        try:
            manifest = from_json(EnrollmentManifest, body, "enrollment")
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"enrollment is corrupt: {path}: {reason(exc)}") from exc
        problems = manifest.settings.problems()
        if manifest.version != version:
            problems.append(f"it says it is version {manifest.version}")
        outside = [name for name in manifest.files if not _plain_name(name)]
        if outside:
            problems.append(f"it names files {outside[:3]} outside its own directory")
        named = dict(manifest.levels)
        if manifest.objects is not None:
            problems += manifest.objects.settings.problems()
            named.update({f"objects:{name}": level for name, level in manifest.objects.levels.items()})
        for name, level in named.items():
            for file in (level.keys, level.owners):
                if file not in manifest.files or not _plain_name(file):
                    problems.append(f"level {name} names file {file!r} that is not one of its own hashed files")
        if problems:
            raise BundleError(f"enrollment is corrupt: {path}: " + "; ".join(problems))
        if signed is not None:
            unsigned = sorted(name for name, digest in manifest.files.items() if signed.digests.get(name) != digest)
            if unsigned:
                raise BundleError(f"enrollment version {version} in {self.root} is not signed by a trusted key, or was "
                                  f"changed after signing (the checksums of {unsigned[:3]} are not the signed ones); "
                                  + START_OVER.format(head=self.root / HEAD_NAME))
        return manifest, signed, data

    def _signed(self, version: int, directory: Path) -> signing.Signed:
        try:
            return signing.signed_folder(directory / SIGNATURE_NAME, self.trusted_keys,
                                         f"enrollment version {version} in {self.root}")
        except BundleError as exc:
            raise BundleError(f"{exc}; enroll with a signing key (mrad-enroll --sign-key KEY.pem): "
                              + START_OVER.format(head=self.root / HEAD_NAME)) from exc

    def _check_written(self, version: int, data: bytes, digests: dict[int, str]) -> None:
        """A version's manifest must be the one written: HEAD keeps its sha256 (a HEAD of before keeps none)."""
        if version in digests and hashlib.sha256(data).hexdigest() != digests[version]:
            raise BundleError(f"enrollment is corrupt: {VERSION_MANIFEST} of version {version} was changed after it "
                              f"was written (its sha256 is not the one {HEAD_NAME} keeps): its settings or sources "
                              f"are not the enrolled ones; {CORRUPT_REMEDY}")

    def load(self, grid: int, image_dim: int, token_dim: int, verify: bool = True
             ) -> tuple[EnrollmentManifest | None, TargetMemory, ObjectMemory | None]:
        """The current version, its target memory (an empty one, default settings, when nothing is enrolled)
        and its per-part memory (None without one)."""
        version, digests = self._head()
        if version is None:
            return None, TargetMemory(EnrollmentSettings(), grid, image_dim, token_dim), None
        manifest, signed, data = self._read(version, verify)
        if manifest.bundle != self.bundle_sha:
            raise BundleError(f"enrollment version {version} in {self.root} was made with another bundle (its manifest "
                              "differs); run mrad-enroll --clear, then enroll again")
        if (manifest.grid, manifest.image_dim, manifest.token_dim) != (grid, image_dim, token_dim):
            raise BundleError(f"enrollment version {version} does not fit this bundle's encoder")
        checked = verify or signed is not None
        if checked:
            self._check_written(version, data, digests)
        # each array read once, its sha256 checked on the bytes it is loaded from
        arrays = BundleFiles(self._version_folder(version), manifest.files if checked else None,
                             f"enrollment version {version}", CORRUPT_REMEDY)

        def restored(sources: Sequence[Source], files: dict[str, LevelFiles]) -> TargetMemory:
            levels = {}
            for name, level in files.items():
                dim = image_dim if name.endswith("/image") else token_dim
                levels[name] = (_load(arrays, level.keys, np.float32, (level.count, dim)),
                                _load(arrays, level.owners, np.int32, (level.count,)))
            try:
                return TargetMemory.restored(manifest.settings, grid, image_dim, token_dim, sources, levels)
            except MradError as exc:
                raise BundleError(f"enrollment is corrupt: version {version}: {exc}") from exc

        memory = restored(manifest.sources, manifest.levels)
        objects = None
        if manifest.objects is not None:
            record = manifest.objects
            objects = ObjectMemory(record.settings, record.background, restored(record.sources, record.levels),
                                   record.counts)
        return manifest, memory, objects

    def commit(self, memory: TargetMemory, action: str, objects: ObjectMemory | None = None,
               signer: signing.Signer | None = None) -> EnrollmentManifest:
        """Write ``memory`` (and the per-part memory ``objects``) as a new version and make it current; ``signer``
        signs it (its folder's files, as written, before the folder is put in place). A disk that is full or
        read-only is one MradError; the version before stays current."""
        try:
            return self._commit(memory, action, objects, signer)
        except OSError as exc:
            raise MradError(f"the enrollment in {self.root} cannot be written ({exc.strerror or exc}); the version "
                            "before stays current") from exc

    def _commit(self, memory: TargetMemory, action: str, objects: ObjectMemory | None,
                signer: signing.Signer | None) -> EnrollmentManifest:
        with self._locked():
            parent, digests = self._head()
            # past every folder's number, readable or not: a new version never lands on an old name
            taken = [int(d.name[1:]) for d in self.root.glob("v[0-9]*") if d.name[1:].isdigit()] if self.root.is_dir() else []
            version = max([parent or 0] + taken) + 1
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".v{version}.partial-", dir=self.root))
            try:
                def written(entries: dict[str, tuple[np.ndarray, np.ndarray]], prefix: str) -> dict[str, LevelFiles]:
                    levels = {}
                    for name, (keys, owners) in entries.items():
                        stem = prefix + name.replace("/", "_")
                        levels[name] = LevelFiles(len(keys), f"{stem}_keys.npy", f"{stem}_owners.npy")
                        save_array(staging / levels[name].keys, keys, atomic=False)  # the folder is swapped in whole
                        save_array(staging / levels[name].owners, owners.astype(np.int32), atomic=False)
                    return levels

                sources, entries = memory.snapshot()
                levels = written(entries, "")
                record = None
                if objects is not None:
                    part_sources, part_entries = objects.memory.snapshot()
                    record = ObjectsRecord(settings=objects.settings, background=objects.background,
                                           counts=tuple(objects.counts), sources=part_sources,
                                           levels=written(part_entries, "objects_"))
                manifest = EnrollmentManifest(
                    version=version, parent=parent, created=now(), action=action, bundle=self.bundle_sha,
                    grid=memory.grid, image_dim=memory.image_dim, token_dim=memory.token_dim,
                    settings=memory.settings, sources=sources, levels=levels,
                    files={p.name: sha256_of(p) for p in sorted(staging.iterdir())}, objects=record)
                data = (json.dumps(manifest.to_dict(), indent=1) + "\n").encode()
                (staging / VERSION_MANIFEST).write_bytes(data)
                if signer is not None:  # the staging folder is this process's own (mode 0700) until it is put in place
                    signer.sign(staging, staging / SIGNATURE_NAME, ignored=(SIGNATURE_NAME,))
                for path in staging.iterdir():
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
                staging.chmod(0o755)
                os.replace(staging, self._directory(version))
                sync_directory(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._set_head(version, {**digests, version: hashlib.sha256(data).hexdigest()})
            self._prune()
        return manifest

    def rollback(self) -> int | None:
        """Make the current version's parent current again; returns it (None: nothing enrolled now)."""
        with self._locked():
            version, digests = self._head()
            if version is None:
                raise MradError(f"nothing to roll back: {self.root} holds no enrollment")
            parent = self.read(version, verify=False).parent
            if parent is not None and not (self._directory(parent) / VERSION_MANIFEST).is_file():
                raise MradError(f"cannot roll back: version {parent} is no longer kept (the last "
                                f"{defaults.ENROLL_KEEP_VERSIONS} versions are)")
            if parent is not None and self.trusted_keys:  # a parent that would be refused is not made current
                self._read(parent, verify=True)
            self._set_head(parent, digests)
            return parent

    def _set_head(self, version: int | None, digests: dict[int, str]) -> None:
        """HEAD names ``version`` and keeps the manifest digests of the versions still on disk."""
        kept = {str(n): d for n, d in sorted(digests.items()) if n == version or self._directory(n).is_dir()}
        write_atomic(self.root / HEAD_NAME, (json.dumps({"version": version, "sha256": kept}) + "\n").encode())

    def _prune(self) -> None:
        """Keep the newest versions, the current one and its parent; remove the rest, and leftovers of crashes."""
        head = self.head()
        numbers = sorted(int(d.name[1:]) for d in self.root.glob("v[0-9]*") if d.is_dir())
        keep = set(numbers[-defaults.ENROLL_KEEP_VERSIONS:]) | {head}
        for number in numbers:
            if number not in keep:
                shutil.rmtree(self._directory(number), ignore_errors=True)
        for leftover in self.root.glob(".v*.partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _directory(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def _version_folder(self, version: int) -> Path:
        """A version's folder, to read from: a folder of its own in the enrollment folder, never a link (which
        could lead to a version made elsewhere, or to anything)."""
        directory = self._directory(version)
        if directory.is_symlink() or (directory.exists() and directory.resolve().parent != self.root.resolve()):
            raise BundleError(f"enrollment is corrupt: version folder {directory} is a link (to "
                              f"{os.path.realpath(directory)}), not a folder of its own; "
                              + START_OVER.format(head=self.root / HEAD_NAME))
        return directory

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the enrollment folder across processes (where the OS has flock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: one writer at a time is the user's to keep
            yield
            return
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _plain_name(name: str) -> bool:
    """A file name inside a version's own directory: no folders, no parent, not hidden."""
    return (bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")
            and name not in (VERSION_MANIFEST, SIGNATURE_NAME))


def _load(files: BundleFiles, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    array = files.array(name)
    if array.dtype != dtype or array.shape != shape or (dtype == np.float32 and not np.isfinite(array).all()):
        raise BundleError(f"enrollment is corrupt: {name} holds {array.dtype} {array.shape}, expected {shape}")
    return array
