"""Account and domain administration (the `account` and `domain` CLI commands).

Contract:
- `register(subparsers, open_store)` adds the
  `account {add,set,list,remove,passwd,certs}` (ATRN wait options:
  `provider.atrn_wait_admin`) and `domain {add,set,list,remove}`
  (ETRN options: `provider.etrn_admin`)
  subcommands.  Each sets
  `handler=<callable(args, store) -> int>` with `set_defaults`; the caller opens
  the store and calls `args.handler(args, store)`.  (`open_store` is accepted
  for the caller's convenience and is not used here.)
- Handlers return sysexits codes: 0 OK, 64 (EX_USAGE) bad arguments, 65
  (EX_DATAERR) unknown/duplicate account or domain, bad password, 66
  (EX_NOINPUT) unreadable password or recipients file, 75 (EX_TEMPFAIL) on
  `StoreError`.  Errors go to stderr as `fermoposta: <message>`; results to
  stdout.
- Passwords are never printed or logged.  A password is read from the first line
  of a file (`--password-file`) or of stdin (`--password-stdin`), without its line
  ending.  The SCRAM-SHA-256 verifier is stored; the CRAM-MD5 secret stored is the
  password itself (CRAM-MD5 needs a password-equivalent) unless `--no-cram-md5`.
- Domains are normalized with `idna` (UTS 46) to lowercase A-labels without a
  trailing dot; single-label and invalid names are refused.  Certificate
  fingerprints (SHA-256 of the DER client certificate) are accepted as
  "AA:BB:..." or plain hex and stored as 64 lowercase hex digits.  Certificate
  subjects are RFC 4514 strings, most specific RDN first (the output of
  `openssl x509 -noout -subject -nameopt RFC2253`), stored in the canonical form
  of `normalize_subject` -- the function EXTERNAL applies to the peer's
  certificate, so what the operator types matches what the peer presents.
  A malformed fingerprint or subject is a usage error (64); one bound to
  another account, or removing one the account does not have, a data error (65).
- An account without domains is accepted (`account add` without `--domain`
  warns on stderr, exit 0) but its every ATRN is refused; `account list`
  shows `(none!)` as its domains and names such accounts in a note on stderr.

Code: `register` is here, with every name the callers import (re-exported);
the `account` commands are `provider.account_admin`, the `domain` commands
`provider.domain_admin`, and the checks and normalisation of what the
operator types (passwords and SCRAM, domains, certificates, recipients
files) `provider.account_input`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fermoposta.passwords import UnreadableInputError, read_password_file
from fermoposta.provider import account_admin, domain_admin
from fermoposta.provider.account_admin import (
    NO_DOMAINS,
    account_add,
    account_certs,
    account_list,
    account_passwd,
    account_remove,
)
from fermoposta.provider.account_input import (
    DEFAULT_SCRAM_ITERATIONS,
    make_scram_secret,
    normalize_cert_subject,
    normalize_domain,
    normalize_fingerprint,
    read_password_stdin,
    read_recipients_file,
    subject_looks_reversed,
)
from fermoposta.provider.domain_admin import domain_add, domain_list, domain_remove, domain_set
from fermoposta.store.base import Store

__all__ = [
    "DEFAULT_SCRAM_ITERATIONS",
    "NO_DOMAINS",
    "UnreadableInputError",
    "account_add",
    "account_certs",
    "account_list",
    "account_passwd",
    "account_remove",
    "domain_add",
    "domain_list",
    "domain_remove",
    "domain_set",
    "make_scram_secret",
    "normalize_cert_subject",
    "normalize_domain",
    "normalize_fingerprint",
    "read_password_file",
    "read_password_stdin",
    "read_recipients_file",
    "register",
    "subject_looks_reversed",
]


def register(
    subparsers: argparse._SubParsersAction[Any],
    open_store: Callable[[argparse.Namespace], Store] | None = None,
) -> None:
    """Add the `account` and `domain` commands to `subparsers`."""
    del open_store  # the caller opens the store and calls args.handler(args, store)

    account_admin.register(subparsers)
    domain_admin.register(subparsers)
