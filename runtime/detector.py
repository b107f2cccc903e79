"""Open a bundle, predict, read the result.

image -> preprocess -> encoder (ONNX) -> retrieval (index) -> map + score -> Result
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from .bundle import RETRIEVAL_MODES, read_manifest
from .errors import BundleError, MradError, ProviderError
from .preprocess import ImageLike, load_rgb, to_input
from .retrieval import Memory
from .scoring import MapScorer

# onnxruntime's own provider names, most preferred first; CPU always closes the list.
PROVIDER_CHAINS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PROVIDER_CHOICES = ("auto", *PROVIDER_CHAINS)


@dataclass(frozen=True)
class Result:
    """One image's verdict material.

    ``score`` is the spec's image score; ``anomaly_map`` is float32 at the
    input image's height and width; ``image_probability`` is the image-level
    retrieval alone (``p_img``), kept for inspection.
    """

    score: float
    anomaly_map: np.ndarray
    image_probability: float

    def to_dict(self) -> dict:
        """JSON-ready summary; the map itself is left out (save it with :func:`overlay`)."""
        return {
            "score": self.score,
            "image_probability": self.image_probability,
            "map_size": list(self.anomaly_map.shape),
            "map_max": float(self.anomaly_map.max()),
        }


def resolve_providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider not in PROVIDER_CHAINS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    chain = PROVIDER_CHAINS[provider]
    if chain[0] not in available:
        raise ProviderError(
            f"provider {provider!r} needs {chain[0]}, which this onnxruntime lacks (it has {', '.join(available)}); "
            "install onnxruntime-gpu in place of onnxruntime for cuda/tensorrt, or pass provider='cpu'"
        )
    return chain


class Detector:
    """A bundle opened for scoring. One instance may serve several threads at once.

    ``provider``: "auto" (CUDA when present, else CPU), "cpu", "cuda" or
    "tensorrt". ``retrieval``: "exact" (softmax over the whole memory, the
    spec) or "hnsw" (top-k through the index); ``None`` takes the bundle's
    default.
    """

    def __init__(self, bundle: str | Path, provider: str = "auto", retrieval: str | None = None, verify: bool = True):
        self.path = Path(bundle)
        self.manifest = read_manifest(self.path, verify=verify)
        self.retrieval = retrieval or self.manifest.retrieval.default
        if self.retrieval not in RETRIEVAL_MODES:
            raise MradError(f"unknown retrieval {self.retrieval!r}; choose one of {', '.join(RETRIEVAL_MODES)}")
        self.providers = resolve_providers(provider)
        self.session = self._open_encoder()
        ef = self.manifest.retrieval.ef_search
        self.image_memory = Memory(self.path, self.manifest.image_memory, ef)
        self.pixel_memory = Memory(self.path, self.manifest.pixel_memory, ef)
        if self.retrieval == "exact":
            self.image_memory.keys, self.pixel_memory.keys  # read once here, not on the first frame
        pre = self.manifest.preprocess
        self.scorer = MapScorer(self.manifest.encoder.grid, pre.image_size, self.manifest.scoring)

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
        image_queries, patch_queries = self.encode(self.preprocess(rgb))
        image_probs, patch_probs = self.retrieve(image_queries, patch_queries)
        return self.finish(rgb, image_probs, patch_probs, map_size)

    # The stages below are what predict_batch chains; benchmarks time them one by one.

    def preprocess(self, rgb: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([to_input(image, self.manifest.preprocess) for image in rgb])

    def encode(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        enc = self.manifest.encoder
        image_queries, patch_queries = self.session.run([enc.image_output, enc.patch_output], {enc.input: batch})
        return image_queries, patch_queries

    def retrieve(self, image_queries: np.ndarray, patch_queries: np.ndarray,
                 mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(batch,) image probabilities and (batch, G*G) patch probabilities."""
        mode = mode or self.retrieval
        top_k = self.manifest.retrieval.top_k
        image_probs = self.image_memory.anomalous_probability(image_queries, mode, top_k)
        patch_probs = self.pixel_memory.anomalous_probability(
            patch_queries.reshape(-1, patch_queries.shape[-1]), mode, top_k
        ).reshape(len(patch_queries), -1)
        return image_probs, patch_probs

    def finish(self, rgb: Sequence[Image.Image], image_probs: np.ndarray, patch_probs: np.ndarray,
               map_size: tuple[int, int] | None = None) -> list[Result]:
        scores = self.scorer.image_scores(self.scorer.input_maps(patch_probs), image_probs)
        return [
            Result(
                score=float(scores[i]),
                anomaly_map=self.scorer.maps_at(patch_probs[i], *(map_size or (image.height, image.width)))[0],
                image_probability=float(image_probs[i]),
            )
            for i, image in enumerate(rgb)
        ]

    def _open_encoder(self) -> ort.InferenceSession:
        enc = self.manifest.encoder
        try:
            options = ort.SessionOptions()
            # Idle ORT threads otherwise spin after each run, taking the cores from retrieval and maps.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(self.path / enc.file), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise BundleError(f"bundle is corrupt: encoder {enc.file} could not be loaded ({exc})") from exc
        inputs = [i.name for i in session.get_inputs()]
        outputs = {o.name: o.shape for o in session.get_outputs()}
        if inputs != [enc.input] or enc.image_output not in outputs or enc.patch_output not in outputs:
            raise BundleError(
                f"bundle is corrupt: encoder {enc.file} has inputs {inputs} and outputs {sorted(outputs)}, "
                f"the manifest expects {enc.input} -> {enc.image_output}, {enc.patch_output}"
            )
        return session
