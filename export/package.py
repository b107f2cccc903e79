"""Pack a traced encoder and a memory bank into a bundle directory.

The bundle is written into a hidden sibling directory and moved into place
only when complete, so an interrupted export never leaves a half-written
bundle behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import hnswlib
import numpy as np
import torch

from mrad.runtime.bundle import Encoder, Manifest, MemoryLevel, write_manifest

from .encoder import QueryGraph
from .errors import ExportError

ENCODER_FILE = "encoder.onnx"
INPUT_NAME = "image"
IMAGE_OUTPUT = "image_query"
PATCH_OUTPUT = "patch_query"
# protobuf cannot hold a single file over 2 GiB; larger models keep weights beside the graph.
EXTERNAL_DATA_BYTES = 1_900_000_000
# hnswlib construction parameters: generous, memories hold thousands of entries, not millions.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_SEED = 100


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
            output_names=[IMAGE_OUTPUT, PATCH_OUTPUT],
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    return f"{path.name}.data" if external else None


def write_memory_level(directory: Path, name: str, keys: np.ndarray, labels: np.ndarray) -> MemoryLevel:
    """Write one memory level as an inner-product hnswlib index plus a label array."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    index = hnswlib.Index(space="ip", dim=keys.shape[1])
    index.init_index(max_elements=len(keys), M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=HNSW_SEED)
    # One thread: the graph, and so the hnsw retrieval, is then the same on every export.
    index.add_items(keys, np.arange(len(keys)), num_threads=1)
    level = MemoryLevel(index=f"memory_{name}.hnsw", labels=f"memory_{name}_labels.npy", space="ip",
                        dim=int(keys.shape[1]), count=int(len(keys)))
    index.save_index(str(directory / level.index))
    np.save(directory / level.labels, labels.astype(np.uint8), allow_pickle=False)
    return level


def check_out_free(out: Path, overwrite: bool) -> None:
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not overwrite:
        raise ExportError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")


def write_bundle(out: Path, graph: QueryGraph, image_keys: np.ndarray, image_labels: np.ndarray,
                 pixel_keys: np.ndarray, pixel_labels: np.ndarray, manifest_fields: dict,
                 overwrite: bool = False) -> Manifest:
    """Write the whole bundle to ``out`` atomically; ``manifest_fields`` supplies the rest of the manifest."""
    out = Path(out)
    check_out_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)
    try:
        external = trace_encoder(graph, staging / ENCODER_FILE, graph.encoder.image_size)
        encoder = Encoder(file=ENCODER_FILE, input=INPUT_NAME, image_output=IMAGE_OUTPUT,
                          patch_output=PATCH_OUTPUT, grid=graph.encoder.grid, external_data=external)
        manifest = Manifest(
            encoder=encoder,
            image_memory=write_memory_level(staging, "image", image_keys, image_labels),
            pixel_memory=write_memory_level(staging, "pixel", pixel_keys, pixel_labels),
            **manifest_fields,
        )
        manifest = write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
