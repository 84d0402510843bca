"""What operators type for accounts and domains, checked and normalised;
helpers usable outside the CLI (the demo, the tests and benchmarks use
`make_scram_secret`).

Contract:
- `make_scram_secret(password, iterations)`: a salted SCRAM-SHA-256
  verifier (SASLprep by scramp); ValueError, without the password, if
  SASLprep refuses it or the count is out of range.
- `read_password_stdin()`: stdin's first line without its line ending;
  `UnreadableInputError` if it cannot be read or is not UTF-8.
- `normalize_domain(name)`: lowercase A-labels (`idna`, UTS 46), no trailing
  dot; single-label, empty, invalid or longer than 253: ValueError.
  `usage_domain` is the same for the CLI (a usage error, 64).
- `normalize_fingerprint(text)`: the SHA-256 of a certificate as 64
  lowercase hex digits, from "AA:BB:..." or plain hex; `normalize_cert_subject`:
  the canonical RFC 4514 form (`smtp.x509name.normalize_subject`, what EXTERNAL
  applies to the peer's certificate); `subject_looks_reversed`: most general
  RDN first (C or DC), likely `openssl x509 -subject` without -nameopt
  RFC2253.  Malformed: ValueError.
- `read_recipients_file(path)`: lowercased local parts, one a line (blank
  lines and `#` comments skipped); `UnreadableInputError` if unreadable,
  ValueError for a line that is not a local part.
- `table(header, rows)`: the aligned plain-text table of the list commands.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import idna

from fermoposta.passwords import UnreadableInputError, first_line
from fermoposta.provider.admin import UsageError as _UsageError
from fermoposta.smtp.x509name import normalize_subject, parse_subject
from fermoposta.store.base import ScramSecret

__all__ = [
    "DEFAULT_SCRAM_ITERATIONS",
    "make_scram_secret",
    "normalize_cert_subject",
    "normalize_domain",
    "normalize_fingerprint",
    "read_password_stdin",
    "read_recipients_file",
    "subject_looks_reversed",
    "table",
    "usage_domain",
]

DEFAULT_SCRAM_ITERATIONS = 4096

_HEX = re.compile(r"[0-9a-f]{64}\Z")


def make_scram_secret(password: str, iterations: int = DEFAULT_SCRAM_ITERATIONS) -> ScramSecret:
    """Salted SCRAM-SHA-256 verifier of `password` (SASLprep applied by scramp).

    Raises ValueError (without the password in the message) if SASLprep refuses
    the password or the iteration count is out of scramp's range.
    """
    import scramp  # here: every admin command imports this module, few make secrets

    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    try:
        salt, stored_key, server_key, count = mechanism.make_auth_info(
            password, iteration_count=iterations
        )
    except scramp.ScramException as exc:
        if "iteration" in str(exc).lower():
            raise ValueError(f"bad SCRAM iteration count {iterations}: {exc}") from None
        raise ValueError("the password contains characters SASLprep prohibits") from None
    return ScramSecret(
        salt=bytes(salt),
        iterations=int(count),
        stored_key=bytes(stored_key),
        server_key=bytes(server_key),
    )


def read_password_stdin(stream: TextIO | None = None) -> str:
    """The first line of stdin (or `stream`) without its line ending."""
    try:
        return first_line(stream if stream is not None else sys.stdin, "stdin")
    except UnicodeDecodeError:
        raise UnreadableInputError("stdin: the password is not UTF-8") from None
    except OSError as exc:
        raise UnreadableInputError(f"cannot read the password from stdin: {exc}") from None


def normalize_domain(name: str) -> str:
    """Lowercase A-label form of `name` (trailing dot dropped); ValueError if invalid."""
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty domain name")
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise ValueError(f"invalid domain name {name!r}: {exc}") from None
    if "." not in ascii_name:
        raise ValueError(f"invalid domain name {name!r}: a single label is not a mail domain")
    if len(ascii_name) > 253:
        raise ValueError(f"invalid domain name {name!r}: longer than 253 characters")
    return ascii_name


def normalize_fingerprint(text: str) -> str:
    """64 lowercase hex digits from "AA:BB:..." or plain hex; ValueError if not SHA-256."""
    hexdigits = text.strip().replace(":", "").lower()
    if not _HEX.match(hexdigits):
        raise ValueError(
            f"invalid certificate fingerprint {text!r}: expected the SHA-256 of the "
            "certificate as 64 hex digits (colons allowed)"
        )
    return hexdigits


def normalize_cert_subject(text: str) -> str:
    """The canonical RFC 4514 form of a certificate subject; ValueError if malformed."""
    try:
        subject = normalize_subject(text)
    except ValueError as exc:
        raise ValueError(
            f"invalid certificate subject {text!r}: {exc} (expected an RFC 4514 name, most "
            'specific first, like "CN=customer,O=Example Ltd,C=IT")'
        ) from None
    return subject


def read_recipients_file(path: str | Path) -> frozenset[str]:
    """Local parts, one a line (blank lines and `#` comments skipped), lowercased."""
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except UnicodeDecodeError:
        raise UnreadableInputError(f"{path}: the recipients file is not UTF-8") from None
    except OSError as exc:
        raise UnreadableInputError(
            f"cannot read recipients file {path}: {exc.strerror or exc}"
        ) from None
    result: set[str] = set()
    for number, raw in enumerate(lines, 1):
        local = raw.strip()
        if not local or local.startswith("#"):
            continue
        if "@" in local or any(c.isspace() for c in local):
            raise ValueError(f"{path}:{number}: not a local part: {local!r}")
        result.add(local.lower())
    return frozenset(result)


def usage_domain(name: str) -> str:
    try:
        return normalize_domain(name)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def subject_looks_reversed(subject: str) -> bool:
    """True if `subject` starts with C or DC and goes on with more specific RDNs:
    likely most general first (`openssl x509 -subject` without -nameopt RFC2253)."""
    general = {"C", "DC"}
    rdns = parse_subject(subject)
    return (
        len(rdns) > 1
        and all(kind in general for kind, _ in rdns[0])
        and any(kind not in general for rdn in rdns[1:] for kind, _ in rdn)
    )


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    all_rows = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in all_rows
    )
