"""The operators of the status page: the `[web] operators_file` and its hashes.

Contract:
- The file has one operator a line, ``name:secret``; blank lines and lines
  starting with ``#`` are ignored.  ``name`` is 1-64 letters, digits, ``.``,
  ``-``, ``_``, ``@``.  ``secret`` is either a password hash made by
  `hash_password` (``fermoposta web passwd NAME`` prints the whole line) or
  ``sha256:<64 hex digits>``, the SHA-256 fingerprint of a client
  certificate that verifies against ``[tls] client_ca`` (colons between the
  hex pairs allowed).  An operator may have several lines (a password and
  a certificate).
- The hash is the stdlib's scrypt (RFC 7914) in PHC string form:
  ``$scrypt$n=16384,r=8,p=1$<salt>$<key>``, salt 16 random bytes, key 32
  bytes, both base64 without padding.  `verify_password` recomputes it with
  the parameters written in the line (so stronger ones can be used later)
  and compares in constant time; a malformed hash never matches.
- `load_operators(path)` re-reads the file (each login does, so an edit
  takes effect at once, without SIGHUP); a malformed line raises
  `OperatorsFileError` naming the file and the line number, never a secret.
  An unreadable file raises it too.
- `register(subparsers)` adds ``fermoposta web passwd NAME`` (the password
  from ``--password-file`` or the first line of stdin, like ``account add``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fermoposta.cli_help import COMMAND_HELP
from fermoposta.passwords import first_line, read_password_file

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_HASH = re.compile(r"\$scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")
_FINGERPRINT = re.compile(r"sha256:((?:[0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2})")
#: A hash nobody can match: unknown names cost one scrypt too.
_DUMMY = f"$scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${'A' * 22}${'A' * 43}"


class OperatorsFileError(ValueError):
    """The operators file cannot be read or has a malformed line."""


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    hashes: tuple[str, ...] = ()
    fingerprints: frozenset[str] = field(default_factory=frozenset)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The PHC string of `password` (see the module docstring)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                         p=SCRYPT_P, dklen=KEY_BYTES)
    return f"$scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(stored: str, password: str) -> bool:
    """Whether `password` matches the PHC string `stored` (constant time)."""
    match = _HASH.fullmatch(stored)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if n < 2 or n & (n - 1) or not (1 <= r <= 32 and 1 <= p <= 16 and n <= 2 ** 20):
        return False
    try:
        salt, key = _unb64(match.group(4)), _unb64(match.group(5))
        computed = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                                  dklen=len(key), maxmem=256 * 1024 * 1024)
    except (binascii.Error, ValueError, MemoryError):
        return False
    return hmac.compare_digest(computed, key)


def check_password(operators: dict[str, Operator], name: str, password: str) -> bool:
    """Whether `name` is an operator and `password` matches one of its hashes;
    an unknown name spends one scrypt too (no timing oracle)."""
    operator = operators.get(name)
    if operator is None or not operator.hashes:
        verify_password(_DUMMY, password)
        return False
    return any(verify_password(h, password) for h in operator.hashes)


def operator_for_certificate(operators: dict[str, Operator], fingerprint: str) -> str | None:
    """The operator whose line names this certificate fingerprint (lowercase hex)."""
    for operator in operators.values():
        if fingerprint in operator.fingerprints:
            return operator.name
    return None


def load_operators(path: Path) -> dict[str, Operator]:
    """Read the operators file (see the module docstring)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OperatorsFileError(f"cannot read the operators file {path}: {exc}") from None
    hashes: dict[str, list[str]] = {}
    prints: dict[str, set[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not _NAME.fullmatch(name):
            raise OperatorsFileError(f"{path}, line {number}: expected name:hash "
                                     "(a name of letters, digits, . - _ @)")
        fingerprint = _FINGERPRINT.fullmatch(secret)
        if fingerprint is not None:
            prints.setdefault(name, set()).add(fingerprint.group(1).replace(":", "").lower())
        elif _HASH.fullmatch(secret):
            hashes.setdefault(name, []).append(secret)
        else:
            raise OperatorsFileError(
                f"{path}, line {number}: operator {name}: not a hash from "
                "`fermoposta web passwd` nor sha256:<certificate fingerprint>")
    return {name: Operator(name, tuple(hashes.get(name, ())), frozenset(prints.get(name, ())))
            for name in sorted(set(hashes) | set(prints))}


def _cmd_passwd(args: argparse.Namespace) -> int:
    if not _NAME.fullmatch(args.name):
        print(f"fermoposta: web passwd: {args.name!r}: a name is 1-64 letters, digits, "
              ". - _ @", file=sys.stderr)
        return 64
    try:
        password = (read_password_file(args.password_file) if args.password_file
                    else first_line(sys.stdin, "stdin"))
    except ValueError as exc:
        print(f"fermoposta: web passwd: {exc}", file=sys.stderr)
        return 66  # EX_NOINPUT
    print(f"{args.name}:{hash_password(password)}")
    return 0


def register(commands: Any) -> None:
    """Add ``web passwd`` to the CLI's subcommands (an argparse subparsers action)."""
    web = commands.add_parser("web", help=COMMAND_HELP["web"])
    cmds = web.add_subparsers(dest="web_command", metavar="COMMAND")
    passwd = cmds.add_parser(
        "passwd", help="print an operators_file line NAME:HASH for a password",
        description="Print a line for [web] operators_file: NAME, a colon and the scrypt "
        "hash of the password (the first line of --password-file, else of stdin). "
        "Append it to the file; the next login reads it.")
    passwd.add_argument("name", metavar="NAME")
    passwd.add_argument("--password-file", type=Path, default=None, metavar="FILE",
                        help="read the password from the first line of FILE")
    passwd.set_defaults(command_func=_cmd_passwd)
    def usage(args: argparse.Namespace) -> int:
        web.print_help(sys.stderr)
        return 64

    web.set_defaults(command_func=usage)
