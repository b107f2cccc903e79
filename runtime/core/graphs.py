"""Running the bundle's ONNX graphs with ONNX Runtime, or with OpenVINO on CPUs.

Providers are given as ONNX Runtime takes them (a list of provider names, or
of ``(name, options)`` pairs, plus an optional ``SessionOptions``), or by one
of the short names ``auto``, ``cpu``, ``cuda``, ``tensorrt``, ``openvino``
and ``openvino-bf16``. The last two compile the same ONNX graph with OpenVINO
(the ``openvino`` extra): on CPUs with AMX or AVX-512 BF16 its bfloat16
arithmetic runs several times faster than fp32 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnxruntime as ort

from .bundle import BundleFiles, Graph, files_of
from ..errors import BundleError, ProviderError

# ONNX Runtime's own provider names, most preferred first; CPU always closes the list.
PROVIDER_CHAINS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
# OpenVINO's CPU plugin, by the arithmetic asked of it: f32 as ONNX Runtime's; bf16 where the CPU has it.
OPENVINO_PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16"}
PROVIDER_CHOICES = ("auto", *PROVIDER_CHAINS, *OPENVINO_PRECISIONS)

# What InferenceSession(providers=...) accepts.
Providers = Union[str, Sequence[Union[str, tuple[str, dict]]]]


def resolve_providers(providers: Providers) -> list:
    """A short name or ONNX Runtime's own list -> ONNX Runtime's list, checked against what is installed."""
    available = ort.get_available_providers()
    if isinstance(providers, str):
        name = providers
        if name == "auto":
            name = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if name not in PROVIDER_CHAINS:  # (the OpenVINO names never reach here: open_graph takes them)
            raise ProviderError(f"unknown provider {providers!r}; choose one of {', '.join(PROVIDER_CHOICES)}, "
                                "or pass ONNX Runtime's own list of provider names")
        chain = PROVIDER_CHAINS[name]
        if chain[0] not in available:
            raise ProviderError(
                f"provider {name!r} needs {chain[0]}, which this onnxruntime lacks (it has {', '.join(available)}); "
                "install onnxruntime-gpu in place of onnxruntime for cuda/tensorrt, or pass provider='cpu'"
            )
        return list(chain)
    chosen = list(providers)
    names = [p[0] if isinstance(p, tuple) else p for p in chosen]
    missing = [n for n in names if n not in available]
    if not chosen or missing:
        raise ProviderError(f"providers {missing or names} are not available in this onnxruntime "
                            f"(it has {', '.join(available)})")
    return chosen


# The level a graph optimised at export (the manifest's ``optimized``) is opened at, when this ONNX Runtime is the
# version that optimised it: the extended passes are done. The layout passes left out rewrite only the patch
# embedding's convolution and the smoothing's pooling for this CPU: no measurable change at ViT-B or ViT-L, 13 %
# of the tiny model's pass (docs/BENCHMARKS.md, "Graph optimisation at export").
PREOPTIMIZED_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def default_session_options(graph: Graph | None = None) -> ort.SessionOptions:
    """The runtime's options for ``graph``: idle threads do not spin; a graph optimised at export is not again."""
    options = ort.SessionOptions()
    # Idle ORT threads otherwise spin after each run, taking the cores from retrieval and maps.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if graph is not None and preoptimized(graph):
        options.graph_optimization_level = PREOPTIMIZED_LEVEL
    return options


def preoptimized(graph: Graph) -> bool:
    """Whether ``graph`` holds the extended level's rewrites made by this very ONNX Runtime version.

    Another version may fuse more (or differently) at load: it gets today's full level.
    """
    return graph.optimized.get("level") == "extended" and graph.optimized.get("onnxruntime") == ort.__version__


class SessionPool:
    """Opened graphs shared by graph file digest: recipes whose bundles hold the same encoder run one session.

    A graph is shared when its files' sha256 (from the manifest), its
    declared inputs and outputs, its export-time optimisation and the
    providers and session options asked for are all the same. ONNX Runtime
    and OpenVINO runners may be called from several threads at once, so one
    session serves every detector that shares it.
    """

    def __init__(self):
        self._opened: dict[tuple, GraphRunner | OpenVinoRunner] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._opened)

    def open(self, directory: "Path | BundleFiles", name: str, manifest, providers: Providers = "auto",
             session_options: ort.SessionOptions | None = None) -> "GraphRunner | OpenVinoRunner":
        """Graph ``name`` of the bundle in ``directory`` (its ``manifest`` read): an open one when it is the same.

        A graph opened from checked bytes (:class:`~mrad.runtime.core.bundle.BundleFiles` with digests) is shared
        only with loads that check too: one opened by path could hold a file swapped after its checksum was read.
        """
        graph = manifest.graphs[name]
        digests = tuple(manifest.files.get(file) for file in graph.files())
        key = (digests, tuple(t.name for t in graph.inputs), tuple(sorted(t.name for t in graph.outputs)),
               repr(sorted(graph.optimized.items())), repr(providers), id(session_options), files_of(directory).checked)
        if None in digests:  # a graph without a recorded digest is never shared
            return open_graph(directory, name, graph, providers, session_options)
        with self._lock:  # one opening per graph, even when several recipes load at once
            if key not in self._opened:
                self._opened[key] = open_graph(directory, name, graph, providers, session_options)
            return self._opened[key]


