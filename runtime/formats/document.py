"""Reading the files users keep, one way for all: the format's name, its version, its upgrade chain, its schema.

Every document mrad-edge writes (a bundle's manifest, an enrollment version,
a calibration, a station file) says which format it is and in which version.
:meth:`Format.read` is the one path from what a file holds to the newest
version's content: the name checked, the version checked, then one small pure
upgrade per version up to the newest (the chain lives beside the format, and
nowhere else reads an older version), then the JSON schema, whose first
violation becomes one line naming the key.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from ..errors import MradError

Upgrade = Callable[[dict], dict]


class FormatError(MradError):
    """A document that is not of its format, not of a readable version, or not valid: ``problem`` says where."""

    def __init__(self, problem: str, key: str = ""):
        super().__init__(problem)
        self.problem, self.key = problem, key


@dataclass(frozen=True)
class Format:
    """A document format: ``name`` (None: the document does not name itself, as a station file), ``newest``
    version, ``upgrades`` (version k's content -> version k+1's), the ``schema`` file of the newest version
    (in schemas/), and the version a document without ``format_version`` is taken to be (None: it must say)."""

    name: str | None
    newest: int
    upgrades: dict[int, Upgrade] = field(default_factory=dict)
    schema: str | None = None
    unversioned: int | None = None
    folder: str = "folder"  # what holds the files a document names, in messages ("bundle directory")

    @property
    def readable(self) -> tuple[int, ...]:
        return tuple(sorted({self.newest, *self.upgrades}))

    def read(self, raw: Any, root: str = "") -> dict:
        """``raw`` (a file's parsed content) as the newest version's content, without its format keys.

        ``root``: how key paths start in messages ("manifest" gives "manifest.scoring.grid").
        Raises :class:`FormatError` with one line.
        """
        if not isinstance(raw, dict):
            raise FormatError(f"not a {self.name or 'document'}: the file holds {type(raw).__name__}, not an object")
        if self.name is not None and raw.get("format", self.name if self.unversioned else None) != self.name:
            raise FormatError(f"not an {self.name} document: it does not declare format '{self.name}'", "format")
        version = raw.get("format_version", self.unversioned)
        if isinstance(version, bool) or version not in self.readable:
            raise FormatError(f"format_version: {json.dumps(version)[:20]} is not supported (this mrad-edge reads "
                              f"{', '.join(map(str, self.readable))}; a newer file needs a newer mrad-edge)",
                              "format_version")
        body = {k: v for k, v in raw.items() if k not in ("format", "format_version")}
        while version < self.newest:
            try:
                body = self.upgrades[version](body)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise FormatError(f"a format-{version} document that lacks {_reason(exc)}") from exc
            version += 1
        if self.schema:
            problem = schema_problem(self.schema, body, root, self.folder)
            if problem:
                raise FormatError(*problem)
        return body


def read_toml(path, what: str, limit: int) -> dict:
    """A TOML file a user keeps, parsed: read as :func:`~mrad.runtime.files.read_small_text` reads, and any
    parse failure (a syntax error, nesting too deep for the parser) one line naming the file."""
    from ..files import read_small_text

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from ..line.settings import need

        tomllib = need("tomli")
    text = read_small_text(path, what, limit)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MradError(f"{what} {path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise MradError(f"{what} {path} nests arrays or tables too deeply to be a settings file") from exc


def same(body: dict) -> dict:
    """The upgrade of a version whose successor only added optional keys."""
    return body


@functools.lru_cache(maxsize=None)
def _validator(schema: str):
    import jsonschema

    document = json.loads(resources.files("mrad.runtime.formats").joinpath(f"schemas/{schema}").read_text())
    return jsonschema.Draft202012Validator(document)


def key_path(parts, root: str = "") -> str:
    """``recipes[1].roi`` from ["recipes", 1, "roi"]; with ``root`` in front (joined by a dot)."""
    text = root
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def schema_problem(schema: str, body: dict, root: str = "", folder: str = "folder") -> tuple[str, str] | None:
    """The first violation of ``schema`` by ``body`` as (one line naming the key, the key); None when it fits."""
    import jsonschema

    errors = list(_validator(schema).iter_errors(body))
    if not errors:
        return None
    # the shallowest key first: a value that fits no form of its key is explained at that key, not inside one form
    shallowest = min(len(e.absolute_path) for e in errors)
    error = max((e for e in errors if len(e.absolute_path) == shallowest), key=jsonschema.exceptions.relevance)
    if error.context and "description" not in error.schema:  # no word on the whole: the best of its forms says it
        error = jsonschema.exceptions.best_match(error.context)
    where = key_path(error.absolute_path, root)
    value = (repr(error.instance) if isinstance(error.instance, str) else json.dumps(error.instance))[:80]
    described = error.schema.get("description", "")
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))[:1] or ["?"]
        key = key_path([*error.absolute_path, unknown[0]], root)
        return f"{key}: unknown key" + (f"; the keys here are {', '.join(allowed)}" if allowed else ""), key
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        key = key_path([*error.absolute_path, missing], root)
        return f"{key}: missing (it is required)", key
    if "path" in described and error.validator in ("pattern", "oneOf", "not"):
        return f"{where} names file {value} outside the {folder} (paths must be relative, without '..')", where
    if error.validator == "propertyNames":
        return f"{where} has a key that is not allowed ({error.message[:120]})", where
    if described.startswith("one line:"):  # the schema says how to explain this key's mistakes
        return f"{where}: {value} {described[len('one line:'):].strip()}", where
    message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
    return f"{where or 'the document'}: {message}", where


def _reason(exc: Exception) -> str:
    return f"the key {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else f"{type(exc).__name__}: {exc}"
