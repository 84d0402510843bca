"""Accounts and domains of the PostgreSQL engine (`Directory`, see `fermoposta.store.base`).

Contract: `PostgresDirectory` is a mixin of `PostgresStore` and uses only its
transactions (`_read`, `_write`) and clock; everything else about the engine
(durability, errors, the pool) is in `fermoposta.store.postgres`.  Names are
unique; a certificate fingerprint or subject is bound to one account at most
(`ValueError` otherwise); removing an account removes its domains (foreign
keys), never its held mail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import errors as pg_errors

from fermoposta.store.base import Account, Domain, WouldBlock
from fermoposta.store.pg_rows import _RECORD_ATRN, Conn, EnginePart
from fermoposta.store.rows import (
    ACCOUNT_COLUMNS,
    DOMAIN_COLUMNS,
    account_from_row,
    domain_from_row,
)


def _account_exists(conn: Conn, name: str, *, lock: bool = False) -> bool:
    row = conn.execute(
        "SELECT 1 FROM accounts WHERE name = %s" + (" FOR UPDATE" if lock else ""), (name,)
    ).fetchone()
    return row is not None


def _set_certs(conn: Conn, account: Account) -> None:
    bindings = (
        ("account_certs", "fingerprint", "certificate {}", account.cert_fingerprints),
        ("account_cert_subjects", "subject", "certificate subject {!r}",
         account.cert_subjects),
    )
    for table, column, what, values in bindings:
        for value in dict.fromkeys(values):
            row = conn.execute(
                f"SELECT account FROM {table} WHERE {column} = %s", (value,)
            ).fetchone()
            if row is not None:
                raise ValueError(
                    f"{what.format(value)} is already bound to account {row[0]!r}"
                )
            try:
                with conn.transaction():
                    conn.execute(
                        f"INSERT INTO {table} ({column}, account) VALUES (%s, %s)",
                        (value, account.name),
                    )
            except pg_errors.UniqueViolation as exc:  # bound by another node just now
                raise ValueError(f"{what.format(value)} is already bound to an account"
                                 ) from exc


def _set_valid(conn: Conn, domain: Domain) -> None:
    if not domain.valid_recipients:
        return
    conn.execute(
        "INSERT INTO valid_recipients (domain, local)"
        " SELECT %s, l FROM unnest(%s::text[]) AS l ON CONFLICT DO NOTHING",
        (domain.name, sorted({local.lower() for local in domain.valid_recipients})),
    )


def _domain(conn: Conn, row: Sequence[Any]) -> Domain:
    valid = None
    if row[4]:
        valid = [r[0] for r in conn.execute(
            "SELECT local FROM valid_recipients WHERE domain = %s", (row[0],))]
    return domain_from_row(row, valid)


def _account(conn: Conn, row: Sequence[Any]) -> Account:
    fingerprints = [r[0] for r in conn.execute(
        "SELECT fingerprint FROM account_certs WHERE account = %s ORDER BY fingerprint",
        (row[0],))]
    subjects = [r[0] for r in conn.execute(
        "SELECT subject FROM account_cert_subjects WHERE account = %s ORDER BY subject",
        (row[0],))]
    return account_from_row(row, fingerprints, subjects)


class PostgresDirectory(EnginePart):
    """Accounts and domains: the `Directory` part of `PostgresStore`."""

    def add_account(self, account: Account) -> None:
        with self._write("add account") as conn:
            if _account_exists(conn, account.name):
                raise ValueError(f"account {account.name!r} already exists")
            scram = account.scram
            try:
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO accounts (name, scram_salt, scram_iterations,"
                        " scram_stored_key, scram_server_key, cram_secret, created_at,"
                        " last_atrn_at, atrn_wait) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (account.name,
                         scram.salt if scram else None,
                         scram.iterations if scram else None,
                         scram.stored_key if scram else None,
                         scram.server_key if scram else None,
                         account.cram_secret,
                         account.created_at or self._clock(),
                         account.last_atrn_at, account.atrn_wait),
                    )
            except pg_errors.UniqueViolation as exc:  # added by another node just now
                raise ValueError(f"account {account.name!r} already exists") from exc
            _set_certs(conn, account)

    def update_account(self, account: Account) -> None:
        """Replace the secrets and certificate bindings of an account (ValueError if none).

        `created_at` is kept; `last_atrn_at` and `atrn_wait` are taken from `account`.
        """
        with self._write("update account") as conn:
            if not _account_exists(conn, account.name, lock=True):
                raise ValueError(f"no account {account.name!r}")
            scram = account.scram
            conn.execute(
                "UPDATE accounts SET scram_salt = %s, scram_iterations = %s,"
                " scram_stored_key = %s, scram_server_key = %s, cram_secret = %s,"
                " last_atrn_at = %s, atrn_wait = %s WHERE name = %s",
                (scram.salt if scram else None,
                 scram.iterations if scram else None,
                 scram.stored_key if scram else None,
                 scram.server_key if scram else None,
                 account.cram_secret,
                 account.last_atrn_at,
                 account.atrn_wait,
                 account.name),
            )
            conn.execute("DELETE FROM account_certs WHERE account = %s", (account.name,))
            conn.execute("DELETE FROM account_cert_subjects WHERE account = %s", (account.name,))
            _set_certs(conn, account)

    def get_account(self, name: str) -> Account | None:
        with self._read("get account") as conn:
            row = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = %s", (name,)
            ).fetchone()
            return None if row is None else _account(conn, row)

    def account_by_fingerprint(self, fingerprint: str) -> Account | None:
        """`fingerprint` is lowercase hex without colons, as stored."""
        with self._read("account by fingerprint") as conn:
            row = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name ="
                " (SELECT account FROM account_certs WHERE fingerprint = %s)",
                (fingerprint.lower(),),
            ).fetchone()
            return None if row is None else _account(conn, row)

    def account_by_subject(self, subject: str) -> Account | None:
        """`subject` in the canonical form of `certificate_subject`, compared exactly."""
        with self._read("account by subject") as conn:
            row = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name ="
                " (SELECT account FROM account_cert_subjects WHERE subject = %s)",
                (subject,),
            ).fetchone()
            return None if row is None else _account(conn, row)

    def list_accounts(self) -> list[Account]:
        with self._read("list accounts") as conn:
            rows = conn.execute(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY name"
            ).fetchall()
            return [_account(conn, row) for row in rows]

    def remove_account(self, name: str) -> bool:
        """Remove the account, its certificate bindings and domains; held mail stays queued."""
        with self._write("remove account") as conn:
            return conn.execute("DELETE FROM accounts WHERE name = %s", (name,)).rowcount > 0

    def record_atrn(self, name: str, at: float, *, durable: bool = True) -> None:
        with self._write("record ATRN", durable=durable) as conn:
            conn.execute(_RECORD_ATRN, (at, name))

    def add_domain(self, domain: Domain) -> None:
        with self._write("add domain") as conn:
            row = conn.execute(
                "SELECT account FROM domains WHERE name = %s", (domain.name,)
            ).fetchone()
            if row is not None:
                raise ValueError(f"domain {domain.name!r} already belongs to account {row[0]!r}")
            # FOR SHARE: the account cannot be removed before we commit.
            if not conn.execute("SELECT 1 FROM accounts WHERE name = %s FOR SHARE",
                                (domain.account,)).fetchone():
                raise ValueError(f"no account {domain.account!r}")
            try:
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO domains (name, account, max_messages, max_bytes, validate,"
                        " hold_lifetime, etrn) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        (domain.name, domain.account, domain.max_messages, domain.max_bytes,
                         domain.valid_recipients is not None, domain.hold_lifetime,
                         domain.etrn),
                    )
            except pg_errors.UniqueViolation as exc:  # added by another node just now
                raise ValueError(f"domain {domain.name!r} already exists") from exc
            _set_valid(conn, domain)

    def update_domain(self, domain: Domain) -> None:
        """Replace an existing domain's account, quotas, valid recipients and hold lifetime."""
        with self._write("update domain") as conn:
            row = conn.execute("SELECT 1 FROM domains WHERE name = %s FOR UPDATE",
                               (domain.name,)).fetchone()
            if row is None:
                raise ValueError(f"no domain {domain.name!r}")
            if not conn.execute("SELECT 1 FROM accounts WHERE name = %s FOR SHARE",
                                (domain.account,)).fetchone():
                raise ValueError(f"no account {domain.account!r}")
            conn.execute(
                "UPDATE domains SET account = %s, max_messages = %s, max_bytes = %s,"
                " validate = %s, hold_lifetime = %s, etrn = %s WHERE name = %s",
                (domain.account, domain.max_messages, domain.max_bytes,
                 domain.valid_recipients is not None, domain.hold_lifetime, domain.etrn,
                 domain.name),
            )
            conn.execute("DELETE FROM valid_recipients WHERE domain = %s", (domain.name,))
            _set_valid(conn, domain)

    def get_domain_now(self, name: str) -> Domain | None:
        """From this process's cache of answers (pg_domain_cache), which the
        first call starts (the provider's MX; a CLI command never caches);
        else `WouldBlock`: the answer is a round trip to the server."""
        self._domain_cache.start()
        found, answer = self._domain_cache.lookup(name)
        if found:
            return answer
        raise WouldBlock()

    def get_domain(self, name: str) -> Domain | None:
        generation = self._domain_cache.generation()
        # One statement (one snapshot, one round trip): the MX asks for every RCPT.
        rows = self._query(
            "get domain",
            f"SELECT {DOMAIN_COLUMNS}, ARRAY(SELECT local FROM valid_recipients v"
            " WHERE v.domain = d.name) FROM domains d WHERE name = %s", (name,))
        answer = domain_from_row(rows[0], rows[0][7]) if rows else None
        self._domain_cache.keep(name, answer, generation)
        return answer

    def list_domains(self, account: str | None = None) -> list[Domain]:
        with self._read("list domains") as conn:
            if account is None:
                rows = conn.execute(
                    f"SELECT {DOMAIN_COLUMNS} FROM domains ORDER BY name"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {DOMAIN_COLUMNS} FROM domains WHERE account = %s ORDER BY name",
                    (account,),
                ).fetchall()
            return [_domain(conn, row) for row in rows]

    def domain_names(self, account: str) -> frozenset[str]:
        with self._read("list domain names", snapshot=False) as conn:
            return frozenset(str(row[0]) for row in conn.execute(
                "SELECT name FROM domains WHERE account = %s", (account,)))

    def remove_domain(self, name: str) -> bool:
        """Remove the domain (and its valid recipients); its held mail stays queued."""
        with self._write("remove domain") as conn:
            return conn.execute("DELETE FROM domains WHERE name = %s", (name,)).rowcount > 0
