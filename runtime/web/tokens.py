"""The token the operator page's changes need: made up, or given in a file or the environment, and strong enough.

A token must carry :data:`MIN_TOKEN_BITS` bits: 22 characters of
``secrets.token_urlsafe`` (132 bits), 32 hex digits; a word or ``s3cret`` is
refused with a line saying how to make one. It is best read from a file
(``--web-token-file``, its first line) or the environment
(``MRAD_WEB_TOKEN``): a ``--web-token`` on the command line is seen by every
user of the machine in the process list.
"""

from __future__ import annotations

import math
import secrets
import string
from pathlib import Path

from ..errors import MradError

TOKEN_ENV = "MRAD_WEB_TOKEN"
MIN_TOKEN_BITS = 128
TOKEN_BYTES = 16  # a token made up: 16 random bytes, 22 characters
MAKE_TOKEN = "python -c \"import secrets; print(secrets.token_urlsafe(16))\""
# The usual alphabets of random tokens, smallest first: a token's bits are counted in the smallest that holds it.
ALPHABETS = tuple(sorted({frozenset(a) for a in (
    string.digits, string.digits + "abcdef", string.digits + "ABCDEF", string.ascii_lowercase, string.ascii_uppercase,
    string.digits + string.ascii_lowercase, string.digits + string.ascii_uppercase, string.ascii_letters,
    string.ascii_letters + string.digits, string.ascii_letters + string.digits + "-_",
    string.ascii_letters + string.digits + "+/=")}, key=len))
PRINTABLE = 95  # any other printable ASCII character: the alphabet of everything typed


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_bits(token: str) -> float:
    """The bits a token carries at most: its length times log2 of the smallest usual alphabet that holds it.

    An upper bound for a random token, never more than it can hold: a token of one repeated character carries none.
    """
    chars = set(token)
    if len(chars) < 2:
        return 0.0
    size = next((len(a) for a in ALPHABETS if chars <= a), PRINTABLE)
    return len(token) * math.log2(size)


def check_token(token: str, where: str) -> str:
    """``token`` when it is printable and carries MIN_TOKEN_BITS bits; else one line saying how to make one."""
    if not token or not token.isprintable() or token != token.strip():
        raise MradError(f"{where}: a token is printable, with no space at its ends; make one with {MAKE_TOKEN}")
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise MradError(f"{where}: a token of {len(token)} characters (at most {bits:.0f} bits) can be guessed; it "
                        f"needs {MIN_TOKEN_BITS} bits: make one with {MAKE_TOKEN}")
    return token


def page_token(given: str | None, token_file: Path | None, where: str = "--web-token") -> str | None:
    """The token given: ``token_file``'s first line (over ``given``), else ``given`` (from ``where``), checked;
    None when there is none (the page then makes one up)."""
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise MradError(f"--web-token-file {token_file} cannot be read: {getattr(exc, 'strerror', None) or exc}") \
                from exc
        return check_token(lines[0].strip() if lines else "", f"--web-token-file {token_file}")
    return check_token(given, where) if given else None
