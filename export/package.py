"""Pack a traced encoder and the memories into a bundle directory.

The bundle is written into a hidden sibling directory and moved into place
only when complete, so an interrupted export never leaves a half-written
bundle behind. Memories are written by the runtime's own :class:`Memory`.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from mrad.runtime.core.bundle import Graph, Manifest, TensorSpec, write_manifest
from mrad.runtime.core.graphs import default_session_options
from mrad.runtime.core import signing
from mrad.runtime.files import staged_directory
from mrad.runtime.core.memory import Memory

from .attention import fuse_attention
from .encoder import QueryGraph
from .errors import ExportError
from .optimise import optimise_graph
from .progress import Steps, silent
from .prompting import TextGraph

ENCODER_FILE = "encoder.onnx"
TEXT_FILE = "text.onnx"
INPUT_NAME = "image"
PRIORS_NAME = "priors"
TEXT_OUTPUT = "text_features"
CHECK_PROVIDERS = ("CPUExecutionProvider",)
# protobuf cannot hold a single file over 2 GiB; larger models keep weights beside the graph.
EXTERNAL_DATA_BYTES = 1_900_000_000


def trace_encoder(graph: QueryGraph, path: Path, image_size: int) -> str | None:
    """Export ``graph`` to ONNX with a dynamic batch; return the external-data file name, if any."""
    graph = graph.eval().cpu()
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    weight_bytes += sum(b.numel() * b.element_size() for b in graph.buffers())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    example = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(graph.outputs),
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    return f"{path.name}.data" if external else None


def fuse_encoder(path: Path, heads: int, external_data: str | None) -> int:
    """Fuse the traced graph's attention products (export/attention.py), in place; how many were fused."""
    model = onnx.load(str(path))
    fused = fuse_attention(model, heads)
    if external_data:
        (path.parent / external_data).unlink()
    onnx.save(model, str(path), save_as_external_data=external_data is not None, location=external_data)
    return fused


def encoder_spec(graph: QueryGraph, external_data: str | None) -> Graph:
    """The manifest's description of the traced encoder: what goes in, what comes out, what each means."""
    encoder = graph.encoder
    side, patches = encoder.image_size, encoder.grid ** 2
    image_query_dim = _out_features(graph.image_query, encoder.embed_dim)
    patch_query_dim = _out_features(graph.patch_query, encoder.width)
    metric = "" if isinstance(graph.image_query, torch.nn.Identity) else " through MRAD-FT's learned query layer"
    return Graph(
        file=ENCODER_FILE,
        external_data=external_data,
        inputs=(TensorSpec(INPUT_NAME, ("batch", 3, side, side), "float32",
                           "RGB images resized to image_size, scaled to [0, 1], normalised with preprocess.mean/std"),),
        outputs=(
            TensorSpec("image_query", ("batch", image_query_dim), "float32",
                       f"normalised image feature{metric}: the image memory's queries"),
            TensorSpec("patch_query", ("batch", patches, patch_query_dim), "float32",
                       f"normalised smoothed patch features{metric}: the pixel memory's queries"),
            TensorSpec("image_feature", ("batch", encoder.embed_dim), "float32",
                       "class token of the ordinary path times proj, not normalised: image memory entries"),
            TensorSpec("patch_feature", ("batch", patches, encoder.width), "float32",
                       "ln_post of the v-v stream, 1/3/5-smoothed, not normalised: pixel memory entries"),
            TensorSpec("patch_tokens", ("batch", patches, encoder.width), "float32",
                       "ln_post of the v-v stream, not smoothed, not normalised: the line's own memories"),
        ) + ((TensorSpec(QueryGraph.PROJECTION, ("batch", patches, encoder.embed_dim), "float32",
                         "smoothed patch features times proj, normalised: compared with MRAD-CLIP's text features"),)
             if graph.project_patches else ()),
        precision="fp32",
    )


def trace_text(graph: TextGraph, path: Path) -> None:
    """Export MRAD-CLIP's text side to ONNX with a dynamic batch of region priors."""
    example = torch.zeros(2, 2, graph.learner.normal_bias.in_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval().cpu(), (example,), str(path), input_names=[PRIORS_NAME],
                          output_names=[TEXT_OUTPUT],
                          dynamic_shapes={"priors": {0: torch.export.Dim("batch", min=1, max=1024)}},
                          dynamo=True, external_data=False, verbose=False)  # a text tower is far below 2 GB


