"""The `account` commands: `fermoposta account add|set|list|remove|passwd|certs`.

Contract (`register(subparsers)`, called by `provider.accounts.register`,
whose docstring states the commands' conventions, exit codes and the
password and certificate rules; `set` and the ATRN wait options are
`provider.atrn_wait_admin`'s):
- `add NAME` creates the account with its password (`--password-file` or
  `--password-stdin`; the SCRAM-SHA-256 verifier, and the password itself for
  CRAM-MD5 unless `--no-cram-md5`), certificate bindings and domains, all or
  nothing as far as the store allows; an account name is 1 to 128 of
  letters, digits and ``._@+=-``, starting with a letter or digit.
- `list` prints one row an account (domains, CRAM-MD5, certificates, last
  ATRN, wait); accounts without domains show `NO_DOMAINS` and are named in
  a note on stderr.
- `remove` removes the account and its domains (their held mail stays
  queued); `passwd` replaces the password; `certs` adds or removes
  certificate bindings, then prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from fermoposta.cli_help import COMMAND_HELP
from fermoposta.passwords import read_password_file
from fermoposta.provider.account_input import (
    DEFAULT_SCRAM_ITERATIONS,
    make_scram_secret,
    normalize_cert_subject,
    normalize_fingerprint,
    read_password_stdin,
    subject_looks_reversed,
)
from fermoposta.provider.account_input import table as _table
from fermoposta.provider.account_input import usage_domain as _usage_domain
from fermoposta.provider.admin import (
    EX_OK,
)
from fermoposta.provider.admin import UsageError as _UsageError
from fermoposta.provider.admin import error as _error
from fermoposta.provider.admin import guarded as _guarded
from fermoposta.provider.atrn_wait_admin import (
    add_wait_option,
    format_wait,
    register_set,
    wait_option,
)
from fermoposta.store.base import (
    Account,
    Directory,
    Domain,
    ScramSecret,
    StoreError,
)

__all__ = [
    "NO_DOMAINS",
    "account_add",
    "account_certs",
    "account_list",
    "account_passwd",
    "account_remove",
    "register",
]

#: The DOMAINS cell of `account list` for an account without domains (its
#: ATRN is refused until one is added).
NO_DOMAINS = "(none!)"

_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}\Z")


def _check_account_name(name: str) -> str:
    if not _ACCOUNT_NAME.match(name):
        raise _UsageError(
            f"invalid account name {name!r}: use 1 to 128 characters among letters, "
            "digits and . _ @ + = - (starting with a letter or digit)"
        )
    return name


def _read_password(args: argparse.Namespace) -> str:
    if args.password_file is not None:
        return read_password_file(args.password_file)
    return read_password_stdin()


def _secrets(args: argparse.Namespace) -> tuple[ScramSecret, str | None]:
    if not 4096 <= args.scram_iterations <= 10_000_000:
        raise _UsageError("--scram-iterations must be between 4096 and 10000000")
    password = _read_password(args)
    scram = make_scram_secret(password, args.scram_iterations)
    return scram, None if args.no_cram_md5 else password


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def _usage_fingerprints(values: Iterable[str]) -> list[str]:
    try:
        return list(dict.fromkeys(normalize_fingerprint(f) for f in values))
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _usage_subjects(values: Iterable[str]) -> list[str]:
    try:
        subjects = list(dict.fromkeys(normalize_cert_subject(s) for s in values))
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    for subject in subjects:
        if subject_looks_reversed(subject):
            _error(
                f"warning: certificate subject {subject!r} starts with its most general part; "
                "peers present the most specific first (CN=...,O=...,C=...), as "
                "`openssl x509 -noout -subject -nameopt RFC2253` prints it"
            )
    return subjects


@_guarded
def account_add(args: argparse.Namespace, store: Directory) -> int:
    """Create an account, optionally with its domains."""
    name = _check_account_name(args.name)
    domains = list(dict.fromkeys(_usage_domain(d) for d in args.domain))
    fingerprints = _usage_fingerprints(args.cert_fingerprint)
    subjects = _usage_subjects(args.cert_subject)
    if store.get_account(name) is not None:
        raise ValueError(f"account {name!r} already exists")
    for domain in domains:
        existing = store.get_domain(domain)
        if existing is not None:
            raise ValueError(f"domain {domain} already belongs to account {existing.account!r}")
    atrn_wait = wait_option(args)
    scram, cram = _secrets(args)
    store.add_account(
        Account(
            name=name,
            scram=scram,
            cram_secret=cram,
            cert_fingerprints=tuple(fingerprints),
            cert_subjects=tuple(subjects),
            created_at=time.time(),
            atrn_wait=atrn_wait,
        )
    )
    try:
        for domain in domains:
            store.add_domain(Domain(name=domain, account=name))
    except BaseException:
        with contextlib.suppress(StoreError):
            store.remove_account(name)  # all or nothing, as far as we can
        raise
    suffix = f" with domains {', '.join(domains)}" if domains else ""
    print(f"account {name} added{suffix}")
    if not domains:
        # Accepted (domains may follow), but every ATRN it sends is refused until then.
        _error(f"warning: account {name} has no domains: its ATRN is refused (450) until "
               f"`fermoposta domain add DOMAIN --account {name}`")
    return EX_OK


@_guarded
def account_list(args: argparse.Namespace, store: Directory) -> int:
    """Print the accounts as a table."""
    rows = []
    bare = []
    for account in store.list_accounts():
        domains = ",".join(d.name for d in store.list_domains(account.name))
        if not domains:
            bare.append(account.name)
        rows.append(
            [
                account.name,
                domains or NO_DOMAINS,
                "yes" if account.cram_secret is not None else "no",
                str(len(account.cert_fingerprints) + len(account.cert_subjects)),
                _when(account.last_atrn_at),
                format_wait(account),
            ]
        )
    print(_table(["ACCOUNT", "DOMAINS", "CRAM-MD5", "CERTS", "LAST ATRN", "WAIT"], rows))
    if bare:
        # On stderr: the table on stdout stays one row an account for scripts.
        _error(f"note: {NO_DOMAINS} = no domains, every ATRN refused: {', '.join(bare)} "
               "(fermoposta domain add DOMAIN --account NAME)")
    return EX_OK


@_guarded
def account_remove(args: argparse.Namespace, store: Directory) -> int:
    """Remove an account and its domains; their held mail stays queued."""
    domains = [d.name for d in store.list_domains(args.name)]
    if not store.remove_account(args.name):
        raise ValueError(f"no account {args.name!r}")
    suffix = f" and its domains {', '.join(domains)} (held mail stays queued)" if domains else ""
    print(f"account {args.name} removed{suffix}")
    return EX_OK


@_guarded
def account_passwd(args: argparse.Namespace, store: Directory) -> int:
    """Replace an account's password."""
    account = store.get_account(args.name)
    if account is None:
        raise ValueError(f"no account {args.name!r}")
    scram, cram = _secrets(args)
    store.update_account(dataclasses.replace(account, scram=scram, cram_secret=cram))
    print(f"password of account {args.name} changed")
    return EX_OK


