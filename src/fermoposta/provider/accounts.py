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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import idna
import scramp

from fermoposta.config_common import parse_duration
from fermoposta.passwords import UnreadableInputError, first_line, read_password_file
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
from fermoposta.provider.etrn_admin import (
    Unchanged,
    add_etrn_options,
    etrn_option,
    format_etrn,
)
from fermoposta.smtp.sasl import normalize_subject
from fermoposta.smtp.x509name import parse_subject
from fermoposta.store.base import (
    Account,
    Directory,
    Domain,
    HostedMail,
    ScramSecret,
    Store,
    StoreError,
)

DEFAULT_SCRAM_ITERATIONS = 4096

#: The DOMAINS cell of `account list` for an account without domains (its
#: ATRN is refused until one is added).
NO_DOMAINS = "(none!)"


_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}\Z")
_HEX = re.compile(r"[0-9a-f]{64}\Z")


# --- helpers usable outside the CLI ------------------------------------------------------


def make_scram_secret(password: str, iterations: int = DEFAULT_SCRAM_ITERATIONS) -> ScramSecret:
    """Salted SCRAM-SHA-256 verifier of `password` (SASLprep applied by scramp).

    Raises ValueError (without the password in the message) if SASLprep refuses
    the password or the iteration count is out of scramp's range.
    """
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    try:
        salt, stored_key, server_key, count = mechanism.make_auth_info(
            password, iteration_count=iterations
        )
    except scramp.ScramException as exc:
        if "iteration" in str(exc).lower():
            raise ValueError(f"bad SCRAM iteration count {iterations}: {exc}") from None
        raise ValueError("the password contains characters SASLprep prohibits") from None
    return ScramSecret(
        salt=bytes(salt),
        iterations=int(count),
        stored_key=bytes(stored_key),
        server_key=bytes(server_key),
    )


def read_password_stdin(stream: TextIO | None = None) -> str:
    """The first line of stdin (or `stream`) without its line ending."""
    try:
        return first_line(stream if stream is not None else sys.stdin, "stdin")
    except UnicodeDecodeError:
        raise UnreadableInputError("stdin: the password is not UTF-8") from None
    except OSError as exc:
        raise UnreadableInputError(f"cannot read the password from stdin: {exc}") from None


def normalize_domain(name: str) -> str:
    """Lowercase A-label form of `name` (trailing dot dropped); ValueError if invalid."""
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty domain name")
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise ValueError(f"invalid domain name {name!r}: {exc}") from None
    if "." not in ascii_name:
        raise ValueError(f"invalid domain name {name!r}: a single label is not a mail domain")
    if len(ascii_name) > 253:
        raise ValueError(f"invalid domain name {name!r}: longer than 253 characters")
    return ascii_name


def normalize_fingerprint(text: str) -> str:
    """64 lowercase hex digits from "AA:BB:..." or plain hex; ValueError if not SHA-256."""
    hexdigits = text.strip().replace(":", "").lower()
    if not _HEX.match(hexdigits):
        raise ValueError(
            f"invalid certificate fingerprint {text!r}: expected the SHA-256 of the "
            "certificate as 64 hex digits (colons allowed)"
        )
    return hexdigits


def normalize_cert_subject(text: str) -> str:
    """The canonical RFC 4514 form of a certificate subject; ValueError if malformed."""
    try:
        subject = normalize_subject(text)
    except ValueError as exc:
        raise ValueError(
            f"invalid certificate subject {text!r}: {exc} (expected an RFC 4514 name, most "
            'specific first, like "CN=customer,O=Example Ltd,C=IT")'
        ) from None
    return subject


def read_recipients_file(path: str | Path) -> frozenset[str]:
    """Local parts, one a line (blank lines and `#` comments skipped), lowercased."""
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except UnicodeDecodeError:
        raise UnreadableInputError(f"{path}: the recipients file is not UTF-8") from None
    except OSError as exc:
        raise UnreadableInputError(
            f"cannot read recipients file {path}: {exc.strerror or exc}"
        ) from None
    result: set[str] = set()
    for number, raw in enumerate(lines, 1):
        local = raw.strip()
        if not local or local.startswith("#"):
            continue
        if "@" in local or any(c.isspace() for c in local):
            raise ValueError(f"{path}:{number}: not a local part: {local!r}")
        result.add(local.lower())
    return frozenset(result)


# --- command handlers --------------------------------------------------------------------


def _usage_domain(name: str) -> str:
    try:
        return normalize_domain(name)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


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


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    all_rows = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in all_rows
    )


def _usage_fingerprints(values: Iterable[str]) -> list[str]:
    try:
        return list(dict.fromkeys(normalize_fingerprint(f) for f in values))
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def subject_looks_reversed(subject: str) -> bool:
    """True if `subject` starts with C or DC and goes on with more specific RDNs:
    likely most general first (`openssl x509 -subject` without -nameopt RFC2253)."""
    general = {"C", "DC"}
    rdns = parse_subject(subject)
    return (
        len(rdns) > 1
        and all(kind in general for kind, _ in rdns[0])
        and any(kind not in general for rdn in rdns[1:] for kind, _ in rdn)
    )


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


def _quota(value: int | None, flag: str) -> int | None:
    if value is not None and value < 0:
        raise _UsageError(f"{flag} must not be negative")
    return value


