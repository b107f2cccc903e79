"""Signed bundles, enrollments and calibrations: who made what decides, not only whether its files still match.

A manifest's checksums prove integrity, and anyone who can write the bundle
can rewrite them. A signature proves origin. Everything that decides a
verdict is signed in the OpenSSF model-signing format (a Sigstore bundle
over the sha256 of every file, key-based, works offline), and refused when a
trusted key is required and its signature is missing or not one of theirs:

- a bundle: ``model.sig`` beside its manifest, by the release key
  (``mrad-sign``, ``mrad-export --sign-key``); its enrollment folder (the
  line's own memories) and the signature itself are left out;
- an enrollment version: ``enrollment.sig`` in its folder, made by the
  enrollment's owner when it saves the version with a signing key
  (``mrad-enroll --sign-key``, the station file's ``sign-key``);
- a calibration: ``<calibration file>.sig`` beside it, made when it is written.

Loading checks the signature's envelope against the trusted keys first and
takes the signed sha256 of each file from it (:func:`signed_folder`,
:func:`signed_file`); each file is then read once and its bytes compared with
the signed digest before they are used (:class:`~mrad.runtime.core.bundle.BundleFiles`),
so a file swapped after the check is refused rather than loaded.

Keys: elliptic-curve keys on P-256, P-384 or P-521, in PEM (what
model-signing's key-based signatures take); any other key is refused in one
line. model-signing is the optional extra ``sign``: pip install "mrad-edge[sign]".
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import BundleError, MradError

SIGNATURE_NAME = "model.sig"
# Inside a bundle but not signed: the signature, and what enrollment and locking write there later.
UNSIGNED = (SIGNATURE_NAME, "enrollment", ".lock")
SIGNATURE_SUFFIX = ".sig"  # a signed file's signature: <file>.sig beside it
PASSWORD_ENV = "MRAD_SIGN_KEY_PASSWORD"  # a signing key's password, for commands and station files
ACCEPTED_KEYS = "elliptic-curve keys on P-256, P-384 or P-521 in PEM (openssl ecparam -name prime256v1 -genkey)"
_CURVES = ("secp256r1", "secp384r1", "secp521r1")
MAX_SIGNATURE_BYTES = 16 * 2 ** 20  # a signature lists one digest per file: kilobytes


def _model_signing():
    try:
        import model_signing
    except ModuleNotFoundError as exc:
        raise MradError('signing and verifying need the "sign" extra: pip install "mrad-edge[sign]"') from exc
    return model_signing


# -- keys ---------------------------------------------------------------------------------------------


def _key_kind(key) -> str | None:
    """None for a key model-signing takes, else what it is (for the one-line refusal)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return None if key.curve.name in _CURVES else f"an elliptic-curve key on {key.curve.name}"
    return f"a key of type {type(key).__name__.removesuffix('PublicKey').removesuffix('PrivateKey')}"


def public_key(path: str | Path):
    """A trusted public key (PEM), loaded and checked: one line naming the accepted types for any other."""
    _model_signing()  # cryptography comes with it
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise MradError(f"trusted key {path} is not a public key in PEM ({exc}); give the .pub of "
                        f"{ACCEPTED_KEYS}") from exc
    kind = _key_kind(key)
    if kind:
        raise MradError(f"trusted key {path} is {kind}; signatures here are checked with {ACCEPTED_KEYS}")
    return key


def trusted(keys: Sequence[str | Path]) -> tuple[Path, ...]:
    """The trusted keys as paths, each checked to be a key a signature can be verified with."""
    for key in keys:
        public_key(key)
    return tuple(Path(key) for key in keys)