def _changed(
    current: Sequence[str], add: Sequence[str], remove: Sequence[str], what: str, name: str
) -> tuple[str, ...]:
    both = set(add) & set(remove)
    if both:
        raise _UsageError(f"{what} {sorted(both)[0]!r} is both added and removed")
    missing = [item for item in remove if item not in current]
    if missing:
        raise ValueError(f"account {name!r} has no {what} {missing[0]!r}")
    kept = [item for item in current if item not in remove]
    return tuple(dict.fromkeys([*kept, *add]))


@_guarded
def account_certs(args: argparse.Namespace, store: Directory) -> int:
    """Add or remove an account's certificate bindings, then print them."""
    add_fps = _usage_fingerprints(args.add_fingerprint)
    remove_fps = _usage_fingerprints(args.remove_fingerprint)
    add_subjects = _usage_subjects(args.add_subject)
    remove_subjects = _usage_subjects(args.remove_subject)
    account = store.get_account(args.name)
    if account is None:
        raise ValueError(f"no account {args.name!r}")
    fingerprints = _changed(
        account.cert_fingerprints, add_fps, remove_fps, "certificate fingerprint", args.name
    )
    subjects = _changed(
        account.cert_subjects, add_subjects, remove_subjects, "certificate subject", args.name
    )
    if (fingerprints, subjects) != (account.cert_fingerprints, account.cert_subjects):
        store.update_account(
            dataclasses.replace(account, cert_fingerprints=fingerprints, cert_subjects=subjects)
        )
        account = store.get_account(args.name)
        if account is None:
            raise ValueError(f"no account {args.name!r}")  # removed meanwhile
    for fingerprint in account.cert_fingerprints:
        print(f"fingerprint {fingerprint}")
    for subject in account.cert_subjects:
        print(f"subject {subject}")
    if not account.cert_fingerprints and not account.cert_subjects:
        print(f"account {args.name} has no certificate bindings")
    return EX_OK


