"""Open a bundle, predict, read the result, teach it the line's own parts.

    image -> preprocess -> encode (ONNX graph) -> retrieve (zero-shot memories)
          -> align (MRAD-CLIP's text stage, clip bundles only)
          -> compare (the line's own memories, when enrolled) -> fuse
          -> segment -> compare_objects (the per-part memory, when enrolled) -> map_and_score -> Result

:class:`Detector` is assembled from the manifest's parts: a
runner for the encoder graph (:mod:`~mrad.runtime.core.graphs`: ONNX Runtime or OpenVINO), one
:class:`~mrad.runtime.core.memory.Memory` per memory, for clip bundles the
:class:`~mrad.runtime.core.alignment.TextAlignment` around the text graph, a
:class:`~mrad.runtime.core.maps.MapScorer`, and its
:class:`~mrad.runtime.memories.service.LineMemory` (``detector.line_memory``:
the line's own memories, which enrolls, rolls back and publishes the state a
batch reads once). Its stage methods are what ``predict_batch`` chains, and
what benchmarks and tools call one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from .. import defaults
from ..errors import BundleError, MradError
from ..memories.enrollment import (IMAGE_OUTPUT, LABELS, TOKENS_OUTPUT, Comparison, EnrollmentManifest, ObjectMemory,
                                   TargetMemory)
from ..memories.objects import Part, PartVerdict, Scene, crop, crop_transform, part_patches, part_weight
from ..memories.service import Enrolled, LineMemory
from . import signing
from .alignment import TextAlignment
from .bundle import MANIFEST_NAME, BundleFiles, read_manifest
from .graphs import Providers, SessionPool
from .maps import MapScorer
from .memory import NORMAL, Memory, entry_vectors, hnswlib_module, patch_groups
from .preprocess import ImageLike, Prepared, load_mask, load_rgb, to_input
from .result import Result

# Entries of the zero-shot memories named in a result's evidence.
EVIDENCE_ENTRIES = 3

@dataclass(frozen=True)
class Retrieved:
    """What retrieval gives for a batch: the anomalous share per image and per patch."""

    image: np.ndarray  # (batch,) p_img
    patch: np.ndarray  # (batch, G*G) m


@dataclass(frozen=True)
class Entries:
    """Entries one image makes in one memory: vectors before normalisation, and their labels."""

    vectors: np.ndarray  # (n, feature dim)
    labels: list[int]


class Detector:
    """A bundle opened for scoring. One instance may serve several threads at once.

    ``provider``: "auto" (CUDA when present, else CPU), "cpu", "cuda" or
    "tensorrt", or ONNX Runtime's own providers list (names or
    ``(name, options)`` pairs). ``session_options``: an
    ``onnxruntime.SessionOptions`` to open the graphs with. ``retrieval``:
    "exact" (softmax over the whole memory, the spec) or "hnsw" (top-k
    through the index); ``None`` takes the bundle's default. ``enrollment``:
    the folder of the line's own memories (default: the bundle's
    ``enrollment/``); its current version is loaded and checked.
    ``trusted_keys``: public keys (PEM); when given, a bundle not signed by
    one of them is refused, and so is an enrollment version not signed by
    one of them, and every file is loaded from the bytes whose signed sha256
    was checked (see :mod:`~mrad.runtime.core.signing`). ``signer``: a
    :class:`~mrad.runtime.core.signing.Signer` that signs the enrollment
    versions this detector saves (required with ``trusted_keys`` for
    enrolling). ``max_pixels``:
    larger images are refused from their header, before decoding.
    ``sessions``: a :class:`~mrad.runtime.core.graphs.SessionPool` shared
    with other detectors, so that bundles with the same encoder graph (same
    sha256) run it in one inference session.
    """

    def __init__(self, bundle: str | Path, provider: Providers = "auto", retrieval: str | None = None,
                 verify: bool = True, session_options: ort.SessionOptions | None = None,
                 enrollment: str | Path | None = None, trusted_keys: Sequence[str | Path] = (),
                 max_pixels: int = defaults.MAX_IMAGE_PIXELS, sessions: SessionPool | None = None,
                 signer: signing.Signer | None = None):
        self.path = Path(bundle)
        self.max_pixels = max_pixels
        self.trusted_keys = signing.trusted(trusted_keys)
        files, bundle_sha = BundleFiles(self.path), None
        if self.trusted_keys:  # the signature first; then each file is checked on the bytes it is loaded from
            signed = signing.signed_bundle(self.path, self.trusted_keys)
            self.signed_by, bundle_sha = signed.key, signed.digests.get(MANIFEST_NAME)
            self.manifest = read_manifest(self.path, signed=signed.digests)
            files = BundleFiles(self.path, self.manifest.files)
        else:
            self.manifest = read_manifest(self.path, verify=verify)
        self.retrieval = retrieval or self.manifest.scoring.retrieval
        if self.retrieval not in defaults.RETRIEVAL_MODES:
            raise MradError(f"unknown retrieval {self.retrieval!r}; choose one of {', '.join(defaults.RETRIEVAL_MODES)}")
        if self.retrieval == "hnsw":
            hnswlib_module()  # asked for by name: say at once when the extra is missing
        self.encoder = (sessions if sessions is not None else SessionPool()).open(files, "encoder", self.manifest, provider, session_options)
        self.memories = {name: Memory.open(files, spec) for name, spec in self.manifest.memories.items()}
        self.alignment = TextAlignment.open(files, self.manifest, provider, session_options)
        self._input_name = self.manifest.graphs["encoder"].inputs[0].name
        self._query_outputs = sorted({m.query for m in self.memories.values()}
                                     | ({self.alignment.projection} if self.alignment else set()))
        self.maps = MapScorer(self.manifest.preprocess.image_size, self.manifest.scoring)
        # the line's own memories, enrolled without re-export: changed only through this object
        self.line_memory = LineMemory(self, enrollment, verify, self.trusted_keys, signer, bundle_sha)

    # -- the line's own memories: LineMemory owns them; these read its state ---------------------

    @property
    def enrolled(self) -> Enrolled:
        """The line's memories now: read it once and use what it holds (it may be replaced meanwhile)."""
        return self.line_memory.state

    @property
    def enrollment(self) -> EnrollmentManifest | None:
        return self.line_memory.state.manifest

    @property
    def target(self) -> TargetMemory | None:
        return self.line_memory.state.target

    @property
    def objects(self) -> ObjectMemory | None:
        return self.line_memory.state.objects

    @property
    def enrollment_version(self) -> int | None:
        """The enrollment version scoring uses (None: zero-shot, nothing enrolled)."""
        return self.line_memory.enrollment_version

    @property
    def target_memory(self) -> TargetMemory:
        """The live target memory; a bundle whose encoder cannot feed one says so."""
        return self.line_memory.target_memory

    # -- memories ---------------------------------------------------------------------------------

    @property
    def image_memory(self) -> Memory:
        return self.memories["image"]

    @property
    def pixel_memory(self) -> Memory:
        return self.memories["pixel"]

    @property
    def providers(self) -> list[str]:
        """The execution providers the encoder runs on, most preferred first."""
        return self.encoder.providers

    def predict(self, image: ImageLike, evidence: bool = False) -> Result:
        """Score one image: a path, a PIL image, an HxWx3 uint8 RGB array or an image file's bytes."""
        return self.predict_batch([image], evidence=evidence)[0]

    def prepare(self, image: ImageLike) -> Prepared:
        """Decode and preprocess ``image`` now, to score later: a reader thread's half of :meth:`predict_batch`.

        With a per-part memory enrolled the frame itself is kept too (it is segmented).
        """
        rgb = load_rgb(image, self.max_pixels)
        frame = np.asarray(rgb) if self._objects_active() else None
        return Prepared(to_input(rgb, self.manifest.preprocess), (rgb.height, rgb.width), frame)

    def _objects_active(self, target: TargetMemory | None = None, objects: ObjectMemory | None = None) -> bool:
        target = target if target is not None else self.target
        objects = objects if objects is not None else self.objects
        return target is not None and target.active and objects is not None and objects.active

    def predict_batch(self, images: Sequence[ImageLike | Prepared], map_size: tuple[int, int] | None = None,
                      evidence: bool = False, target: TargetMemory | None = None,
                      enrolled: Enrolled | None = None) -> list[Result]:
        """Score several images in one encoder call; results keep the input order.

        ``images`` may also hold what :meth:`prepare` made. ``map_size``
        (height, width) asks for maps at that size instead of each image's
        own; the bundle's (S, S) gives the spec's map itself. ``evidence``:
        each result also names the memory entries that weighed most.
        ``target``: score against this target memory instead of the live one
        (a trial, such as a part scored with its own entries held out).
        ``enrolled``: score with this state of the line's memories (one read of
        ``enrolled``), so that a caller naming the version knows it is the one used.
        """
        prepared = [image if isinstance(image, Prepared) else self.prepare(image) for image in images]
        if not prepared:
            return []
        # once: a rollback on another thread cannot mix two states in one batch
        state = enrolled if enrolled is not None else self.line_memory.state
        target, objects = target if target is not None else state.target, state.objects
        encoded = self.encode(np.stack([p.input for p in prepared]), self.outputs(target))
        retrieved, comparison = self.align(encoded, self.retrieve(encoded)), self.compare(encoded, target)
        fused = self.fuse(retrieved, comparison, target)
        scene = None
        if comparison is not None and self._objects_active(target, objects):
            if any(p.frame is None for p in prepared):
                raise MradError("frames prepared before the per-part memory was enrolled cannot be segmented; "
                                "prepare them again")
            frames = [p.frame for p in prepared]
            scene = self.compare_objects(frames, self.segment(frames, objects), comparison, objects, target)
        results = self.map_and_score(fused, [map_size or p.size for p in prepared], scene)
        if evidence:
            results = [replace(r, evidence=self.evidence(encoded, fused, comparison, i, target))
                       for i, r in enumerate(results)]
        return results

    # -- the stages, in the order predict_batch chains them ------------------------------------

    def preprocess(self, rgb: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> the encoder's (batch, 3, S, S) float32 input (spec section 1)."""
        return np.stack([to_input(image, self.manifest.preprocess) for image in rgb])

    def outputs(self, target: TargetMemory | None = None) -> list[str]:
        """The encoder outputs scoring needs: the zero-shot queries, and the enrolled memories' features."""
        target = target if target is not None else self.target
        if target is not None and target.active:
            return sorted(set(self._query_outputs) | {IMAGE_OUTPUT, TOKENS_OUTPUT})
        return self._query_outputs

    def encode(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the encoder graph; by default it returns the outputs scoring needs (:meth:`outputs`)."""
        return self.encoder.run(outputs or self.outputs(), {self._input_name: batch})

    def retrieve(self, encoded: dict[str, np.ndarray], mode: str | None = None) -> Retrieved:
        """Anomalous share per image (image memory) and per patch (pixel memory)."""
        mode = mode or self.retrieval
        top_k = self.manifest.scoring.top_k
        image, pixel = self.image_memory, self.pixel_memory
        patch_queries = encoded[pixel.query]
        patch = pixel.anomalous_probability(patch_queries.reshape(-1, patch_queries.shape[-1]), mode, top_k)
        return Retrieved(image=image.anomalous_probability(encoded[image.query], mode, top_k),
                         patch=patch.reshape(len(patch_queries), -1))

    def align(self, encoded: dict[str, np.ndarray], retrieved: Retrieved) -> Retrieved:
        """MRAD-CLIP: the patch shares from text alignment, biased by the retrieved ones (others: ``retrieved``)."""
        if self.alignment is None:
            return retrieved
        return Retrieved(image=retrieved.image, patch=self.alignment(retrieved.patch, encoded[self.alignment.projection]))

    def compare(self, encoded: dict[str, np.ndarray], target: TargetMemory | None = None) -> Comparison | None:
        """The line's own memories' verdict on a batch; None when no normal part is enrolled."""
        target = target if target is not None else self.target
        if target is None or not target.active or TOKENS_OUTPUT not in encoded or IMAGE_OUTPUT not in encoded:
            return None
        return target.compare(encoded[IMAGE_OUTPUT], encoded[TOKENS_OUTPUT])

    def fuse(self, retrieved: Retrieved, comparison: Comparison | None, target: TargetMemory | None = None) -> Retrieved:
        """Zero-shot and enrolled shares, weighted as the enrollment says (``retrieved`` itself without one)."""
        if comparison is None:
            return retrieved
        settings = (target if target is not None else self.target).settings
        a, b = settings.map_weight, settings.image_weight
        return Retrieved(image=((1 - b) * retrieved.image + b * comparison.image).astype(np.float32),
                         patch=((1 - a) * retrieved.patch + a * comparison.patch).astype(np.float32))

    def segment(self, frames: Sequence[np.ndarray], objects: ObjectMemory | None = None) -> list[list[Part]]:
        """Each frame's parts (HxWx3 uint8 RGB frames), by the per-part memory's segmenter."""
        segmenter = (objects or self.objects).segmenter()
        # past the cap a frame's count decides it (anomalous), and only one part more than the cap is scored
        return [segmenter.segment(frame)[: defaults.OBJECT_MAX_PARTS + 1] for frame in frames]

    def crop(self, frame: np.ndarray, part: Part, objects: ObjectMemory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        side, s = self.manifest.preprocess.image_size, objects.settings
        transform = crop_transform(part, side, s.margin, s.upright)
        image, mask = crop(frame, part, transform, side, s.fill)
        return image, mask, transform

    def crop_inputs(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([to_input(Image.fromarray(c), self.manifest.preprocess) for c in crops])

    def compare_objects(self, frames: Sequence[np.ndarray], parts: Sequence[Sequence[Part]], comparison: Comparison,
                        objects: ObjectMemory | None = None, target: TargetMemory | None = None) -> Scene:
        """Crop, encode and compare every part of a batch with the per-part memory: what map_and_score fuses."""
        objects = objects or self.objects
        target = target if target is not None else self.target
        geometry = [(i, part, *self.crop(frame, part, objects)) for i, (frame, found) in enumerate(zip(frames, parts))
                    for part in found]
        verdicts: list[list[PartVerdict]] = [[] for _ in frames]
        for start in range(0, len(geometry), defaults.OBJECT_BATCH):
            chunk = geometry[start : start + defaults.OBJECT_BATCH]
            encoded = self.encode(self.crop_inputs([g[2] for g in chunk]), [IMAGE_OUTPUT, TOKENS_OUTPUT])
            found = objects.memory.compare(encoded[IMAGE_OUTPUT], encoded[TOKENS_OUTPUT])
            for k, (i, part, _, mask, transform) in enumerate(chunk):
                weight = part_weight(mask)
                patch = np.where(part_patches(weight, self.manifest.scoring.grid), found.patch[k], 0.0).astype(np.float32)
                verdicts[i].append(PartVerdict(part, transform, weight, patch, float(found.image[k])))
        return Scene(verdicts, [f.shape[:2] for f in frames], comparison.patch, target.settings.map_weight,
                     objects.settings, self.maps, objects.allowed_counts())

    def evidence(self, encoded: dict[str, np.ndarray], fused: Retrieved, comparison: Comparison | None, i: int,
                 target: TargetMemory | None = None) -> dict:
        """What weighed most for image ``i`` of a batch: zero-shot entries, and the nearest enrolled images.

        For the image branch and for the patch with the highest fused share:
        the zero-shot memory entries of largest softmax weight (with the
        source, category and defect recorded at export), and the nearest
        enrolled normal and defect image (at the finest scale for patches).
        """
        grid = self.manifest.scoring.grid
        top = int(np.argmax(fused.patch[i]))
        image, pixel = self.image_memory, self.pixel_memory
        patch_queries = encoded[pixel.query][i]
        found = {
            "patch": [top // grid, top % grid],
            "zero_shot": {"image": _entries(image, image.strongest(encoded[image.query][i], EVIDENCE_ENTRIES)),
                          "patch": _entries(pixel, pixel.strongest(patch_queries[top], EVIDENCE_ENTRIES))},
        }
        if comparison is not None:
            target = target if target is not None else self.target
            finest = f"patch_{target.settings.scales[0]}"
            enrolled = {}
            for level, where in (("image", None), (finest, top)):
                for label in LABELS:
                    if f"{label}/{level}" in comparison.nearest:
                        distances, owners = comparison.nearest[f"{label}/{level}"]
                        d, owner = (distances[i], owners[i]) if where is None else (distances[i, where], owners[i, where])
                        source = target.sources[int(owner)]
                        enrolled.setdefault("image" if where is None else "patch", {})[label] = {
                            "source": source.name, "augment": source.augment, "distance": round(float(d), 6)}
            found["enrolled"] = enrolled
        return found

    def map_and_score(self, retrieved: Retrieved, sizes: Sequence[tuple[int, int]], scene: Scene | None = None
                      ) -> list[Result]:
        """Maps (at each (height, width) of ``sizes``) and image scores (spec section 4).

        ``scene``: the parts of the batch (:meth:`compare_objects`), fused
        into maps and scores as :mod:`~mrad.runtime.memories.objects` states.
        """
        if scene is None:
            scores = self.maps.image_scores(self.maps.input_maps(retrieved.patch), retrieved.image)
        else:
            scores = self.maps.image_scores(scene.input_maps(self.maps.input_maps(retrieved.patch)),
                                            scene.image_probabilities(retrieved.image))
        if not (np.isfinite(scores).all() and np.isfinite(retrieved.patch).all()):
            # images are 8-bit and cannot carry NaN: only the bundle or the enrollment can make one
            raise BundleError(f"{self.path} gave non-finite scores; its memories or constants are damaged: export "
                              "the bundle again (or roll back the last enrollment)")
        if scene is None:
            return [
                Result(score=float(scores[i]), anomaly_map=self.maps.maps_at(retrieved.patch[i], *size)[0],
                       image_probability=float(retrieved.image[i]))
                for i, size in enumerate(sizes)
            ]
        probabilities = scene.image_probabilities(retrieved.image)
        return [
            Result(score=float(scores[i]),
                   anomaly_map=scene.display_map(i, self.maps.maps_at(retrieved.patch[i], *size)[0]),
                   image_probability=float(probabilities[i]), objects=scene.found(i),
                   object_count_ok=scene.count_ok(i))
            for i, size in enumerate(sizes)
        ]

    # -- memory entries -------------------------------------------------------------------------

    def memory_entries(self, image: ImageLike, label: int, mask: str | Path | np.ndarray | None = None
                       ) -> dict[str, Entries]:
        """The entries ``image`` makes in each memory, exactly as the export stage makes them (spec section 3).

        ``label``: 0 normal, 1 anomalous. ``mask``: where the image is
        anomalous (a file or an HxW array); a normal image needs none, and an
        anomalous one without a mask makes image-level entries only.
        """
        fixed = [name for name, memory in self.memories.items() if not memory.can_grow]
        if fixed:
            raise MradError(f"memories {fixed} of {self.path} cannot take new entries (a format-1 bundle keeps no "
                            "feature outputs); export the bundle again with this mrad-edge")
        rgb = load_rgb(image)
        features = self.encode(self.preprocess([rgb]), sorted({m.feature for m in self.memories.values()}))
        side = self.manifest.preprocess.image_size
        if mask is not None:
            groups = patch_groups(load_mask(mask, (side, side)), self.manifest.scoring.grid)
        elif label == NORMAL:
            groups = np.full(self.manifest.scoring.grid ** 2, NORMAL, dtype=np.int8)
        else:
            groups = None
        entries = {}
        for name, memory in self.memories.items():
            vectors, labels = entry_vectors(memory.kind, features[memory.feature][0], label, groups)
            entries[name] = Entries(vectors, labels)
        return entries


def _entries(memory: Memory, strongest: list[tuple[int, float]]) -> list[dict]:
    return [{"weight": round(weight, 6), "label": "anomalous" if memory.labels[row] else "normal",
             **memory.provenance[row]} for row, weight in strongest]
