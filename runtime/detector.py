"""Open a bundle, predict, read the result.

    image -> preprocess -> encode (ONNX graph) -> retrieve (memories) -> map_and_score -> Result

:class:`Detector` is assembled from the manifest's parts: a
:class:`~mrad.runtime.graphs.GraphRunner` for the encoder graph, one
:class:`~mrad.runtime.memory.Memory` per memory, a
:class:`~mrad.runtime.maps.MapScorer`. Its stage methods are what
``predict_batch`` chains, and what benchmarks and tools call one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from . import defaults
from .bundle import read_manifest
from .errors import MradError
from .graphs import GraphRunner, Providers
from .maps import MapScorer
from .memory import NORMAL, Memory, entry_vectors, hnswlib_module, patch_groups
from .preprocess import ImageLike, load_mask, load_rgb, to_input
from .result import Result


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
    through the index); ``None`` takes the bundle's default.
    """

    def __init__(self, bundle: str | Path, provider: Providers = "auto", retrieval: str | None = None,
                 verify: bool = True, session_options: ort.SessionOptions | None = None):
        self.path = Path(bundle)
        self.manifest = read_manifest(self.path, verify=verify)
        self.retrieval = retrieval or self.manifest.scoring.retrieval
        if self.retrieval not in defaults.RETRIEVAL_MODES:
            raise MradError(f"unknown retrieval {self.retrieval!r}; choose one of {', '.join(defaults.RETRIEVAL_MODES)}")
        if self.retrieval == "hnsw":
            hnswlib_module()  # asked for by name: say at once when the extra is missing
        self.encoder = GraphRunner(self.path, "encoder", self.manifest.graphs["encoder"], provider, session_options)
        self.memories = {name: Memory.open(self.path, spec) for name, spec in self.manifest.memories.items()}
        self._input_name = self.manifest.graphs["encoder"].inputs[0].name
        self._query_outputs = sorted({m.query for m in self.memories.values()})
        self.maps = MapScorer(self.manifest.preprocess.image_size, self.manifest.scoring)

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

    def predict(self, image: ImageLike) -> Result:
        """Score one image: a path, a PIL image or an HxWx3 uint8 RGB array."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageLike], map_size: tuple[int, int] | None = None) -> list[Result]:
        """Score several images in one encoder call; results keep the input order.

        ``map_size`` (height, width) asks for maps at that size instead of each
        image's own; the bundle's (S, S) gives the spec's map itself.
        """
        rgb = [load_rgb(image) for image in images]
        if not rgb:
            return []
        retrieved = self.retrieve(self.encode(self.preprocess(rgb)))
        return self.map_and_score(retrieved, [map_size or (image.height, image.width) for image in rgb])

    # -- the stages, in the order predict_batch chains them ------------------------------------

    def preprocess(self, rgb: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> the encoder's (batch, 3, S, S) float32 input (spec section 1)."""
        return np.stack([to_input(image, self.manifest.preprocess) for image in rgb])

    def encode(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the encoder graph; by default it returns the outputs the memories are queried with."""
        return self.encoder.run(outputs or self._query_outputs, {self._input_name: batch})

    def retrieve(self, encoded: dict[str, np.ndarray], mode: str | None = None) -> Retrieved:
        """Anomalous share per image (image memory) and per patch (pixel memory)."""
        mode = mode or self.retrieval
        top_k = self.manifest.scoring.top_k
        image, pixel = self.image_memory, self.pixel_memory
        patch_queries = encoded[pixel.query]
        patch = pixel.anomalous_probability(patch_queries.reshape(-1, patch_queries.shape[-1]), mode, top_k)
        return Retrieved(image=image.anomalous_probability(encoded[image.query], mode, top_k),
                         patch=patch.reshape(len(patch_queries), -1))

    def map_and_score(self, retrieved: Retrieved, sizes: Sequence[tuple[int, int]]) -> list[Result]:
        """Maps (at each (height, width) of ``sizes``) and image scores (spec section 4)."""
        scores = self.maps.image_scores(self.maps.input_maps(retrieved.patch), retrieved.image)
        return [
            Result(score=float(scores[i]), anomaly_map=self.maps.maps_at(retrieved.patch[i], *size)[0],
                   image_probability=float(retrieved.image[i]))
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