def open_graph(directory: "Path | BundleFiles", name: str, graph: Graph, providers: Providers = "auto",
               session_options: ort.SessionOptions | None = None) -> "GraphRunner | OpenVinoRunner":
    """The runner of one of the bundle's graphs: ONNX Runtime's, or OpenVINO's for the ``openvino*`` names.

    ``directory``: the bundle's folder, or its :class:`~mrad.runtime.core.bundle.BundleFiles` (with digests, the
    graph is loaded from the very bytes whose sha256 was checked)."""
    if isinstance(providers, str) and providers in OPENVINO_PRECISIONS:
        return OpenVinoRunner(directory, name, graph, OPENVINO_PRECISIONS[providers])
    return GraphRunner(directory, name, graph, providers, session_options)


class GraphRunner:
    """One graph of a bundle opened in an ONNX Runtime session, its inputs and outputs checked.

    ``session_options``: an ``onnxruntime.SessionOptions`` used as given; by
    default idle threads do not spin, and a graph optimised at export is
    opened at a lower level (:func:`default_session_options`). ``run`` may be
    called from several threads at once, as ONNX Runtime allows.
    """

    def __init__(self, directory: "Path | BundleFiles", name: str, graph: Graph, providers: Providers = "auto",
                 session_options: ort.SessionOptions | None = None):
        self.name, self.graph = name, graph
        files = files_of(directory)
        options = session_options or default_session_options(graph)
        if files.checked:  # the checked bytes themselves: nothing is read from the bundle again
            model = files.read(graph.file)
            if graph.external_data:  # kept alive until the session is made, which copies them
                weights = files.read(graph.external_data)
                options.add_external_initializers_from_files_in_memory([graph.external_data], [weights], [len(weights)])
        else:
            for file in graph.files():  # the graph and its weights: regular files inside the bundle
                files.path(file)
            model = str(files.directory / graph.file)
        try:
            self.session = ort.InferenceSession(model, options, providers=resolve_providers(providers))
        except ProviderError:
            raise
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise BundleError(f"bundle is corrupt: graph {name} ({graph.file}) could not be loaded ({exc})") from exc
        _check_signature(name, graph, [i.name for i in self.session.get_inputs()],
                         [o.name for o in self.session.get_outputs()])

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, most preferred first."""
        return self.session.get_providers()

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(list(outputs), feeds)))


class OpenVinoRunner:
    """One graph of a bundle compiled by OpenVINO for the CPU; the same ``run`` as :class:`GraphRunner`.

    ``precision``: "f32" (ONNX Runtime's arithmetic) or "bf16" (bfloat16
    where the CPU has it, f32 elsewhere). ``run`` may be called from several
    threads at once: each thread has its own inference request.
    """

    def __init__(self, directory: "Path | BundleFiles", name: str, graph: Graph, precision: str):
        try:
            import openvino as ov
        except ModuleNotFoundError as exc:
            raise ProviderError('provider openvino needs the openvino package: pip install "mrad-edge[openvino]"') from exc
        self.name, self.graph = name, graph
        files = files_of(directory)
        for file in graph.files():
            files.path(file)
        # OpenVINO reads an ONNX graph and its weights by name: checked bytes go to a folder of this process's own
        # (mode 0700) for the compile, so that what is compiled is what was checked.
        private = Path(tempfile.mkdtemp(prefix="mrad-checked-")) if files.checked else None
        try:
            if private is not None:
                for file in graph.files():
                    (private / file).parent.mkdir(parents=True, exist_ok=True)
                    (private / file).write_bytes(files.read(file))
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str((private or files.directory) / graph.file)), "CPU",
                                               {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
        except BundleError:
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError for a graph it cannot read or compile
            raise BundleError(f"bundle is corrupt: graph {name} ({graph.file}) could not be compiled by OpenVINO "
                              f"({exc})") from exc
        finally:
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)
        _check_signature(name, graph, [i.any_name for i in self.compiled.inputs],
                         [o.any_name for o in self.compiled.outputs])
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what it chose
        self._requests = threading.local()

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.precision})"]

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        request.infer(feeds)
        # copies: the request's output tensors are overwritten by its next run
        return {name: np.array(request.get_tensor(name).data) for name in outputs}


def _check_signature(name: str, graph: Graph, inputs: list[str], outputs: list[str]) -> None:
    """The graph's inputs are the manifest's, and it has every output the manifest declares."""
    declared_in = sorted(t.name for t in graph.inputs)
    declared_out = {t.name for t in graph.outputs}
    if sorted(inputs) != declared_in or not declared_out <= set(outputs):
        raise BundleError(
            f"bundle is corrupt: graph {name} ({graph.file}) has inputs {sorted(inputs)} and outputs "
            f"{sorted(outputs)}; the manifest declares {declared_in} -> {sorted(declared_out)}"
        )
