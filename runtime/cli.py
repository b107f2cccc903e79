"""What every mrad command shares: click settings, options, and how errors end a command.

A user mistake ends a command with one ``error:`` line on stderr and a
documented exit code, never a traceback:

    0  done (or stopped by SIGINT/SIGTERM)
    2  bad arguments or bad input data (also: a missing optional extra)
    3  bad bundle (missing, corrupt, foreign, unsupported version)
    4  input failed for good (a camera never opened or stayed lost)
    5  outputs could not all be written (disk full, read-only folder): the
       records that failed are counted in the summary
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, NoReturn

import click

from . import defaults
from .errors import BundleError, MradError, SourceError
from .graphs import PROVIDER_CHOICES

EXIT_OK, EXIT_BAD_ARGUMENTS, EXIT_BAD_BUNDLE, EXIT_INPUT_FAILED, EXIT_OUTPUT_FAILED = 0, 2, 3, 4, 5
EXIT_CODES = ("Exit codes: 0 done (or stopped by SIGINT/SIGTERM), 2 bad arguments or input, 3 bad bundle, "
              "4 input failed for good (camera never opened or stayed lost), 5 outputs not all written.")
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# Top-level modules of the optional extras, and the extra that brings each.
EXTRAS = {"torch": "export", "torchvision": "export", "open_clip": "export", "onnx": "export",
          "onnxscript": "export", "hnswlib": "hnsw", "model_signing": "sign", "OpenSSL": "sign", "scipy": "test", "sklearn": "test",
          "paho": "protocols", "asyncua": "protocols", "tomli": "protocols", "ray": "serve", "aiohttp": "web"}


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def exit_code(exc: MradError) -> int:
    if isinstance(exc, BundleError):
        return EXIT_BAD_BUNDLE
    if isinstance(exc, SourceError):
        return EXIT_INPUT_FAILED
    return EXIT_BAD_ARGUMENTS


def missing_extra(exc: ModuleNotFoundError, command: str) -> str:
    module = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return f"{command} needs the Python module {module!r}, which is not installed ({exc})"
    return f"{command} needs {module}, part of the '{extra}' extra: pip install \"mrad-edge[{extra}]\""


def command(name: str, epilog: str = "", **kwargs) -> Callable:
    """``click.command`` with the shared settings; MradError and missing extras end in one ``error:`` line."""

    def decorate(function: Callable) -> click.Command:
        @functools.wraps(function)
        def run(*args, **options):
            try:
                return function(*args, **options)
            except MradError as exc:
                fail(str(exc), exit_code(exc))
            except ModuleNotFoundError as exc:
                fail(missing_extra(exc, name), EXIT_BAD_ARGUMENTS)

        text = f"{epilog.rstrip()}\n\n\b\n{EXIT_CODES}\n" if epilog else f"\b\n{EXIT_CODES}\n"
        return click.command(name=name, epilog=text, context_settings=CONTEXT_SETTINGS, **kwargs)(run)

    return decorate


bundle_option = click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory from mrad-export.")
provider_option = click.option(
    "--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
    help="ONNX Runtime execution provider: auto takes CUDA when onnxruntime-gpu sees a GPU, else the CPU; "
         "openvino and openvino-bf16 compile the graph with OpenVINO for the CPU (the 'openvino' extra; bf16 is "
         "several times faster where the CPU has AMX or AVX-512 BF16, and less exact).")
retrieval_option = click.option(
    "--retrieval", type=click.Choice(defaults.RETRIEVAL_MODES), default=None,
    help="exact: softmax over the whole memory (the spec); hnsw: top-k through the index [default: the bundle's].")
enrollment_option = click.option(
    "--enrollment", type=click.Path(path_type=Path, file_okay=False),
    help="Folder of the line's own memories (mrad-enroll) [default: <bundle>/enrollment].")
