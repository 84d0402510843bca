"""What the provider and customer config loaders share: value parsers and the keyed loader.

Contract:
- `ConfigError` is the one exception both loaders raise; its message names the
  file and the key (``customer.toml: [provider] port: expected an integer ...``).
  A loader that found several problems raises one `ConfigError` holding them
  all: `ConfigError.problems` (one line each, in the order found; its
  message is those lines joined).
- `parse_duration`, `parse_size`, `parse_hostport` turn TOML values into
  seconds (float), bytes (int) and ``(host, port)``; they raise ValueError with
  an ``expected ..., got ...`` text that `Loader.parse` prefixes with the file
  and the key.  The small ``check_*`` parsers and parser factories
  (`integer`, `size`, `duration`, `one_of`) work the same way.
- `Loader` knows the config file: `read()` parses the TOML (every failure a
  `ConfigError`), `error()` builds the keyed message, `report()` records one
  and `collecting()` records the `ConfigError` a step raises, so that
  independent steps all run; `finish()` raises every problem recorded so far
  as one `ConfigError`.  `check_keys()` records each unknown key with a "did
  you mean" hint (difflib against the declared names); `table()` loads one
  table from its declaration (`fermoposta.config_schema`): unknown keys,
  missing required keys and every key's check, all recorded, in file
  order.  `resolve()` makes a path relative to
  the config file's directory absolute, `existing_file()` also checks that it
  names a readable regular file; `optional_file()` does the same for a key
  that may be unset and records the problem instead of raising, so that a
  step checks every file it names.  A section label that starts with ``[`` is
  printed as is (``[[pull]] #2 [pull.delivery]``); any other is bracketed
  (``limits`` -> ``[limits]``).
- `LogConfig` (``[log]``) is the same table in both config files.
- No I/O apart from reading the config file and checking that files exist.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fermoposta.config_schema import declared_keys, key

__all__ = [
    "HOSTNAME_RE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ConfigError",
    "Loader",
    "LogConfig",
    "Parser",
    "check_boolean",
    "check_hostname",
    "check_string",
    "duration",
    "integer",
    "one_of",
    "optional_text",
    "parse_duration",
    "parse_hostport",
    "parse_size",
    "show_value",
    "size",
]

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[str, ...] = ("text", "json")


class ConfigError(Exception):
    """The configuration cannot be used.  The message names the file and the key.

    `problems`: every problem found, one line each (just the message when
    there is one)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


class _Recorded(ConfigError):
    """A step stopped after recording its problems (`Loader.load`)."""


# ---------------------------------------------------------------------------
# Value parsers.  They raise ValueError with an "expected ..., got ..." text;
# the loader prefixes the file and key.
# ---------------------------------------------------------------------------