def text_spec(graph: TextGraph) -> Graph:
    dim = graph.learner.normal_bias.in_features
    return Graph(
        file=TEXT_FILE,
        inputs=(TensorSpec(PRIORS_NAME, ("batch", 2, dim), "float32",
                           "region priors: mean normalised patch projection of the normal and of the anomalous "
                           "patches (zeros for an empty region)"),),
        outputs=(TensorSpec(TEXT_OUTPUT, ("batch", 2, graph.text.text_projection.shape[1]), "float32",
                            "normalised text features of the normal and the anomalous prompt, biased by the priors"),),
        precision="fp32",
    )


def check_text(graph: TextGraph, path: Path, spec: Graph, seed: int = 0) -> Graph:
    """Run the text graph and the PyTorch module on random priors; record the largest difference."""
    priors = F.normalize(torch.randn(3, 2, spec.inputs[0].shape[-1], generator=torch.Generator().manual_seed(seed)),
                         dim=-1)
    priors[2, 1] = 0  # an image whose anomalous region is empty
    with torch.no_grad():
        expected = graph.eval().cpu()(priors).numpy()
    session = ort.InferenceSession(str(path), default_session_options(spec), providers=list(CHECK_PROVIDERS))
    actual = session.run([TEXT_OUTPUT], {PRIORS_NAME: priors.numpy()})[0]
    return dataclasses.replace(spec, checked_providers=CHECK_PROVIDERS,
                               max_abs_diff={TEXT_OUTPUT: float(np.abs(actual - expected).max())})


def check_encoder(graph: QueryGraph, path: Path, spec: Graph, seed: int = 0) -> Graph:
    """Run the ONNX graph and the PyTorch module on one random image; record the largest difference per output."""
    side = graph.encoder.image_size
    images = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = [t.numpy() for t in graph.eval().cpu()(images)]
    session = ort.InferenceSession(str(path), default_session_options(spec), providers=list(CHECK_PROVIDERS))
    names = [t.name for t in spec.outputs]
    actual = session.run(names, {INPUT_NAME: images.numpy()})
    differences = {name: float(np.abs(a - e).max()) for name, a, e in zip(names, actual, expected)}
    return dataclasses.replace(spec, checked_providers=CHECK_PROVIDERS, max_abs_diff=differences)


def check_out_free(out: Path, overwrite: bool) -> None:
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not overwrite:
        raise ExportError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")


def write_bundle(out: Path, graph: QueryGraph, memories: dict[str, Memory], manifest_fields: dict,
                 text: TextGraph | None = None, overwrite: bool = False, sign_key: Path | None = None,
                 steps: Steps | None = None) -> Manifest:
    """Write the whole bundle to ``out`` atomically; ``manifest_fields`` supplies the rest of the manifest.

    ``text``: MRAD-CLIP's text side, written as the graph ``text``. With
    ``sign_key`` the complete bundle is signed before it is put in place.
    ``steps`` says each phase as it begins.
    """
    out = Path(out)
    steps = steps or silent()
    check_out_free(out, overwrite)
    with staged_directory(out) as staging:
        encoder = staging / ENCODER_FILE
        with steps("trace"):
            external = trace_encoder(graph, encoder, graph.encoder.image_size)
        with steps("fuse"):
            fuse_encoder(encoder, graph.encoder.heads, external)
        with steps("optimise"):
            optimized = optimise_graph(encoder, external)
        spec = dataclasses.replace(encoder_spec(graph, external), optimized=optimized)
        with steps("check"):
            graphs = {"encoder": check_encoder(graph, encoder, spec)}
        if text is not None:
            with steps("text"):
                trace_text(text, staging / TEXT_FILE)
                spec = dataclasses.replace(text_spec(text), optimized=optimise_graph(staging / TEXT_FILE, None))
                graphs["text"] = check_text(text, staging / TEXT_FILE, spec)
        with steps("index"):
            manifest = Manifest(
                graphs=graphs,
                memories={name: memory.save(staging, name) for name, memory in memories.items()},
                **manifest_fields,
            )
            manifest = write_manifest(staging, manifest)
        if sign_key:
            with steps("sign"):
                signing.sign(staging, sign_key)
    return manifest


def _out_features(layer: torch.nn.Module, default: int) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else default
