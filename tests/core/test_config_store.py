"""`[store]` in the provider config (issue 9): url, password_file, node,
pool_size, node_timeout; errors name the key; `config show` hides a password."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_config
from fermoposta.cli import main
from fermoposta.config import ConfigError, load_provider_config


def _config(tmp_path: Path, store: str):
    return load_provider_config(write_config(tmp_path, None, extra=f"[store]\n{store}"))


def test_absent_means_sqlite_under_data_dir(tmp_path: Path) -> None:
    config = load_provider_config(write_config(tmp_path, None))
    assert (config.store.url, config.store.engine, config.store.node) == ("", "sqlite", "")
    assert config.store_path == config.data_dir / "fermoposta.sqlite3"
    assert (config.store.pool_size, config.store.node_timeout) == (10, 15.0)


def test_sqlite_url_names_a_file_relative_to_the_config(tmp_path: Path) -> None:
    config = _config(tmp_path, 'url = "sqlite://state/q.sqlite3"\n')
    assert config.store_path == tmp_path / "state" / "q.sqlite3"
    config = _config(tmp_path, f'url = "sqlite://{tmp_path}/abs.sqlite3"\n')
    assert config.store_path == tmp_path / "abs.sqlite3" and config.store.engine == "sqlite"


def test_postgresql_url_with_every_key(tmp_path: Path) -> None:
    secret = tmp_path / "pg.pass"
    secret.write_text("s3cret\n")
    config = _config(tmp_path, 'url = "postgresql://fp@db.example:5432/fermoposta"\n'
                     f'password_file = "{secret}"\nnode = "mx-2"\npool_size = 4\n'
                     'node_timeout = "30s"\n')
    s = config.store
    assert (s.engine, s.node, s.pool_size, s.node_timeout, s.password_file) == (
        "postgresql", "mx-2", 4, 30.0, secret)


@pytest.mark.parametrize("store, message", [
    ('url = "mysql://x/y"\n', '[store] url: expected "", "sqlite://PATH" or "postgresql://'),
    ('url = "sqlite://"\n', '"sqlite://" names no file'),
    ('url = "sqlite:///x"\npassword_file = "p"\n', "only a PostgreSQL url takes a password"),
    ('url = "postgresql://h/d"\npassword_file = "missing.pass"\n', "password_file"),
    ('node = "two words"\n', "[store] node: a node name is at most 64"),
    ('node = "' + "n" * 65 + '"\n', "[store] node:"),
    ("pool_size = 0\n", "[store] pool_size:"),
    ('node_timeout = "0"\n', "[store] node_timeout:"),
    ("nodes = 3\n", "nodes"),
])
def test_errors_name_the_key(tmp_path: Path, store: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, store)
    assert message in str(info.value)


def test_config_show_hides_a_password_in_the_url(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path, None,
                        extra='[store]\nurl = "postgresql://fp:hunter2@db.example/fermoposta"\n')
    assert main(["config", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert 'url = "postgresql://fp:***@db.example/fermoposta"' in out


def test_password_file_with_a_multi_host_url_reaches_the_server(tmp_path: Path) -> None:
    """The password goes into the URL's query, so libpq's multi-host URLs (the
    fail-over form docs/scaling.md recommends) keep working; logs see ***."""
    from urllib.parse import urlsplit

    from fermoposta.provider.storage import open_provider_store, store_description
    from fermoposta.store import redact_url
    from support import pg

    with pg.fresh_schema() as (_schema, url):
        parts = urlsplit(url)
        hosts = f"{parts.hostname}:{parts.port or 5432}"
        multi = url.replace(parts.netloc, f"{parts.username}@{hosts},{hosts}", 1)
        secret = tmp_path / "pg.pass"
        secret.write_text("not-needed-by-trust-auth\n")
        config = _config(tmp_path, f'url = "{multi}"\npassword_file = "{secret}"\n'
                         'node = "mx-9"\n')
        store = open_provider_store(config)
        try:
            assert store.node == "mx-9" and store.is_empty()
        finally:
            store.close()
        assert "not-needed" not in store_description(config)
    assert redact_url("postgresql://u@h1,h2/d?password=s3cret&x=1") == \
        "postgresql://u@h1,h2/d?password=***&x=1"
    assert redact_url("postgresql://u:s3cret@h1:5432,h2:5433/d") == \
        "postgresql://u:***@h1:5432,h2:5433/d"