@_guarded
def domain_add(args: argparse.Namespace, store: Directory) -> int:
    """Add a domain to an account."""
    name = _usage_domain(args.domain)
    max_messages = _quota(args.max_messages, "--max-messages")
    max_bytes = _quota(args.max_bytes, "--max-bytes")
    valid = None
    if args.recipients_file is not None:
        valid = read_recipients_file(args.recipients_file)
    lifetime = None
    if args.hold_lifetime is not None:
        try:
            lifetime = parse_duration(args.hold_lifetime)
        except ValueError as exc:
            raise _UsageError(f"--hold-lifetime: {exc}") from None
        if lifetime <= 0:
            raise _UsageError("--hold-lifetime must be positive")
    etrn = etrn_option(args)
    if store.get_account(args.account) is None:
        raise ValueError(f"no account {args.account!r}")
    store.add_domain(
        Domain(
            name=name,
            account=args.account,
            max_messages=max_messages,
            max_bytes=max_bytes,
            valid_recipients=valid,
            hold_lifetime=lifetime,
            etrn=None if isinstance(etrn, Unchanged) else etrn,
        )
    )
    detail = "" if valid is None else f" ({len(valid)} valid recipients)"
    if not isinstance(etrn, Unchanged):
        detail += f" (ETRN: {etrn or 'mx'})"
    print(f"domain {name} added to account {args.account}{detail}")
    return EX_OK


def _format_quota(domain: Domain) -> str:
    if domain.max_messages is None and domain.max_bytes is None:
        return "-"
    messages = "-" if domain.max_messages is None else str(domain.max_messages)
    size = "-" if domain.max_bytes is None else str(domain.max_bytes)
    return f"{messages} msgs/{size} bytes"


def _format_lifetime(domain: Domain) -> str:
    """The domain's own hold lifetime ("-" = the config's `[hold] lifetime`)."""
    seconds = domain.hold_lifetime
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@_guarded
def domain_list(args: argparse.Namespace, store: HostedMail) -> int:
    """Print the domains with their held mail and quotas."""
    if args.account is not None and store.get_account(args.account) is None:
        raise ValueError(f"no account {args.account!r}")
    rows = []
    for domain in store.list_domains(args.account):
        messages, size = store.domain_usage(domain.name)
        rows.append([domain.name, domain.account, str(messages), str(size), _format_quota(domain),
                     _format_lifetime(domain), format_etrn(domain)])
    print(_table(["DOMAIN", "ACCOUNT", "HELD MSGS", "HELD BYTES", "QUOTA", "LIFETIME", "ETRN"],
                 rows))
    return EX_OK


@_guarded
def domain_set(args: argparse.Namespace, store: Directory) -> int:
    """Change a domain's ETRN setting; its held mail is untouched."""
    name = _usage_domain(args.domain)
    etrn = etrn_option(args)
    domain = store.get_domain(name)
    if domain is None:
        raise ValueError(f"no domain {name}")
    if not isinstance(etrn, Unchanged):
        domain = dataclasses.replace(domain, etrn=etrn)
        store.update_domain(domain)
    print(f"domain {name}: ETRN {format_etrn(domain)}")
    return EX_OK


@_guarded
def domain_remove(args: argparse.Namespace, store: Directory) -> int:
    """Remove a domain; its held mail stays queued."""
    name = _usage_domain(args.domain)
    if not store.remove_domain(name):
        raise ValueError(f"no domain {name}")
    print(f"domain {name} removed (held mail stays queued)")
    return EX_OK


# --- argparse wiring ---------------------------------------------------------------------


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


def _domain_check(args: argparse.Namespace, store: Store) -> int:
    # dnspython is loaded only for this command.
    from fermoposta.provider.dns_check import domain_check

    return domain_check(args, store)


def register(
    subparsers: argparse._SubParsersAction[Any],
    open_store: Callable[[argparse.Namespace], Store] | None = None,
) -> None:
    """Add the `account` and `domain` commands to `subparsers`."""
    del open_store  # the caller opens the store and calls args.handler(args, store)

    account = subparsers.add_parser("account", help="manage ODMR customer accounts")
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

    domain = subparsers.add_parser("domain", help="manage the domains mail is held for")
    domain_cmds = domain.add_subparsers(dest="domain_command", metavar="COMMAND")
    domain_cmds.required = True

    dadd = domain_cmds.add_parser("add", help="hold mail for a domain")
    dadd.add_argument("domain", metavar="DOMAIN")
    dadd.add_argument("--account", required=True, metavar="NAME")
    dadd.add_argument("--max-messages", type=int, metavar="N", help="quota of held messages")
    dadd.add_argument("--max-bytes", type=int, metavar="N", help="quota of held bytes")
    dadd.add_argument(
        "--recipients-file",
        metavar="FILE",
        help="valid local parts, one a line; enables recipient validation",
    )
    dadd.add_argument(
        "--hold-lifetime",
        metavar="DURATION",
        help="how long held mail waits for collection before it expires with a DSN "
        "(e.g. 60d; default: [hold] lifetime)",
    )
    add_etrn_options(dadd)
    dadd.set_defaults(handler=domain_add)

    dset = domain_cmds.add_parser("set", help="change a domain's ETRN setting")
    dset.add_argument("domain", metavar="DOMAIN")
    add_etrn_options(dset, set_command=True)
    dset.set_defaults(handler=domain_set)

    dlist = domain_cmds.add_parser("list", help="list the domains and their held mail")
    dlist.add_argument("--account", metavar="NAME")
    dlist.set_defaults(handler=domain_list)

    dremove = domain_cmds.add_parser("remove", help="stop holding mail for a domain")
    dremove.add_argument("domain", metavar="DOMAIN")
    dremove.set_defaults(handler=domain_remove)

    dcheck = domain_cmds.add_parser(
        "check", help="do the hosted domains' MX records point here? (and SPF)")
    dcheck.add_argument("domains", nargs="*", metavar="DOMAIN",
                        help="default: every hosted domain")
    dcheck.set_defaults(handler=_domain_check)
