"""The ATRN-wait options of the `account` commands (issue 12): ``account add
NAME --atrn-wait DURATION`` and ``account set NAME --atrn-wait DURATION |
--no-atrn-wait``.

Contract:
- `add_wait_option(parser)` adds ``--atrn-wait DURATION`` to ``account add``;
  `wait_option(args)` turns it into `Account.atrn_wait`: seconds, or None
  (off, the default: a fruitless ATRN gets 453 at once, what cron-driven
  fetchmail expects).  A duration that is not one, is 0, or is longer than
  `MAX_ATRN_WAIT` (9 minutes: RFC 2645 §4 and §5.2 make the client wait at
  least 10 for the reply) is a usage error (64).
- `register_set(account_cmds)` adds ``account set NAME`` with
  ``--atrn-wait DURATION`` or ``--no-atrn-wait`` (one is required);
  `account_set` changes only that (unknown account: 65; store down: 75) and
  prints what the account's ATRNs do now.
- `format_wait(account)` is the WAIT cell of ``account list``: ``-`` or the
  duration (``90s``, ``5m``).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fermoposta.config_common import parse_duration
from fermoposta.provider.admin import EX_OK, DataError, UsageError, guarded
from fermoposta.store.base import Account, Directory

__all__ = ["account_set", "add_wait_option", "format_wait", "register_set", "wait_option"]


def add_wait_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--atrn-wait", metavar="DURATION",
        help="an ATRN that finds no mail waits up to DURATION (at most 9m) and gets 250 "
        "as soon as mail comes, instead of 453 at once (default: off)")


def wait_option(args: argparse.Namespace) -> float | None:
    if getattr(args, "no_atrn_wait", False) or args.atrn_wait is None:
        return None
    try:
        seconds = parse_duration(args.atrn_wait)
    except ValueError as exc:
        raise UsageError(f"--atrn-wait: {exc}") from None
    if seconds <= 0:
        raise UsageError("--atrn-wait: must be longer than 0 (use --no-atrn-wait to turn "
                         "waiting off)")
    # Imported here: the ODMR server is a heavy import for every CLI command.
    from fermoposta.provider.odmr import MAX_ATRN_WAIT

    if seconds > MAX_ATRN_WAIT:
        raise UsageError(f"--atrn-wait: at most {format_seconds(MAX_ATRN_WAIT)} (RFC 2645: "
                         f"the client waits at least 10 minutes for the reply), "
                         f"not {format_seconds(seconds)}")
    return seconds


def format_seconds(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def format_wait(account: Account) -> str:
    return "-" if not account.atrn_wait else format_seconds(account.atrn_wait)


@guarded
def account_set(args: argparse.Namespace, store: Directory) -> int:
    """Change an account's ATRN wait."""
    wait = wait_option(args)
    account = store.get_account(args.name)
    if account is None:
        raise DataError(f"no account {args.name!r}")
    store.update_account(dataclasses.replace(account, atrn_wait=wait))
    if wait is None:
        print(f"account {account.name}: an ATRN without mail gets 453 at once")
    else:
        print(f"account {account.name}: an ATRN without mail waits up to "
              f"{format_seconds(wait)} for it")
    return EX_OK


def register_set(account_cmds: argparse._SubParsersAction[Any]) -> None:
    aset = account_cmds.add_parser("set", help="change an account's ATRN wait")
    aset.add_argument("name", metavar="NAME")
    group = aset.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--atrn-wait", metavar="DURATION",
        help="an ATRN that finds no mail waits up to DURATION (at most 9m) for it")
    group.add_argument("--no-atrn-wait", action="store_true",
                       help="an ATRN that finds no mail gets 453 at once (the default)")
    aset.set_defaults(handler=account_set)
