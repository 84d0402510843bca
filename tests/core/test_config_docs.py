"""docs/config.md and docs/customer-config.md against the one declaration of
the keys (`fermoposta.config_schema`): every declared key is documented with
its default, and no documented key or table is undeclared."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fermoposta.config import ProviderConfig
from fermoposta.config_schema import Declared, declared_keys, declared_tables
from fermoposta.customer.config import CustomerConfig, DeliveryKeys, WindowKeys

DOCS = Path(__file__).resolve().parents[2] / "docs"


def provider_schema() -> dict[str, type[Any]]:
    return {"": ProviderConfig, **declared_tables(ProviderConfig)}


def customer_schema() -> dict[str, type[Any]]:
    return {"": CustomerConfig, **declared_tables(CustomerConfig),
            "pull.window": WindowKeys, "pull.delivery": DeliveryKeys}


def doc_sections(page: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Section ("" = top level, "limits", "pull.window" ...) -> (key -> the
    Default cell of its table row, the section's text)."""
    sections: dict[str, tuple[dict[str, str], str]] = {}
    current: str | None = None
    for line in page.read_text().splitlines():
        heading = re.fullmatch(r"#{2,3} (.*)", line)
        if heading:
            title = re.fullmatch(r"`\[{1,2}([\w.]+)\]{1,2}`", heading.group(1))
            current = "" if heading.group(1) == "Top level" else (
                title.group(1) if title else None)
            if current is not None:
                sections.setdefault(current, ({}, ""))
            continue
        if current is None:
            continue
        rows, text = sections[current]
        sections[current] = (rows, text + line + "\n")
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) >= 3 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[2]
    return sections


def check_default(where: str, declared: Declared, cell: str) -> None:
    required = declared.required or "required" in declared.key.tags
    if required:
        assert cell == "required", f"{where}: documented default {cell!r}, but it is required"
        return
    assert cell != "required", f"{where}: documented as required, but it has a default"
    if declared.key.computed:
        return  # the docs say it in words ("the host name", "pull-1 by position" ...)
    literal = re.match(r"`([^`]*)`", cell)
    assert literal, f"{where}: the default {cell!r} is not a value in backquotes"
    value = tomllib.loads(f"v = {literal.group(1)}")["v"]
    assert declared.parse(value) == declared.default, (
        f"{where}: documented default {literal.group(1)} loads as {declared.parse(value)!r}, "
        f"the declared default is {declared.default!r}"
    )


@pytest.mark.parametrize(("page", "schema"), [
    ("config.md", provider_schema), ("customer-config.md", customer_schema)])
def test_docs_match_the_declaration(page: str, schema: Any) -> None:
    sections = doc_sections(DOCS / page)
    declared_sections: dict[str, type[Any]] = schema()
    for section, cls in declared_sections.items():
        assert section in sections, f"{page}: no section for [{section}]"
        rows, text = sections[section]
        keys = declared_keys(cls)
        for name, declared in keys.items():
            where = f"{page}: [{section}] {name}"
            if name in rows:
                check_default(where, declared, rows[name])
            elif f"{section}.{name}" in sections:
                pass  # a table-valued key with a section of its own ([outbound.transport])
            else:
                # A section without a key table ([connections]) names its keys in the text.
                assert not rows and f"`{name}`" in text, f"{where}: not documented"
        extra = set(rows) - set(keys)
        assert not extra, f"{page}: [{section}] documents undeclared keys {sorted(extra)}"
    for section in sections:
        parent, _, name = section.rpartition(".")
        assert section in declared_sections or (
            parent in declared_sections and name in declared_keys(declared_sections[parent])
        ), f"{page}: documents [{section}], which is not declared"


def test_the_check_sees_a_wrong_default(tmp_path: Path) -> None:
    """The check can fail: a page whose default differs from the declaration."""
    page = tmp_path / "config.md"
    page.write_text((DOCS / "config.md").read_text().replace(
        '| `max_recipients` | int ≥ 1 | `100` |', '| `max_recipients` | int ≥ 1 | `50` |'))
    rows, _ = doc_sections(page)["limits"]
    with pytest.raises(AssertionError, match="declared default is 100"):
        check_default("limits", declared_keys(ProviderConfig.__dataclass_fields__["limits"]
                                              .metadata["table"])["max_recipients"],
                      rows["max_recipients"])