def show_value(value: object) -> str:
    """Render a value the way it looks in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str | int | float | list):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return repr(value)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Parse a duration: ``"30s"``, ``"10m"``, ``"2h"``, ``"5d"`` or a number of seconds.

    Returns float seconds (>= 0).  Raises ValueError otherwise.
    """
    expected = "expected a duration like 10m, 30s, 2h, 5d or a number of seconds"
    if isinstance(value, bool):
        raise ValueError(f"{expected}, got {show_value(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"{expected}, got {show_value(value)}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{expected}, got {show_value(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{expected}, got {show_value(value)}")
    return seconds


_SIZE_RE = re.compile(r"(\d+)\s*([kmg]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: object) -> int:
    """Parse a size: ``"512K"``, ``"50M"``, ``"1G"`` (binary multiples) or an integer of bytes.

    Returns int bytes (>= 0).  Raises ValueError otherwise.
    """
    expected = "expected a size like 50M or an integer"
    if isinstance(value, bool):
        raise ValueError(f"{expected}, got {show_value(value)}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError(f"{expected}, got {show_value(value)}")
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"{expected}, got {show_value(value)}")
    if size < 0:
        raise ValueError(f"{expected}, got {show_value(value)}")
    return size


HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def parse_hostport(value: object) -> tuple[str, int]:
    """Parse ``"host:port"`` or ``"[v6addr]:port"`` into ``(host, port)``.

    The host is an IPv4 address, a host name, or a bracketed IPv6 address
    (brackets removed in the result).  The port is 0-65535 (0 = any free
    port, used by tests).  Raises ValueError otherwise.
    """
    expected = 'expected "host:port" or "[ipv6]:port"'
    if not isinstance(value, str):
        raise ValueError(f"{expected}, got {show_value(value)}")
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{expected}, got {show_value(value)}")
        host, port_text = text[1:end], text[end + 2 :]
        if (
            not host
            or not re.fullmatch(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?", host)
            or ":" not in host
        ):
            raise ValueError(f"{expected}, got {show_value(value)}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host or not HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{expected}, got {show_value(value)}")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{expected} with a port 0-65535, got {show_value(value)}")
    return host, int(port_text)


# ---------------------------------------------------------------------------
# Per-key checkers.
# ---------------------------------------------------------------------------

Parser = Callable[[object], Any]


def check_string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show_value(value)}")
    return value


def optional_text(value: object) -> str | None:
    """A string; ``""`` (unset) becomes None.  For paths resolved by the loader."""
    text = check_string(value)
    return text if text else None


def check_boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show_value(value)}")
    return value


def integer(minimum: int, maximum: int | None = None) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {show_value(value)}")
        if value < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {show_value(value)}")
        if maximum is not None and value > maximum:
            raise ValueError(
                f"expected an integer from {minimum} to {maximum}, got {show_value(value)}"
            )
        return value

    return parse


def size(minimum: int) -> Parser:
    def parse(value: object) -> int:
        result = parse_size(value)
        if result < minimum:
            raise ValueError(
                f"expected a size of at least {minimum} bytes, got {show_value(value)}"
            )
        return result

    return parse


def duration(positive: bool, minimum: float = 0.0) -> Parser:
    """A duration; `positive`: > 0; `minimum`: at least that many seconds."""

    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"expected a duration greater than 0, got {show_value(value)}")
        if seconds < minimum:
            raise ValueError(
                f"expected a duration of at least {minimum:g}s, got {show_value(value)}"
            )
        return seconds

    return parse


def one_of(*choices: str) -> Parser:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            wanted = ", ".join(f'"{c}"' for c in choices)
            raise ValueError(f"expected one of {wanted}, got {show_value(value)}")
        return value.lower()

    return parse


def check_hostname(value: object) -> str:
    text = check_string(value)
    if not HOSTNAME_RE.fullmatch(text):
        raise ValueError(f"expected a host name like mx.example.net, got {show_value(value)}")
    return text.rstrip(".")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: logging (see `fermoposta.ops.log`).

    - ``level`` (default ``"info"``): ``"debug"``, ``"info"``, ``"warning"`` or ``"error"``.
      ``debug`` adds a protocol trace of every command and reply (SASL
      payloads replaced by ``***``).
    - ``format`` (default ``"text"``): ``"text"`` (Postfix-like lines,
      ``<time> fermoposta/<component>[<pid>]: <message>``) or ``"json"`` (one
      JSON object a line).
    """

    level: str = key(one_of(*LOG_LEVELS), "info")
    format: str = key(one_of(*LOG_FORMATS), "text")


# ---------------------------------------------------------------------------
# The loader: knows the file, builds the messages.
# ---------------------------------------------------------------------------


class Loader:
    """Builds error messages that name the file and the key, and collects them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self.base = Path(os.path.abspath(path)).parent
        self.problems: list[str] = []

    def read(self) -> dict[str, Any]:
        """The parsed TOML document; a missing, unreadable or invalid file is a `ConfigError`."""
        try:
            with open(self.path, "rb") as f:
                return tomllib.load(f)
        except FileNotFoundError:
            raise self.error(None, None, "config file not found") from None
        except OSError as exc:
            raise self.error(
                None, None, f"cannot read config file: {exc.strerror or exc}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise self.error(None, None, f"invalid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise self.error(None, None, "invalid TOML: not UTF-8") from None

    def error(self, section: str | None, key: str | None, message: str) -> ConfigError:
        where = ""
        if section:
            where = section if section.startswith("[") else f"[{section}]"
        if key:
            where = f"{where} {key}" if where else key
        return ConfigError(
            f"{self.name}: {where}: {message}" if where else f"{self.name}: {message}"
        )

    # -- collecting: every problem of a file, not just the first -----------

    def report(self, section: str | None, key: str | None, message: str) -> None:
        """Record a problem; loading goes on (`finish` raises them all)."""
        self.problems.extend(self.error(section, key, message).problems)

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Run one step of the load; the `ConfigError` it raises is recorded,
        and the steps after it still run."""
        try:
            yield
        except _Recorded:
            pass  # its problems are in self.problems already
        except ConfigError as exc:
            self.problems.extend(exc.problems)

    def finish(self) -> None:
        """Raise every problem recorded so far as one `ConfigError`."""
        if self.problems:
            raise ConfigError("\n".join(self.problems), self.problems)

    def finish_since(self, mark: int) -> None:
        """Stop the step when it recorded problems (``len(problems)`` was
        `mark` at its start); inside `collecting()` nothing more is recorded."""
        if len(self.problems) > mark:
            raise _Recorded("\n".join(self.problems), self.problems)

    # -- keys ----------------------------------------------------------------

    def check_keys(
        self, section: str | None, table: Mapping[str, object], known: Sequence[str]
    ) -> bool:
        """Record every key of `table` not in `known` (with a "did you mean"
        hint); True when there was none."""
        ok = True
        for name in table:
            if name not in known:
                self._unknown(section, name, table[name], known)
                ok = False
        return ok

    def _unknown(self, section: str | None, key: str, value: object,
                 known: Sequence[str]) -> None:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        if section is None and isinstance(value, dict):
            self.report(key, None, f"unknown table{hint}")
        else:
            self.report(section, key, f"unknown key{hint}")

    def table(self, section: str | None, cls: type[Any], table: Mapping[str, object],
              *, extra: Sequence[str] = ()) -> dict[str, Any] | None:
        """Load the keys `cls` declares (`fermoposta.config_schema.key`) from
        `table`: the parsed values of the keys written (the dataclass has
        the defaults), or None when a problem was recorded (each unknown
        key, each value that fails its check, each required key missing).
        `extra`: names that are known but loaded by the caller (sub-tables)."""
        declared = declared_keys(cls)
        known = [*declared, *extra]
        values: dict[str, Any] = {}
        ok = True
        for name, value in table.items():
            if name not in known:
                self._unknown(section, name, value, known)
                ok = False
            elif name in declared:
                if section is None and isinstance(value, dict):
                    self.report(None, name, "expected a value, got a table")
                    ok = False
                    continue
                try:
                    values[name] = declared[name].parse(value)
                except ValueError as exc:
                    self.report(section, name, str(exc))
                    ok = False
        for name, spec in declared.items():
            if spec.required and name not in table:
                self.report(section, name, "required key is missing")
                ok = False
        return values if ok else None

    def load(self, section: str | None, cls: type[Any], table: Mapping[str, object],
             *, extra: Sequence[str] = ()) -> dict[str, Any]:
        """`table()`, but a table with a problem stops the step (inside
        `collecting()`, which then records nothing more)."""
        mark = len(self.problems)
        values = self.table(section, cls, table, extra=extra)
        if values is None:
            self.finish_since(mark)
            raise AssertionError("a table that failed recorded no problem")
        return values

    def parse(self, section: str | None, key: str, parser: Parser, value: object) -> Any:
        try:
            return parser(value)
        except ValueError as exc:
            raise self.error(section, key, str(exc)) from None

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.base / p))

    def existing_file(self, section: str, key: str, value: str) -> Path:
        p = self.resolve(value)
        if not p.is_file():
            problem = "does not exist" if not p.exists() else "is not a regular file"
            raise self.error(section, key, f'file "{p}" {problem}')
        if not os.access(p, os.R_OK):
            raise self.error(section, key, f'file "{p}" is not readable')
        return p

    def optional_file(self, section: str, key: str, value: str | None) -> Path | None:
        """`existing_file()` for a key that may be unset (None or ``""``: None).
        A problem is recorded (and None returned): the step goes on to its
        other files and checks, and ends with `finish_since`."""
        if not value:
            return None
        try:
            return self.existing_file(section, key, value)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return None
