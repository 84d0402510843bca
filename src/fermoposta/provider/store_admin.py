"""`fermoposta store`: schema migrations and the copy that grows one node into many.

Contract:
- `store migrate` opens the configured store (`[store] url`), which brings
  its schema up to date (the engines do it at every start, under a lock, so
  several nodes starting at once are safe), and prints the versions before
  and after.  Exit 0; 75 when the store cannot be reached.
- `store copy --to URL [--password-file FILE]` copies the configured store
  (normally the SQLite file of a single node) into the store at URL
  (normally an empty PostgreSQL database): every account with its secrets
  and certificate bindings, every domain with its quotas and valid
  recipients, and every queued message with its body and each recipient's
  state, attempts, last reply, retry schedule and operator hold.  A target
  that holds any account, domain or message is refused (65) before anything
  is written.  Messages are copied one transaction each, bodies streamed in
  chunks, so memory stays bounded; the summary counts what was copied.
  Stop the providers first: mail that arrives or leaves during the copy is
  not seen by it (`docs/scaling.md`).  The password is never printed.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fermoposta.cli_help import COMMAND_HELP
from fermoposta.provider.admin import EX_OK, DataError, guarded
from fermoposta.store import Store, open_store, redact_url
from fermoposta.store.base import QueueFilter

__all__ = ["register", "store_copy", "store_migrate"]

PAGE = 200


class _ChunkReader(io.RawIOBase):
    """A file over an iterator of chunks (a stored body), read as it is asked for."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


@guarded
def store_migrate(args: argparse.Namespace, store: Store) -> int:
    before, after = store.migrate()
    if before == after:
        print(f"store schema is up to date (version {after})")
    else:
        print(f"store schema migrated from version {before} to {after}")
    return EX_OK


def _password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"--password-file {path}: {exc.strerror or exc}") from None
    return text.splitlines()[0] if text else ""


@guarded
def store_copy(args: argparse.Namespace, store: Store) -> int:
    url: str = args.to
    if not url.startswith(("postgresql://", "postgres://", "sqlite://")):
        raise DataError(f"--to {redact_url(url)}: expected postgresql://... or sqlite:///PATH")
    target = open_store(Path("."), url=url, password=_password(args.password_file))
    try:
        if not target.is_empty():
            raise DataError(f"--to {redact_url(url)}: the target store is not empty; "
                            "copy only into a new database")
        accounts = domains = messages = recipients = 0
        for account in store.list_accounts():
            target.add_account(account)
            accounts += 1
        for domain in store.list_domains():
            target.add_domain(domain)
            domains += 1
        after: tuple[float, str] | None = None
        while True:
            page = store.queue_page(QueueFilter(), after, PAGE)
            if not page:
                break
            for entry in page:
                body = io.BufferedReader(_ChunkReader(iter(store.read_body(entry.message.id))))
                target.import_message(entry, body)
                messages += 1
                recipients += len(entry.message.recipients)
            last = page[-1].message
            after = (last.received_at, last.id)
        print(f"copied {accounts} account(s), {domains} domain(s), {messages} message(s) "
              f"with {recipients} recipient(s) to {redact_url(url)}")
    finally:
        target.close()
    return EX_OK


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `store` command; the caller opens the source store and calls
    ``args.handler(args, store)``."""
    parser = subparsers.add_parser("store", help=COMMAND_HELP["store"])
    cmds = parser.add_subparsers(dest="store_command", metavar="COMMAND")
    cmds.required = True
    migrate = cmds.add_parser("migrate", help="bring the store's schema up to date")
    migrate.set_defaults(handler=store_migrate)
    copy = cmds.add_parser(
        "copy", help="copy accounts, domains and queued mail into an empty store")
    copy.add_argument("--to", required=True, metavar="URL",
                      help="the target: postgresql://user@host:port/dbname or sqlite:///PATH")
    copy.add_argument("--password-file", type=Path, metavar="FILE",
                      help="a file whose first line is the target's PostgreSQL password")
    copy.set_defaults(handler=store_copy)
