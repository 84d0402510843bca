"""Accounts and domains of the SQLite engine (`Directory`, see `fermoposta.store.base`).

Contract: `SQLiteDirectory` is a mixin of `SQLiteStore` and uses only its
transactions (`_read`, `_write`), clock and cache of domain lookups
(`_domain_cache`, `store.sqlite_domain_cache`: `get_domain_now` answers from
it while the stamp file says nothing changed, and every write that changes
a domain stamps it after its commit); everything else about the engine
(durability, errors, the file) is in `fermoposta.store.sqlite`.  Names are
unique; a certificate fingerprint or subject is bound to one account at most
(`ValueError` otherwise); removing an account removes its domains (foreign
keys), never its held mail.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from fermoposta.store.base import Account, Domain
from fermoposta.store.rows import (
    ACCOUNT_COLUMNS,
    DOMAIN_COLUMNS,
    account_from_row,
    domain_from_row,
)
from fermoposta.store.sqlite_domain_cache import DomainCache
from fermoposta.store.sqlite_rows import _RECORD_ATRN


def _get_domain(conn: sqlite3.Connection, name: str) -> Domain | None:
    row = conn.execute(f"SELECT {DOMAIN_COLUMNS} FROM domains WHERE name = ?",
                       (name,)).fetchone()
    return None if row is None else _domain(conn, row)


def _account_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone()
    return row is not None


def _set_certs(conn: sqlite3.Connection, account: Account) -> None:
    for fingerprint in dict.fromkeys(account.cert_fingerprints):
        row = conn.execute(
            "SELECT account FROM account_certs WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        if row is not None:
            raise ValueError(
                f"certificate {fingerprint} is already bound to account {row[0]!r}"
            )
        conn.execute(
            "INSERT INTO account_certs (fingerprint, account) VALUES (?, ?)",
            (fingerprint, account.name),
        )
    for subject in dict.fromkeys(account.cert_subjects):
        row = conn.execute(
            "SELECT account FROM account_cert_subjects WHERE subject = ?", (subject,)
        ).fetchone()
        if row is not None:
            raise ValueError(
                f"certificate subject {subject!r} is already bound to account {row[0]!r}"
            )
        conn.execute(
            "INSERT INTO account_cert_subjects (subject, account) VALUES (?, ?)",
            (subject, account.name),
        )



def _account(conn: sqlite3.Connection, row: Any) -> Account:
    fingerprints = [r[0] for r in conn.execute(
        "SELECT fingerprint FROM account_certs WHERE account = ? ORDER BY fingerprint", (row[0],))]
    subjects = [r[0] for r in conn.execute(
        "SELECT subject FROM account_cert_subjects WHERE account = ? ORDER BY subject", (row[0],))]
    return account_from_row(row, fingerprints, subjects)


def _set_valid(conn: sqlite3.Connection, domain: Domain) -> None:
    if domain.valid_recipients is None:
        return
    conn.executemany(
        "INSERT OR IGNORE INTO valid_recipients (domain, local) VALUES (?, ?)",
        [(domain.name, local.lower()) for local in sorted(domain.valid_recipients)],
    )


def _domain(conn: sqlite3.Connection, row: Any) -> Domain:
    valid = None
    if row[4]:
        valid = [r[0] for r in conn.execute(
            "SELECT local FROM valid_recipients WHERE domain = ?", (row[0],))]
    return domain_from_row(row, valid)


class SQLiteDirectory:
    """Accounts and domains: the `Directory` part of `SQLiteStore`."""

    _clock: Callable[[], float]
    _domain_cache: DomainCache

    if TYPE_CHECKING:  # provided by SQLiteStore
        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...

        def _read_now(self, *, snapshot: bool = True
                      ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _write(self, *, durable: bool = True
                   ) -> AbstractContextManager[sqlite3.Connection]: ...

    def add_account(self, account: Account) -> None:
        with self._write() as conn:
            if _account_exists(conn, account.name):
                raise ValueError(f"account {account.name!r} already exists")
            scram = account.scram
            conn.execute(
                "INSERT INTO accounts (name, scram_salt, scram_iterations, scram_stored_key,"
                " scram_server_key, cram_secret, created_at, last_atrn_at, atrn_wait)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    account.name,
                    scram.salt if scram else None,
                    scram.iterations if scram else None,
                    scram.stored_key if scram else None,
                    scram.server_key if scram else None,
                    account.cram_secret,
                    account.created_at or self._clock(),
                    account.last_atrn_at,
                    account.atrn_wait,
                ),
            )
            _set_certs(conn, account)

    def update_account(self, account: Account) -> None:
        """Replace the secrets and certificate bindings of an account (ValueError if none).

        `created_at` is kept; `last_atrn_at` and `atrn_wait` are taken from `account`.
        """
        with self._write() as conn:
            if not _account_exists(conn, account.name):
                raise ValueError(f"no account {account.name!r}")
            scram = account.scram
            conn.execute(
                "UPDATE accounts SET scram_salt = ?, scram_iterations = ?, scram_stored_key = ?,"
                " scram_server_key = ?, cram_secret = ?, last_atrn_at = ?, atrn_wait = ?"
                " WHERE name = ?",
                (
                    scram.salt if scram else None,
                    scram.iterations if scram else None,
                    scram.stored_key if scram else None,
                    scram.server_key if scram else None,
                    account.cram_secret,
                    account.last_atrn_at,
                    account.atrn_wait,
                    account.name,
                ),
            )
            conn.execute("DELETE FROM account_certs WHERE account = ?", (account.name,))
            conn.execute("DELETE FROM account_cert_subjects WHERE account = ?", (account.name,))
            _set_certs(conn, account)

    def get_account(self, name: str) -> Account | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = ?", (name,)
            ).fetchone()
            return None if row is None else _account(conn, row)

    def account_by_fingerprint(self, fingerprint: str) -> Account | None:
        """`fingerprint` is lowercase hex without colons, as stored."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name ="
                " (SELECT account FROM account_certs WHERE fingerprint = ?)",
                (fingerprint.lower(),),
            ).fetchone()
            return None if row is None else _account(conn, row)

    def account_by_subject(self, subject: str) -> Account | None:
        """`subject` in the canonical form of `certificate_subject`, compared exactly."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name ="
                " (SELECT account FROM account_cert_subjects WHERE subject = ?)",
                (subject,),
            ).fetchone()
            return None if row is None else _account(conn, row)

    def list_accounts(self) -> list[Account]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY name"
            ).fetchall()
            return [_account(conn, row) for row in rows]

    def remove_account(self, name: str) -> bool:
        """Remove the account, its certificate bindings and domains; held mail stays queued."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM accounts WHERE name = ?", (name,))
        self._domain_cache.touched()
        return cur.rowcount > 0

    def record_atrn(self, name: str, at: float, *, durable: bool = True) -> None:
        with self._write(durable=durable) as conn:
            conn.execute(_RECORD_ATRN, (at, name))

    def add_domain(self, domain: Domain) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT account FROM domains WHERE name = ?", (domain.name,)
            ).fetchone()
            if row is not None:
                raise ValueError(f"domain {domain.name!r} already belongs to account {row[0]!r}")
            if not _account_exists(conn, domain.account):
                raise ValueError(f"no account {domain.account!r}")
            conn.execute(
                "INSERT INTO domains (name, account, max_messages, max_bytes, validate,"
                " hold_lifetime, etrn) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    domain.name,
                    domain.account,
                    domain.max_messages,
                    domain.max_bytes,
                    int(domain.valid_recipients is not None),
                    domain.hold_lifetime,
                    domain.etrn,
                ),
            )
            _set_valid(conn, domain)
        self._domain_cache.touched()

    def update_domain(self, domain: Domain) -> None:
        """Replace an existing domain's account, quotas, valid recipients, hold
        lifetime and ETRN target."""
        with self._write() as conn:
            row = conn.execute("SELECT 1 FROM domains WHERE name = ?", (domain.name,)).fetchone()
            if row is None:
                raise ValueError(f"no domain {domain.name!r}")
            if not _account_exists(conn, domain.account):
                raise ValueError(f"no account {domain.account!r}")
            conn.execute(
                "UPDATE domains SET account = ?, max_messages = ?, max_bytes = ?, validate = ?,"
                " hold_lifetime = ?, etrn = ? WHERE name = ?",
                (
                    domain.account,
                    domain.max_messages,
                    domain.max_bytes,
                    int(domain.valid_recipients is not None),
                    domain.hold_lifetime,
                    domain.etrn,
                    domain.name,
                ),
            )
            conn.execute("DELETE FROM valid_recipients WHERE domain = ?", (domain.name,))
            _set_valid(conn, domain)
        self._domain_cache.touched()

    def get_domain(self, name: str) -> Domain | None:
        with self._read() as conn:
            return _get_domain(conn, name)

    def get_domain_now(self, name: str) -> Domain | None:
        # The MX asks at every RCPT: from this process's cache while the
        # stamp says no domain has changed since the answer was read.
        found, answer = self._domain_cache.lookup(name)
        if found:
            return answer
        generation = self._domain_cache.generation()
        answer = self._read_domain_now(name)
        self._domain_cache.keep(name, answer, generation)
        return answer

    def _read_domain_now(self, name: str) -> Domain | None:
        # One statement, no transaction, unless the domain has a list of
        # valid recipients, read with it in one snapshot.
        with self._read_now(snapshot=False) as conn:
            row = conn.execute(f"SELECT {DOMAIN_COLUMNS} FROM domains WHERE name = ?",
                               (name,)).fetchone()
        if row is None or not row[4]:
            return None if row is None else domain_from_row(row, None)
        with self._read_now() as conn:
            return _get_domain(conn, name)

    def list_domains(self, account: str | None = None) -> list[Domain]:
        with self._read() as conn:
            if account is None:
                rows = conn.execute(
                    f"SELECT {DOMAIN_COLUMNS} FROM domains"
                    " ORDER BY name"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {DOMAIN_COLUMNS} FROM domains"
                    " WHERE account = ? ORDER BY name",
                    (account,),
                ).fetchall()
            return [_domain(conn, row) for row in rows]

    def domain_names(self, account: str) -> frozenset[str]:
        with self._read() as conn:
            return frozenset(str(row[0]) for row in conn.execute(
                "SELECT name FROM domains WHERE account = ?", (account,)))

    def remove_domain(self, name: str) -> bool:
        """Remove the domain (and its valid recipients); its held mail stays queued."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM domains WHERE name = ?", (name,))
        self._domain_cache.touched()
        return cur.rowcount > 0
