"""Docs that cannot rot: every shell and Python example of README.md and docs/ runs, as written.

Each document runs in a fresh folder of its own, its ```bash and ```python blocks in order (a block
may use what the ones before it made), on generated data and the tiny model, with the mrad-* commands
on PATH. A block that cannot run here (a real camera, pretrained weights, a service that runs until
stopped) begins with ``# not run by the tests: <why>`` and is only checked to say why. A test fails on
the first block that fails, naming the document and line.

A guide's first block is the same set-up as README's first product (generate data, export the tiny
bundle): when a first block is identical to one already run, the folder it made is copied rather than
made again (the commands are seeded: the same block gives the same files).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<language>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
RUN = {"bash": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"]}
SHOWN_ONLY = {"toml", "json", "text", "cpp", "csharp", ""}  # file contents, output, other languages: shown, not run
NOT_RUN = "# not run by the tests:"
BLOCK_TIMEOUT_S = 300
SET_UPS: dict[str, Path] = {}  # a first block's text -> the folder it made


@dataclass(frozen=True)
class Block:
    document: Path
    line: int
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    @property
    def not_run_because(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(NOT_RUN):].strip() if first.startswith(NOT_RUN) else None


def blocks(document: Path) -> list[Block]:
    return blocks_of(document.read_text(), document)


def blocks_of(text: str, document: Path) -> list[Block]:
    return [Block(document, text.count("\n", 0, m.start()) + 1, m["language"], textwrap.dedent(m["body"]))
            for m in FENCE.finditer(text)]


def environment() -> dict[str, str]:
    """The user's shell after `source .venv/bin/activate`: the commands on PATH, no MRAD_* settings of ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MRAD_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_block(block: Block, folder: Path) -> None:
    ran = subprocess.run([*RUN[block.language], block.code], cwd=folder, env=environment(), capture_output=True,
                         text=True, timeout=BLOCK_TIMEOUT_S)
    assert ran.returncode == 0, (f"{block.where}: the example failed (exit {ran.returncode})\n{block.code}\n"
                                 f"--- stdout\n{ran.stdout[-3000:]}\n--- stderr\n{ran.stderr[-3000:]}")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_example_runs_as_written(document, tmp_path):
    found = blocks(document)
    for block in found:
        assert block.language in RUN or block.language in SHOWN_ONLY, (
            f"{block.where}: a ```{block.language} block: write shell examples as ```bash, code as ```python")
    runnable = [b for b in found if b.language in RUN and b.not_run_because is None]
    for index, block in enumerate(runnable):
        if index == 0 and block.code in SET_UPS:
            shutil.copytree(SET_UPS[block.code], tmp_path, dirs_exist_ok=True, symlinks=True)
            continue
        run_block(block, tmp_path)
        if index == 0:
            SET_UPS[block.code] = shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-set-up",
                                                  symlinks=True)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_an_example_that_is_not_run_says_why(document):
    for block in blocks(document):
        if block.language in RUN and block.not_run_because is not None:
            assert len(block.not_run_because) >= 10, f"{block.where}: say why this example is not run"


def test_the_fences_are_found():
    """The harness reads what a reader sees: indented fences in lists too, and nothing between blocks."""
    text = "- a list item:\n\n  ```bash\n  echo one\n  ```\n\n```python\nprint(2)\n```\n\n```toml\nx = 1\n```\n"
    found = [(b.language, b.code) for b in blocks_of(text, ROOT / "README.md")]
    assert found == [("bash", "echo one\n"), ("python", "print(2)\n"), ("toml", "x = 1\n")]



LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_link_leads_to_a_file_that_exists(document):
    for match in LINK.finditer(document.read_text()):
        assert (document.parent / match["target"]).exists(), f"{document.relative_to(ROOT)}: {match['target']}"
