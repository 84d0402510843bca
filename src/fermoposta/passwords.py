"""Reading a password from a file or stdin (admin commands and the customer).

Contract: the password is the first line without its line ending (LF or
CRLF); leading and trailing spaces are part of it.  An empty first line is a
`ValueError`; a file that cannot be read or is not UTF-8 raises
`UnreadableInputError` (a ValueError).  Messages name the source, never the
password.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO


class UnreadableInputError(ValueError):
    """A password (or other input) file cannot be read."""


def first_line(stream: TextIO, source: str) -> str:
    password = stream.readline()
    if password.endswith("\n"):
        password = password[:-1]
    if password.endswith("\r"):
        password = password[:-1]
    if not password:
        raise ValueError(f"{source}: the password is empty")
    return password


def read_password_file(path: str | Path) -> str:
    """The first line of `path` without its line ending."""
    try:
        with open(path, encoding="utf-8", newline="") as stream:
            return first_line(stream, str(path))
    except UnicodeDecodeError:
        raise UnreadableInputError(f"{path}: the password file is not UTF-8") from None
    except OSError as exc:
        raise UnreadableInputError(
            f"cannot read password file {path}: {exc.strerror or exc}"
        ) from None
