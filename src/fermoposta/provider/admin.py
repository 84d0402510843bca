"""What the admin subcommands (`account`, `domain`, `queue`) share.

Contract: a handler is ``(args, store) -> exit code``; `guarded()` maps the
exceptions a handler may raise to sysexits codes with one line on stderr
(``fermoposta: <message>``, control characters replaced): `UsageError` 64,
`UnreadableInputError` 66, any other `ValueError` (`DataError` included) 65,
`StoreError` 75.  Anything else is a bug and propagates (the CLI prints it
and exits 70).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from fermoposta.passwords import UnreadableInputError
from fermoposta.store.base import Store, StoreError

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_TEMPFAIL = 75

Handler = Callable[[argparse.Namespace, Store], int]

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class UsageError(Exception):
    """Bad command-line arguments (exit code 64)."""


class DataError(ValueError):
    """Unknown names or ids, duplicates and the like (exit code 65)."""


def safe(text: str) -> str:
    """`text` without control characters (a reply or address cannot drive the terminal)."""
    return _UNSAFE.sub("?", text)


def error(message: str) -> None:
    print(f"fermoposta: {safe(message)}", file=sys.stderr)


def guarded(func: Handler) -> Handler:
    """Map exceptions to exit codes and messages on stderr."""

    def handler(args: argparse.Namespace, store: Store) -> int:
        try:
            return func(args, store)
        except UsageError as exc:
            error(str(exc))
            return EX_USAGE
        except UnreadableInputError as exc:
            error(str(exc))
            return EX_NOINPUT
        except ValueError as exc:
            error(str(exc))
            return EX_DATAERR
        except StoreError as exc:
            error(f"store unavailable: {exc}")
            return EX_TEMPFAIL

    handler.__name__ = func.__name__
    handler.__doc__ = func.__doc__
    return handler
