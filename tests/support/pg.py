"""PostgreSQL for tests: the server's URL, a fresh schema per test, and what
to do when there is no server.

Contract:
- The server is the one at `FERMOPOSTA_TEST_PG_URL` (default
  `postgresql://postgres@127.0.0.1:5432/test`); `.ci/run` guarantees one in CI.
- `require_server()` checks it accepts connections (once per URL and
  session).  If not, the test fails when the `CI` environment variable is set
  (CI must never skip the PostgreSQL tests silently) and is skipped otherwise,
  with the URL (password hidden) and the reason.
- `fresh_schema()` creates a schema `fp_<random hex>`, yields its name and a
  URL whose connections use it (`options=-csearch_path=<schema>`), and drops
  it with everything in it (`CASCADE`) on exit: close the stores first.
- Only psycopg talks to the server here; nothing depends on the engine under
  test (`fermoposta.store.postgres`), so multi-node and provider-level tests
  can use these helpers too.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
import pytest

ENV_URL = "FERMOPOSTA_TEST_PG_URL"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT = 5  # seconds: an absent server must not stall the suite

_reachability: dict[str, str | None] = {}  # URL -> why it is unreachable (None: it is fine)


def base_url() -> str:
    """The URL of the test server (the database the schemas are made in)."""
    return os.environ.get(ENV_URL) or DEFAULT_URL


def in_ci() -> bool:
    """Whether the suite runs in CI (`CI` set to anything but empty/0/false/no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def redact(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def with_search_path(url: str, schema: str) -> str:
    """`url` with `options=-csearch_path=<schema>` added to its query (to any
    options it already has), so every connection made with it uses `schema`."""
    if not schema.replace("_", "").isalnum():
        raise ValueError(f"not a plain schema name: {schema!r}")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    option = f"-csearch_path={schema}"
    others = [value for key, value in query if key == "options"]
    query = [(key, value) for key, value in query if key != "options"]
    query.append(("options", " ".join([*others, option])))
    # Percent-encoded ("=" as %3D, " " as %20): libpq decodes %XX in a URI, not "+".
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def unreachable_reason(url: str | None = None) -> str | None:
    """Why the server at `url` cannot be used, or None if it answers a query."""
    url = url or base_url()
    if url not in _reachability:
        try:
            with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
                conn.execute("SELECT 1")
            _reachability[url] = None
        except psycopg.Error as exc:
            _reachability[url] = " ".join(str(exc).split()) or type(exc).__name__
    return _reachability[url]


def require_server(url: str | None = None) -> str:
    """Return the server's URL; fail (in CI) or skip the test if it is unreachable."""
    url = url or base_url()
    why = unreachable_reason(url)
    if why is not None:
        message = f"PostgreSQL not reachable at {redact(url)}: {why}"
        if in_ci():
            pytest.fail(f"{message} (CI is set: the PostgreSQL tests must run)", pytrace=False)
        pytest.skip(message)
    return url


@contextmanager
def fresh_schema(url: str | None = None) -> Iterator[tuple[str, str]]:
    """A new, empty schema on the server: yield (name, URL using it); drop it on exit."""
    url = require_server(url)
    schema = f"fp_{secrets.token_hex(8)}"
    with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield schema, with_search_path(url, schema)
    finally:
        with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
