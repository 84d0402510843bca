"""Fixtures of the store tests: every test that takes `store` or
`store_factory` runs once per engine, with the ids "sqlite" and "postgresql"
(`pytest -k postgresql` runs only the latter).

Contract:
- `clock`: the `Clock` every store of the test gets unless told otherwise.
- `store_factory`: opens stores on one fresh, empty data set per test (SQLite:
  one file under tmp_path; PostgreSQL: one schema `fp_<hex>` on the server of
  `FERMOPOSTA_TEST_PG_URL`, see tests/support/pg.py); calling it again opens
  a second store on the same data, as a second process or node would.  Every
  store is closed at teardown, then the schema is dropped.
- `store`: the first store of `store_factory`.
- PostgreSQL unreachable: the test fails if `CI` is set, else it is skipped.
  The engine module is imported only by the postgresql tests, so a broken
  one fails them without hiding the SQLite results.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fermoposta.store.base import Store
from fermoposta.store.sqlite import SQLiteStore
from support.pg import fresh_schema

from .contract import Clock, StoreFactory

ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=ENGINES, ids=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store_factory(engine: str, tmp_path: Path, clock: Clock) -> Iterator[StoreFactory]:
    if engine == "sqlite":
        path = tmp_path / "data" / "fermoposta.sqlite3"

        def open_sqlite(**options: Any) -> Store:
            return SQLiteStore(path, **options)

        factory = StoreFactory(engine, open_sqlite, clock)
        try:
            yield factory
        finally:
            factory.close_all()
        return
    assert engine == "postgresql"
    from fermoposta.store.postgres import PostgresStore

    with fresh_schema() as (_schema, url):

        def open_postgres(**options: Any) -> Store:
            return PostgresStore(url, **options)

        factory = StoreFactory(engine, open_postgres, clock)
        try:
            yield factory
        finally:
            factory.close_all()  # before the schema is dropped


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    return store_factory()
