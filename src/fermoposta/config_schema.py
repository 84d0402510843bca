"""How a config key is declared: once, as a dataclass field with its check and default.

Contract:
- `key(parse, default)` (or ``written=``, ``factory=``) declares one key of a
  config table as a dataclass field: the field's name is the key's name, its
  annotation the loaded type, its default the key's default, and its
  metadata the `Key` (the parser that checks and converts the TOML value).
  ``written="50M"`` states the default as it is written in a file; it is
  parsed here, once, so the declaration and the docs show the same thing.
  ``computed=True``: the default depends on other keys or on the file (the
  docs say it in words); the field's own default is only a placeholder.
  A field declared without a default and not computed is a required key;
  such a field is written ``field(metadata=spec(parse))``.
- `table(cls)` declares a sub-table (``[limits]`` ...) of a file's top level.
  A field loaded by hand from a table states the table's declaring class as
  ``metadata={"table": cls}`` (and ``"name"`` when the table's name is not
  the field's: ``[[pull]]`` -> ``pulls``).
- `declared_keys(cls)`, `defaults(cls)` and `declared_tables(cls)` read the declarations
  back, in declaration order; `config_common.Loader.table` walks them to load
  a table, and tests check docs/config.md and docs/customer-config.md against
  them.
- Pure: no I/O, and it imports nothing of fermoposta (config_common imports it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MISSING", "Declared", "Key", "declared_keys", "declared_tables", "defaults", "key", "spec",
    "table",
]

Parser = Callable[[object], Any]
MISSING: Any = dataclasses.MISSING


@dataclass(frozen=True, slots=True)
class Key:
    """What the loader needs of a key besides its name and default."""

    parse: Parser
    #: The default depends on other keys or on the file (documented in words).
    computed: bool = False
    #: Free labels for a loader with more structure (``[pull.delivery]``: the
    #: delivery types a key belongs to).
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Declared:
    """One declared key, read back from its dataclass field."""

    name: str
    key: Key
    #: The loaded default (`MISSING` for a required or computed key without one).
    default: Any

    @property
    def parse(self) -> Parser:
        return self.key.parse

    @property
    def required(self) -> bool:
        return self.default is MISSING and not self.key.computed


def spec(parse: Parser, *, computed: bool = False,
         tags: tuple[str, ...] = ()) -> dict[str, Any]:
    """The field metadata declaring a key, for a field without a default:
    ``host: str = dataclasses.field(metadata=spec(check_host))`` (a required
    key, or a computed one).  (`key` would do, but type checkers take any
    value but a ``field()`` call for a default.)"""
    return {"key": Key(parse=parse, computed=computed, tags=tags)}


def key(parse: Parser, default: Any = MISSING, *, written: Any = MISSING,
        factory: Callable[[], Any] | None = None, computed: bool = False,
        tags: tuple[str, ...] = ()) -> Any:
    """A dataclass field declaring a config key (see the module docstring)."""
    metadata = spec(parse, computed=computed, tags=tags)
    if written is not MISSING:
        default = parse(written)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if default is MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def table(cls: type[Any]) -> Any:
    """A dataclass field declaring a sub-table whose keys `cls` declares."""
    return dataclasses.field(default_factory=cls, metadata={"table": cls})


def declared_keys(cls: type[Any]) -> dict[str, Declared]:
    """The keys `cls` declares (fields made by `key`), in declaration order."""
    result: dict[str, Declared] = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("key")
        if not isinstance(spec, Key):
            continue
        default: Any = f.default
        factory: Any = f.default_factory
        if default is MISSING and factory is not MISSING:
            default = factory()
        result[f.name] = Declared(name=f.name, key=spec, default=default)
    return result


def declared_tables(cls: type[Any]) -> dict[str, type[Any]]:
    """The sub-tables `cls` declares: table name -> the dataclass declaring its keys."""
    return {f.metadata.get("name", f.name): f.metadata["table"]
            for f in dataclasses.fields(cls) if "table" in f.metadata}


def defaults(cls: type[Any]) -> dict[str, Any]:
    """The declared defaults of `cls`'s keys (keys without one left out)."""
    return {name: d.default for name, d in declared_keys(cls).items() if d.default is not MISSING}