def _pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Signer:
    """A private key that signs what this process writes; checked when given, so that a wrong key is one line
    at start rather than a traceback when a version is saved. ``password``: the key's, when it has one."""

    def __init__(self, private_key: str | Path, password: str | None = None):
        _model_signing()  # cryptography comes with it
        from cryptography.hazmat.primitives import serialization

        self.path, self._password = Path(private_key), password
        try:
            key = serialization.load_pem_private_key(self.path.read_bytes(), password.encode() if password else None)
        except (OSError, ValueError, TypeError) as exc:
            raise MradError(f"signing key {self.path} cannot be read as a private key in PEM ({exc}); give "
                            f"{ACCEPTED_KEYS}" + (f", its password in {PASSWORD_ENV}" if not password else "")) from exc
        kind = _key_kind(key)
        if kind:
            raise MradError(f"signing key {self.path} is {kind}; model-signing signs with {ACCEPTED_KEYS}")
        self.public_pem = _pem(key.public_key())

    @classmethod
    def from_environment(cls, private_key: str | Path | None) -> "Signer | None":
        """The signer of a command's --sign-key or a station's sign-key, its password from ``PASSWORD_ENV``."""
        return None if private_key is None else cls(private_key, os.environ.get(PASSWORD_ENV))

    def check_trusted(self, trusted_keys: Sequence[str | Path], what: str) -> None:
        """What this key signs must load where ``trusted_keys`` are required: its public half must be one of them."""
        if trusted_keys and not any(_pem(public_key(k)) == self.public_pem for k in trusted_keys):
            raise MradError(f"signing key {self.path}: its public key is not among the trusted keys "
                            f"({', '.join(str(k) for k in trusted_keys)}), so {what} it signs would be refused; "
                            "add its .pub to the trusted keys, or sign with the key they trust")

    def sign(self, target: Path, signature: Path, ignored: Sequence[str] = ()) -> Path:
        """Sign ``target`` (a folder, its files but ``ignored`` names at its top; or one file) into ``signature``."""
        model_signing = _model_signing()
        target = _absolute(target)
        config = model_signing.signing.Config().use_elliptic_key_signer(
            private_key=self.path, password=self._password.encode() if self._password else None)  # it wants bytes
        if target.is_dir():
            config = config.set_hashing_config(model_signing.hashing.Config().set_ignored_paths(
                paths=[target / name for name in ignored]))
        try:
            config.sign(target, signature)
        except (ValueError, TypeError, OSError) as exc:
            raise MradError(f"{target} could not be signed with {self.path}: {exc}") from exc
        return signature


