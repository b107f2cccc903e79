"""Decision thresholds from known-good images of the target product.

A calibration file sits beside the bundle (``<bundle>.calibration.json``), or
inside an enrollment folder given on its own (``<enrollment>/calibration.json``), and
names the manifest, retrieval mode and enrollment version it was measured
with, so a threshold is never applied to another bundle or another retrieval
mode by mistake, and one measured with another enrollment (which moves every
score) is used only as stale (:mod:`~mrad.runtime.line.policy`).

A calibration written with a signer is signed (``<file>.sig`` beside it,
model-signing's format, over the file's bytes); where trusted keys are
required, one without a signature of theirs is refused, and the threshold is
taken from the very bytes whose signature was checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import defaults
from ..core import signing
from ..core.bundle import MANIFEST_NAME, read_regular
from ..errors import MradError
from ..files import sha256_of, sync_directory, write_atomic
from .document import Format, FormatError

CALIBRATION_SUFFIX = ".calibration.json"
ENROLLED_NAME = "calibration.json"  # inside an enrollment folder given on its own (mrad-enroll --enrollment)
DEFAULT_QUANTILE = defaults.CALIBRATION_QUANTILE
MAX_CALIBRATION_BYTES = 16 * 2 ** 20  # a million scores; a larger file is not a calibration
FORMAT_NAME, FORMAT_VERSION = "mrad-calibration", 1
# Files written before calibrations named their format are format 1.
CALIBRATION = Format(name=FORMAT_NAME, newest=FORMAT_VERSION, schema="calibration-v1.schema.json", unversioned=1)


@dataclass(frozen=True)
class Calibration:
    threshold: float
    quantile: float
    retrieval: str
    manifest_sha256: str
    scores: list[float]
    created: str
    enrollment: int | None = None  # the enrollment version scored with (None: zero-shot)

    def summary(self) -> str:
        s = np.asarray(self.scores)
        return (f"{len(s)} known-good images: min {s.min():.6f}, median {np.median(s):.6f}, max {s.max():.6f}; "
                f"threshold {self.threshold:.6f} (quantile {self.quantile}, retrieval {self.retrieval}, "
                f"{_enrollment(self.enrollment)})")


def default_path(bundle: Path, enrollment: Path | None = None) -> Path:
    """Where a threshold is kept: with an enrollment folder of its own (a recipe's), inside it; else beside the
    bundle. A product's threshold so travels with the product's enrollment, never with a shared bundle."""
    if enrollment is not None:
        return Path(enrollment).resolve() / ENROLLED_NAME
    bundle = Path(bundle).resolve()
    return bundle.with_name(bundle.name + CALIBRATION_SUFFIX)


def _enrollment(version: int | None) -> str:
    return f"enrollment version {version}" if version is not None else "nothing enrolled"


def images_needed(quantile: float) -> int:
    """Scores needed before ``quantile`` lies below their maximum, so that it is estimated rather than extrapolated."""
    return 1 if quantile >= 1.0 else int(np.ceil(1.0 / (1.0 - quantile)))


def calibrate(scores: list[float], quantile: float, retrieval: str, bundle: Path,
              enrollment: int | None = None) -> Calibration:
    if not scores:
        raise MradError("no known-good image could be scored: calibration needs at least one")
    return Calibration(
        threshold=float(np.quantile(scores, quantile)),
        quantile=quantile,
        retrieval=retrieval,
        manifest_sha256=sha256_of(Path(bundle) / MANIFEST_NAME),
        scores=[float(s) for s in scores],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        enrollment=enrollment,
    )


def signature_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + signing.SIGNATURE_SUFFIX)


def save(calibration: Calibration, path: Path, signer: signing.Signer | None = None) -> None:
    """Write ``calibration`` to ``path``; with ``signer``, signed (``<path>.sig``). Without one, a signature left
    by an earlier calibration is removed: it signs other bytes."""
    path = Path(path)
    document = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(calibration)}
    data = (json.dumps(document, indent=2) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if signer is None:
            write_atomic(path, data)
            signature_path(path).unlink(missing_ok=True)
            return
        _save_signed(data, path, signer)
    except OSError as exc:  # a full disk, a read-only folder, a file where a folder should be
        raise MradError(f"calibration {path} cannot be written: {exc.strerror or exc}") from exc


def _save_signed(data: bytes, path: Path, signer: signing.Signer) -> None:
    """The bytes signed in a folder of this process's own (mode 0700) beside ``path``, so that what is signed is
    what is written; then the signature and the file are put in place, each in one rename."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (staging / path.name).write_bytes(data)
        signer.sign(staging / path.name, staging / signature_path(path).name)
        for name in (signature_path(path).name, path.name):
            with open(staging / name, "rb+") as handle:
                os.fsync(handle.fileno())
            (staging / name).chmod(0o644)
            os.replace(staging / name, path.parent / name)
        sync_directory(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(path: Path, bundle: Path, retrieval: str, trusted_keys: Sequence[str | Path] = (),
         bundle_sha: str | None = None) -> Calibration:
    """Read a calibration and check it belongs to this bundle and retrieval mode.

    The enrollment version it was measured with is the caller's to compare
    (:class:`~mrad.runtime.line.policy.DecisionPolicy` marks it stale): an
    enrollment changed since never stops a line. ``trusted_keys``: the file must be signed by one of them (its
    bytes, read once, are checked and then parsed). ``bundle_sha``: the sha256 of the bundle's manifest as loaded
    (default: read from the bundle).
    """
    try:
        data = read_regular(Path(path), MAX_CALIBRATION_BYTES, "calibration")
    except MradError as exc:
        raise MradError(f"{exc}; run mrad-calibrate again") from exc
    if trusted_keys:
        signing.signed_file(Path(path), data, trusted_keys, "calibration",
                            "measure the threshold again, signed (mrad-calibrate --sign-key KEY.pem)")
    try:
        raw = json.loads(data.decode(), parse_constant=_no_constants)
    except ValueError as exc:  # JSON and UTF-8 errors alike
        raise MradError(f"calibration {path} could not be read ({exc}); run mrad-calibrate again") from exc
    try:
        calibration = Calibration(**CALIBRATION.read(raw))
    except FormatError as exc:
        raise MradError(f"calibration {path} is damaged ({exc.problem}); run mrad-calibrate again") from exc
    if calibration.manifest_sha256 != (bundle_sha or sha256_of(Path(bundle) / MANIFEST_NAME)):
        raise MradError(f"calibration {path} was measured with another bundle; run mrad-calibrate for {bundle}")
    if calibration.retrieval != retrieval:
        raise MradError(f"calibration {path} was measured with retrieval {calibration.retrieval!r}, "
                        f"this run uses {retrieval!r}; calibrate again or pass --retrieval {calibration.retrieval}")
    return calibration


def _no_constants(name: str):
    raise ValueError(f"{name} is not a threshold")