def _add_password_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--password-file", metavar="FILE", help="read the password from FILE's first line"
    )
    source.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input",
    )
    parser.add_argument(
        "--no-cram-md5",
        action="store_true",
        help="do not store the password-equivalent secret CRAM-MD5 needs",
    )
    parser.add_argument(
        "--scram-iterations",
        type=int,
        default=DEFAULT_SCRAM_ITERATIONS,
        metavar="N",
        help="PBKDF2 iterations of the SCRAM-SHA-256 verifier (default %(default)s)",
    )


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `account` command and its subcommands to `subparsers`."""
    account = subparsers.add_parser("account", help=COMMAND_HELP["account"])
    account_cmds = account.add_subparsers(dest="account_command", metavar="COMMAND")
    account_cmds.required = True

    add = account_cmds.add_parser("add", help="create an account")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--domain", action="append", default=[], metavar="DOMAIN", help="domain to hold mail for"
    )
    _add_password_options(add)
    add.add_argument(
        "--cert-fingerprint",
        action="append",
        default=[],
        metavar="HEX",
        help="SHA-256 fingerprint of a client certificate that authenticates as NAME",
    )
    add.add_argument(
        "--cert-subject",
        action="append",
        default=[],
        metavar="SUBJECT",
        help="subject (RFC 4514, e.g. 'CN=customer,O=Example Ltd') of client certificates "
        "issued by [tls] client_ca that authenticate as NAME",
    )
    add_wait_option(add)
    add.set_defaults(handler=account_add)
    register_set(account_cmds)

    lst = account_cmds.add_parser("list", help="list the accounts")
    lst.set_defaults(handler=account_list)

    remove = account_cmds.add_parser("remove", help="remove an account and its domains")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=account_remove)

    passwd = account_cmds.add_parser("passwd", help="change an account's password")
    passwd.add_argument("name", metavar="NAME")
    _add_password_options(passwd)
    passwd.set_defaults(handler=account_passwd)

    certs = account_cmds.add_parser(
        "certs", help="show, add or remove an account's client certificate bindings"
    )
    certs.add_argument("name", metavar="NAME")
    for flag, metavar, what in (
        ("--add-fingerprint", "HEX", "bind the certificate with this SHA-256 fingerprint"),
        ("--remove-fingerprint", "HEX", "unbind the certificate with this SHA-256 fingerprint"),
        ("--add-subject", "SUBJECT", "bind certificates with this RFC 4514 subject"),
        ("--remove-subject", "SUBJECT", "unbind certificates with this RFC 4514 subject"),
    ):
        certs.add_argument(flag, action="append", default=[], metavar=metavar, help=what)
    certs.set_defaults(handler=account_certs)
