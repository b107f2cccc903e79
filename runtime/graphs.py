"""Running the bundle's ONNX graphs with ONNX Runtime.

Providers are given as ONNX Runtime takes them (a list of provider names, or
of ``(name, options)`` pairs, plus an optional ``SessionOptions``), or by one
of the short names ``auto``, ``cpu``, ``cuda`` and ``tensorrt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnxruntime as ort

from .bundle import Graph, bundle_file
from .errors import BundleError, ProviderError

# ONNX Runtime's own provider names, most preferred first; CPU always closes the list.
PROVIDER_CHAINS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
PROVIDER_CHOICES = ("auto", *PROVIDER_CHAINS)

# What InferenceSession(providers=...) accepts.
Providers = Union[str, Sequence[Union[str, tuple[str, dict]]]]


def resolve_providers(providers: Providers) -> list:
    """A short name or ONNX Runtime's own list -> ONNX Runtime's list, checked against what is installed."""
    available = ort.get_available_providers()
    if isinstance(providers, str):
        name = providers
        if name == "auto":
            name = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if name not in PROVIDER_CHAINS:
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


def default_session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Idle ORT threads otherwise spin after each run, taking the cores from retrieval and maps.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class GraphRunner:
    """One graph of a bundle opened in an ONNX Runtime session, its inputs and outputs checked.

    ``session_options``: an ``onnxruntime.SessionOptions`` used as given; by
    default idle threads do not spin. ``run`` may be called from several
    threads at once, as ONNX Runtime allows.
    """

    def __init__(self, directory: Path, name: str, graph: Graph, providers: Providers = "auto",
                 session_options: ort.SessionOptions | None = None):
        self.name, self.graph = name, graph
        for file in graph.files():  # the graph and its weights: regular files inside the bundle
            bundle_file(directory, file)
        try:
            self.session = ort.InferenceSession(str(Path(directory) / graph.file),
                                                session_options or default_session_options(),
                                                providers=resolve_providers(providers))
        except ProviderError:
            raise
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise BundleError(f"bundle is corrupt: graph {name} ({graph.file}) could not be loaded ({exc})") from exc
        inputs = sorted(i.name for i in self.session.get_inputs())
        outputs = {o.name for o in self.session.get_outputs()}
        declared_in = sorted(t.name for t in graph.inputs)
        declared_out = {t.name for t in graph.outputs}
        if inputs != declared_in or not declared_out <= outputs:
            raise BundleError(
                f"bundle is corrupt: graph {name} ({graph.file}) has inputs {inputs} and outputs {sorted(outputs)}; "
                f"the manifest declares {declared_in} -> {sorted(declared_out)}"
            )

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses, most preferred first."""
        return self.session.get_providers()

    def run(self, outputs: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(list(outputs), feeds)))
