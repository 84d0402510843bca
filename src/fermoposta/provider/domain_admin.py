"""The `domain` commands: `fermoposta domain add|set|list|remove|check`.

Contract (`register(subparsers)`, called by `provider.accounts.register`,
whose docstring states the commands' conventions and exit codes; the ETRN
options are `provider.etrn_admin`'s, `check` is `provider.dns_check`'s):
- `add DOMAIN --account NAME` holds mail for the domain (normalised by
  `account_input.normalize_domain`), with optional quotas
  (`--max-messages`, `--max-bytes`, not negative), valid recipients
  (`--recipients-file`), its own hold lifetime (`--hold-lifetime`, > 0) and
  ETRN target; an unknown account is a data error (65).
- `list [--account NAME]` prints one row a domain: account, held messages
  and bytes, quota, lifetime ("-": the config's), ETRN.
- `set` changes the ETRN setting only; `remove` stops holding mail for the
  domain (its held mail stays queued).  `check` loads dnspython only when
  it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fermoposta.cli_help import COMMAND_HELP
from fermoposta.config_common import parse_duration
from fermoposta.provider.account_input import read_recipients_file
from fermoposta.provider.account_input import table as _table
from fermoposta.provider.account_input import usage_domain as _usage_domain
from fermoposta.provider.admin import EX_OK
from fermoposta.provider.admin import UsageError as _UsageError
from fermoposta.provider.admin import guarded as _guarded
from fermoposta.provider.etrn_admin import (
    Unchanged,
    add_etrn_options,
    etrn_option,
    format_etrn,
)
from fermoposta.store.base import Directory, Domain, HostedMail, Store

__all__ = ["domain_add", "domain_list", "domain_remove", "domain_set", "register"]


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


def _domain_check(args: argparse.Namespace, store: Store) -> int:
    # dnspython is loaded only for this command.
    from fermoposta.provider.dns_check import domain_check

    return domain_check(args, store)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `domain` command and its subcommands to `subparsers`."""
    domain = subparsers.add_parser("domain", help=COMMAND_HELP["domain"])
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
