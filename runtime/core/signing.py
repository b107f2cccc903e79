"""Signed bundles: who made a bundle, not only whether its files still match its manifest.

A manifest's checksums prove integrity, and anyone who can write the bundle
can rewrite them. A signature proves origin: ``sign`` writes ``model.sig`` in
the OpenSSF model-signing format (a Sigstore bundle over the digest of every
file, key-based, works offline); ``verify`` checks it against trusted public
keys. The enrollment folder (the line's own memories, which change on the
line) and the signature itself are left out of what is signed.

model-signing is the optional extra ``sign``: pip install "mrad-edge[sign]".
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence

from ..errors import BundleError, MradError

SIGNATURE_NAME = "model.sig"
# Inside a bundle but not signed: the signature, and what enrollment and locking write there later.
UNSIGNED = (SIGNATURE_NAME, "enrollment", ".lock")


def _model_signing():
    try:
        import model_signing
    except ModuleNotFoundError as exc:
        raise MradError('signing and verifying bundles need the "sign" extra: pip install "mrad-edge[sign]"') from exc
    return model_signing


def _hashing(model_signing, bundle: Path):
    return model_signing.hashing.Config().set_ignored_paths(paths=[bundle / name for name in UNSIGNED])


def sign(bundle: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Sign every file of ``bundle`` with an elliptic-curve private key (PEM); returns the signature's path."""
    model_signing = _model_signing()
    bundle = _absolute(bundle)
    _check_plain_tree(bundle)
    signature = bundle / SIGNATURE_NAME
    try:
        (model_signing.signing.Config().use_elliptic_key_signer(private_key=Path(private_key), password=password)
         .set_hashing_config(_hashing(model_signing, bundle)).sign(bundle, signature))
    except (ValueError, TypeError, OSError) as exc:
        raise MradError(f"bundle {bundle} could not be signed with {private_key}: {exc}") from exc
    return signature


def verify(bundle: str | Path, trusted_keys: Sequence[str | Path]) -> Path:
    """Check that ``bundle`` is signed by one of ``trusted_keys`` (public keys, PEM); returns the key that signed."""
    model_signing = _model_signing()
    bundle = _absolute(bundle)
    signature = bundle / SIGNATURE_NAME
    if not signature.is_file() or signature.is_symlink():
        raise BundleError(f"bundle {bundle} is not signed ({SIGNATURE_NAME} is missing) and a trusted key is required")
    _check_plain_tree(bundle)
    reasons = []
    for key in trusted_keys:
        try:
            (model_signing.verifying.Config().use_elliptic_key_verifier(public_key=Path(key))
             .set_hashing_config(_hashing(model_signing, bundle)).verify(bundle, signature))
            return Path(key)
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError and others for any mismatch
            reasons.append(f"{Path(key).name}: {exc}")
    raise BundleError(f"bundle {bundle} is not signed by a trusted key, or was changed after signing ("
                      + "; ".join(reasons)[:500] + ")")


def _absolute(bundle: str | Path) -> Path:
    """The bundle as an absolute path: model-signing hashes files by their absolute paths, and its ignored paths
    (the signature, the enrollment) given relative would match none of them, so a signature made or checked
    through a relative path would name model.sig among the files it covers."""
    return Path(os.path.abspath(bundle))


def _check_plain_tree(bundle: Path) -> None:
    """Only regular files and folders: hashing a FIFO would block, a link could lead anywhere."""
    for folder, dirs, files in os.walk(bundle):
        if Path(folder) == bundle:
            dirs[:] = [d for d in dirs if d not in UNSIGNED]
            files = [f for f in files if f not in UNSIGNED]
        for name in dirs + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError(f"bundle is corrupt: {path.relative_to(bundle)} is not a regular file or folder")
