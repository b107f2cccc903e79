"""mrad-sign: sign a bundle with a private key, or check its signature against trusted public keys.

Also the options every command that loads a bundle (--trusted-key) or writes what decides (--sign-key) shares.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..core import signing
from ..core.bundle import read_manifest
from .common import bundle_option, command
from ..errors import MradError

EXAMPLES = """
\b
Examples:
  # a key pair (elliptic curve P-256), once; keep the private key off the line PCs
  openssl ecparam -name prime256v1 -genkey -noout -out signer.pem
  openssl ec -in signer.pem -pubout -out signer.pub
\b
  mrad-sign --bundle bundles/visa-tf --key signer.pem
  mrad-sign --bundle bundles/visa-tf --verify --trusted-key signer.pub
  mrad-run --bundle bundles/visa-tf --trusted-key signer.pub --camera 0
\b
The signature (model.sig, OpenSSF model-signing format) covers every file of the bundle but its
enrollment folder, which the line changes: each enrollment version and each calibration is signed
on its own when it is written (mrad-enroll and mrad-calibrate --sign-key, a station file's
sign-key), and where a trusted key is required all three are checked. Keys: elliptic curve
P-256, P-384 or P-521 (PEM). Needs the 'sign' extra: pip install "mrad-edge[sign]".
"""

trusted_key_option = click.option(
    "--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Public key (PEM) whose signature the bundle, its enrollment version and its calibration must carry "
         "(mrad-sign, --sign-key); repeatable, and added to a station file's trusted-keys.")
sign_key_option = click.option(
    "--sign-key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help=f"Private key (PEM, elliptic curve) that signs the enrollment versions and calibrations written here; "
         f"needed where a key is trusted. Its password, if any, in {signing.PASSWORD_ENV} [default: the station "
         "file's sign-key].")


@command("mrad-sign", epilog=EXAMPLES)
@bundle_option
@click.option("--key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Private key (PEM) to sign with.")
@click.option("--password-env", metavar="VARIABLE", help="Environment variable holding the private key's password.")
@click.option("--verify", is_flag=True, help="Check the signature instead of writing one.")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Public key (PEM) a --verify accepts; repeatable.")
def main(bundle, key, password_env, verify, trusted_keys):
    """Sign a bundle (model.sig beside its manifest), or verify it against trusted keys."""
    read_manifest(bundle)  # a bundle whose files already fail their checksums is neither signed nor verified
    if verify:
        if not trusted_keys or key:
            raise MradError("--verify checks against --trusted-key PUB (one or more), not --key")
        signer = signing.verify(bundle, trusted_keys)
        click.echo(f"{bundle}: signature valid, signed by the key in {signer}")
        return
    if not key or trusted_keys:
        raise MradError("pass --key PRIVATE.pem to sign, or --verify with --trusted-key PUBLIC.pem")
    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise MradError(f"--password-env {password_env}: that environment variable is not set")
    click.echo(f"signed: {signing.sign(bundle, key, password)}")
