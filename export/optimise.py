"""ONNX Runtime's own graph optimisations, done once at export and saved in the bundle.

ONNX Runtime rewrites a graph every time it opens it: constant folding,
redundant node elimination, cancelling the transposes around the fused
attention products (export/attention.py), LayerNorm, QuickGELU/GELU and
skip-LayerNorm fusion. Here that is done once: the encoder is opened on the
CPU provider at the extended level and the rewritten graph written back in
its place, so that a runtime of the same ONNX Runtime version can open it at
a lower level (runtime/graphs.py).

Extended and not all: the layout level (part of ORT_ENABLE_ALL) writes NCHWc
nodes for this CPU's vector width (ONNX Runtime's documentation warns that
such a graph belongs to the machine it was made on). Some extended fusions
write contrib ops with CPU kernels only (FusedGemm, ...): the saved graph may
hold only standard ONNX ops and the contrib ops listed in ``PORTABLE_OPS``,
each with CPU and CUDA kernels (ONNX Runtime's docs/OperatorKernels.md);
otherwise the basic level, which writes standard ops only, is saved instead.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

LEVELS = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
PROVIDER = "CPUExecutionProvider"
# Contrib ops the extended level may write for this family of graphs that have CPU and CUDA kernels alike.
PORTABLE_OPS = frozenset({
    ("com.microsoft", "MultiHeadAttention"), ("com.microsoft", "Attention"),
    ("com.microsoft", "QuickGelu"), ("com.microsoft", "Gelu"), ("com.microsoft", "BiasGelu"),
    ("com.microsoft", "FastGelu"), ("com.microsoft", "SkipLayerNormalization"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"), ("com.microsoft", "FusedMatMul"),
    ("com.microsoft", "TransposeMatMul"), ("com.microsoft", "BiasAdd"), ("", "SimplifiedLayerNormalization"),
})
ONNX_DOMAINS = ("", "ai.onnx")
EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shapes, scalars) stay inside the graph file


def op_counts(path: Path) -> collections.Counter:
    """How many nodes of each (domain, op type) the graph at ``path`` holds."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter((node.domain, node.op_type) for node in graph.node)


def unportable_ops(counts: collections.Counter) -> list[str]:
    """The ops of ``counts`` that are neither standard ONNX nor contrib ops with CPU and CUDA kernels."""
    return sorted(f"{domain}:{op}" for domain, op in counts
                  if (domain, op) not in PORTABLE_OPS and not (domain in ONNX_DOMAINS and onnx.defs.has(op)))


def optimise_graph(path: Path, external_data: str | None) -> dict:
    """Rewrite the graph at ``path`` (and its ``external_data``) in place; what was done, for the manifest."""
    path = Path(path)
    before = op_counts(path)
    with tempfile.TemporaryDirectory(prefix=".optimise-", dir=path.parent) as scratch:
        for name, level in LEVELS.items():
            target = Path(scratch) / name / path.name
            target.parent.mkdir()
            _save_optimised(path, target, level, external_data)
            after = op_counts(target)
            if not unportable_ops(after):
                break
        else:  # the basic level writes standard ops only: not reached unless ONNX Runtime changes
            raise RuntimeError(f"ONNX Runtime's basic level wrote ops {unportable_ops(after)}")
        for file in [path.name] + ([external_data] if external_data else []):
            shutil.move(str(target.parent / file), str(path.parent / file))
    return {
        "onnxruntime": ort.__version__,
        "level": name,
        "provider": PROVIDER,
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "contrib_ops": {op: count for (domain, op), count in sorted(after.items()) if domain not in ONNX_DOMAINS},
    }


def _save_optimised(source: Path, target: Path, level: ort.GraphOptimizationLevel, external_data: str | None) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(target)
    if external_data:  # the weights beside the graph again, under the same name
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(EXTERNAL_MIN_BYTES))
    ort.InferenceSession(str(source), options, providers=[PROVIDER])