def sign(bundle: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Sign every file of ``bundle`` with an elliptic-curve private key (PEM); returns the signature's path."""
    bundle = _absolute(bundle)
    signer = Signer(private_key, password)
    _check_plain_tree(bundle)
    return signer.sign(bundle, bundle / SIGNATURE_NAME, UNSIGNED)


# -- verifying ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """A signature checked against a trusted key: the key, and the sha256 (hex) it signed for each file by name
    (relative, POSIX); a single signed file is named ``"."``."""

    key: Path
    digests: Mapping[str, str]


def signed_folder(signature: Path, trusted_keys: Sequence[str | Path], what: str) -> Signed:
    """The digests a folder's signature holds, once the signature is found to be by one of ``trusted_keys``.

    The files are not read here: each is compared with its digest when it is loaded, on the bytes loaded.
    ``what`` names the folder in messages ("bundle B", "enrollment version 3").
    """
    if not signature.is_file() or signature.is_symlink():
        raise BundleError(f"{what} is not signed ({signature.name} is missing) and a trusted key is required")
    return _envelope(signature, trusted_keys, what)


def signed_bundle(bundle: str | Path, trusted_keys: Sequence[str | Path]) -> Signed:
    """A bundle's signed digests (its ``model.sig`` checked against ``trusted_keys``)."""
    bundle = _absolute(bundle)
    return signed_folder(bundle / SIGNATURE_NAME, trusted_keys, f"bundle {bundle}")


def signed_file(path: Path, data: bytes, trusted_keys: Sequence[str | Path], what: str, remedy: str) -> Path:
    """Check that ``data``, the bytes read from ``path``, are what ``<path>.sig`` signed with a trusted key;
    returns the key. The file's name is not part of what is signed (a bundle folder may be renamed). ``what``
    names the file in messages, ``remedy`` says what to do."""
    import hashlib

    signature = path.with_name(path.name + SIGNATURE_SUFFIX)
    if not signature.is_file() or signature.is_symlink():
        raise MradError(f"{what} {path} is not signed ({signature.name} is missing) and a trusted key is required; "
                        + remedy)
    try:
        signed = _envelope(signature, trusted_keys, f"{what} {path}", MradError)
    except MradError as exc:
        raise MradError(f"{exc}; {remedy}") from exc
    if list(signed.digests.values()) != [hashlib.sha256(data).hexdigest()]:
        raise MradError(f"{what} {path} is not signed by a trusted key, or was changed after signing "
                        f"(its sha256 is not the signed one); {remedy}")
    return signed.key


def _envelope(signature: Path, trusted_keys: Sequence[str | Path], what: str, error=BundleError) -> Signed:
    """The signed digests of ``signature``, checked against each trusted key in turn.

    model-signing's public ``verify`` hashes the files itself, from disk, and the runtime would then read them
    again: between the two a file can be swapped (the encoder was, in 2 to 4 runs of 30). Its key verifier (what
    that ``verify`` calls first) checks the envelope alone; the files' bytes are then compared by the loader.
    """
    _model_signing()
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    from .bundle import read_regular

    if not trusted_keys:
        raise MradError("no trusted key given")
    try:
        data = read_regular(signature, MAX_SIGNATURE_BYTES, f"{what}: signature")
    except BundleError as exc:  # a FIFO put in its place, or a signature of megabytes
        raise error(f"{exc}; sign it again") from exc
    try:
        envelope = _parsed(sign_sigstore_pb, data)
    except Exception as exc:  # noqa: BLE001 - JSON, protobuf and key errors of a damaged signature
        raise error(f"{what}: {signature.name} is not a model-signing signature ({str(exc)[:200]}); sign it again") from exc
    reasons = []
    for key in trusted_keys:
        public_key(key)
        try:
            manifest = sign_ec_key.Verifier(Path(key)).verify(envelope)
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError, InvalidSignature and others
            reasons.append(f"{Path(key).name}: {str(exc) or type(exc).__name__}")
            continue
        serialization = manifest.serialization_type
        if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
            raise error(f"{what} is signed with {serialization.get('method')}/{serialization.get('hash_type')} "
                        "digests; this runtime checks files by sha256: sign it again with mrad-edge")
        digests = {d.identifier: d.digest.digest_hex for d in manifest.resource_descriptors()
                   if d.digest.algorithm == "sha256"}
        return Signed(Path(key), digests)
    raise error(f"{what} is not signed by a trusted key, or was changed after signing (" + "; ".join(reasons)[:500] + ")")


def _parsed(sign_sigstore_pb, data: bytes):
    """model-signing's reader of a signature file, given the bytes already read (it reads only by name)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mrad-signature-") as private:
        copy = Path(private) / SIGNATURE_NAME
        copy.write_bytes(data)
        return sign_sigstore_pb.Signature.read(copy)


def verify(bundle: str | Path, trusted_keys: Sequence[str | Path]) -> Path:
    """Check that every file of ``bundle`` is what one of ``trusted_keys`` signed (mrad-sign --verify); returns
    the key. Loading a bundle checks each file as it reads it instead (:func:`signed_bundle`)."""
    model_signing = _model_signing()
    bundle = _absolute(bundle)
    signature = bundle / SIGNATURE_NAME
    if not signature.is_file() or signature.is_symlink():
        raise BundleError(f"bundle {bundle} is not signed ({SIGNATURE_NAME} is missing) and a trusted key is required")
    _check_plain_tree(bundle)
    reasons = []
    for key in trusted_keys:
        public_key(key)
        try:
            (model_signing.verifying.Config().use_elliptic_key_verifier(public_key=Path(key))
             .set_hashing_config(model_signing.hashing.Config().set_ignored_paths(
                 paths=[bundle / name for name in UNSIGNED])).verify(bundle, signature))
            return Path(key)
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError and others for any mismatch
            reasons.append(f"{Path(key).name}: {exc}")
    raise BundleError(f"bundle {bundle} is not signed by a trusted key, or was changed after signing ("
                      + "; ".join(reasons)[:500] + ")")


def require_signer(trusted_keys: Sequence[str | Path], signer: Signer | None, what: str) -> Signer | None:
    """The signer for writing ``what``; where trusted keys are required an unsigned write is refused at once,
    since the next load would refuse what it wrote."""
    if trusted_keys and signer is None:
        raise MradError(f"{what} must be signed, since a trusted key is required: give a signing key whose public "
                        "key is trusted (mrad-enroll and mrad-calibrate --sign-key KEY.pem; sign-key in the "
                        "station file)")
    return signer


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
