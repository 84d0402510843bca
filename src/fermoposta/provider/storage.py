"""Open the store a provider config names (`[store]`).

Contract:
- `open_provider_store(config)` returns the `Store` of `[store] url` (SQLite
  under `data_dir` when it is empty), with the node name (`[store] node`,
  default the host name), pool size and node timeout of the config, and the
  password of `[store] password_file` if one is set (its first line; the
  password is never logged nor put in an error message).  Raises
  `StoreError` when the store cannot be opened, `OSError` when the password
  file cannot be read.  `presize_wal=True` (`provider run`): a SQLite
  store's WAL is made at its full size first (`store.sqlite_wal`).
- `store_description(config)` names the store for messages: the SQLite file
  or the PostgreSQL URL without its password.
"""

from __future__ import annotations

from fermoposta.config import ProviderConfig
from fermoposta.store import Store, open_store, redact_url

__all__ = ["open_provider_store", "store_description"]


def open_provider_store(config: ProviderConfig, *, presize_wal: bool = False) -> Store:
    """The configured store; `presize_wal` for `provider run` (`open_store`)."""
    settings = config.store
    password = None
    if settings.password_file is not None:
        text = settings.password_file.read_text(encoding="utf-8")
        password = text.splitlines()[0] if text else ""
    return open_store(config.data_dir, url=settings.url, node=settings.node or None,
                      password=password, pool_size=settings.pool_size,
                      node_timeout=settings.node_timeout, presize_wal=presize_wal)


def store_description(config: ProviderConfig) -> str:
    if config.store.engine == "postgresql":
        return f"PostgreSQL store {redact_url(config.store.url)}"
    return f"store {config.store_path}"
