"""The ETRN options of the `domain` commands: ``domain add|set DOMAIN
--etrn-host HOST[:PORT] | --etrn-mx`` and ``domain set DOMAIN --no-etrn``.

Contract:
- `add_etrn_options(parser, set_command=...)` adds the mutually exclusive
  options; `etrn_option(args)` turns them into `Domain.etrn`: the target
  ``host`` or ``host:port`` (validated by `resolver.split_host_port`, stored
  normalised: lowercase, the port only when given), ``""`` for the domain's
  MX hosts, None for "not an ETRN domain"; `UNCHANGED` when none was given.
  A malformed target is a usage error (64).
- `format_etrn(domain)` is the ETRN cell of ``domain list``: ``-`` (none),
  ``mx`` or the target.
"""

from __future__ import annotations

import argparse
from typing import Final

from fermoposta.provider.admin import UsageError
from fermoposta.store.base import Domain

__all__ = ["UNCHANGED", "Unchanged", "add_etrn_options", "etrn_option", "format_etrn"]


class Unchanged:
    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()


def add_etrn_options(parser: argparse.ArgumentParser, *, set_command: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=set_command)
    group.add_argument(
        "--etrn-host", metavar="HOST[:PORT]",
        help="an ETRN domain (RFC 1985): its held mail goes to this server when the "
        "customer sends ETRN (port default: [outbound] port)")
    group.add_argument(
        "--etrn-mx", action="store_true",
        help="an ETRN domain whose held mail goes to its MX hosts better than this provider")
    if set_command:
        group.add_argument("--no-etrn", action="store_true",
                           help="no longer an ETRN domain (its mail waits for ATRN)")


def etrn_option(args: argparse.Namespace) -> str | Unchanged | None:
    if getattr(args, "no_etrn", False):
        return None
    if args.etrn_mx:
        return ""
    if args.etrn_host is None:
        return UNCHANGED
    # Imported here: dnspython is a heavy import for every CLI command.
    from fermoposta.provider.resolver import split_host_port

    text = str(args.etrn_host).strip()
    try:
        host, port = split_host_port(text, 0)
    except ValueError as exc:
        raise UsageError(f"--etrn-host: {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 0 else f"{shown}:{port}"


def format_etrn(domain: Domain) -> str:
    if domain.etrn is None:
        return "-"
    return domain.etrn or "mx"
