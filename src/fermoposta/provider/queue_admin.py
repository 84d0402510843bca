"""Queue tools: `fermoposta queue list|show|delete|hold|release|bounce|retry|requeue|stats`.

Contract:
- `register(subparsers, open_store=None)` adds the `queue` command.  Each
  subcommand sets `handler=<callable(args, store) -> int>` with
  `set_defaults`, like `fermoposta.provider.accounts`: the caller loads the
  config (`-c FILE`), opens the store, calls `args.handler(args, store)` and
  closes the store.  `bounce` also reads `hostname` from the config at
  `args.config` (the DSN's Reporting-MTA and From).
- The store may be live (a provider running on it): every store call is one
  short transaction and commands act on at most `BATCH` (in
  `provider.queue_common`) messages per call, so the provider keeps
  receiving, draining and delivering meanwhile.  What a command does to a
  recipient that a queue runner is delivering at that moment (`*` in
  `list`) races with that delivery, as with Postfix's active queue: a
  deleted or bounced message may still be delivered once.
- Conventions of Postfix (operators.md §2.1): `list` prints mailq-like
  blocks (markers `*` being delivered, `!` on operator hold), or with
  `--json` one object a line like `postqueue -j`; `delete ID...|-|ALL` is
  `postsuper -d` (no DSN; `-` reads ids from stdin, one a line; `ALL` only
  in upper case); `hold`/`release` are `postsuper -h`/`-H`; `bounce` is
  `postsuper -e` (each remaining recipient fails at once with a DSN to the
  sender: Action failed, Status 4.7.0, "message is administratively
  expired", honouring NOTIFY, never to `<>`); `retry` makes OUTBOUND
  recipients due now (`postqueue -f`/`-s`); `requeue ID...|-|ALL` is
  `postsuper -r` (each recipient routed again: HELD if its domain is hosted
  now, else OUTBOUND due now; attempts kept; see
  `QueueTools.requeue_messages`); `stats` prints counts per recipient domain
  and qshape's age buckets.  `list --ids` prints only the ids, one a line,
  and `list --count` only their number (`exiqgrep -i`, `-c`; no `-c`
  short option: `-c` is `--config` everywhere); `--older-than` and
  `--younger-than` bound the arrival time, `--account NAME` keeps the
  messages with a recipient in one of that account's domains (an unknown
  account is an error, 65).
- Every action logs one line per message it changed, like postsuper in the
  mail log, on logger ``fermoposta.queue`` (component ``queue``):
  ``<ID>: removed``, ``<ID>: placed on hold``, ``<ID>: released from
  hold``, ``<ID>: expired, DSN <DSN ID>`` (or ``expired, no DSN (...)``),
  ``<ID>: due now``, ``<ID>: requeued (...)``; JSON lines carry
  ``queue_id`` and ``action``.  `delete`, `hold` and `release` are those
  actions with their lines, for the status page too (its lines also carry
  ``by``, the operator or account who acted).  A message the action left unchanged (already
  on hold, nothing to release, ...) gets no line.  When nothing configured
  the ``fermoposta`` logger before (the CLI), the lines go to stderr in the
  provider's `[log]` format and level (`--log-format`, `-v` apply) for the
  time of the command; stdout keeps the command's output.
- Queue ids are compared in upper case; a trailing `*` or `!` (copied from
  `list`) is ignored.  Ids are processed in full before anything is done,
  so `all` in lower case, or `ALL` mixed with ids, changes nothing.
- Exit codes (sysexits): 0 done; 64 (EX_USAGE) bad arguments (argparse
  errors included); 65 (EX_DATAERR) an unknown queue id, reported on stderr
  after the known ones were processed; 75 (EX_TEMPFAIL) the store failed.
  Results go to stdout, errors to stderr as ``fermoposta: <message>``.
- Text output never carries control characters from the queue (addresses
  and remote replies are shown with them replaced by ``?``), except
  `show --body`, which prints the message as stored (line ends as LF).

Code: the argument types and the argparse wiring are here; the commands
that only look (`list`, `show`, `stats`) are `provider.queue_view`, those
that act (and `delete`, `hold`, `release` with their log lines, re-exported
here for the status page) `provider.queue_actions`; their paging and small
helpers `provider.queue_common`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fermoposta.cli_help import COMMAND_HELP
from fermoposta.config_common import parse_duration
from fermoposta.provider.account_input import normalize_domain
from fermoposta.provider.queue_actions import (
    delete,
    hold,
    queue_bounce,
    queue_delete,
    queue_hold,
    queue_release,
    queue_requeue,
    queue_retry,
    release,
)
from fermoposta.provider.queue_view import AGE_LIMITS_MINUTES, queue_list, queue_show, queue_stats
from fermoposta.store.base import QUEUE_STATES, Store

__all__ = ["AGE_LIMITS_MINUTES", "delete", "hold", "register", "release"]


# --- arguments -----------------------------------------------------------------------------


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _domain_arg(text: str) -> str:
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        return value.lower()  # an address literal, stored as is
    try:
        return normalize_domain(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _top_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --- argparse wiring ---------------------------------------------------------------------


def _ids_argument(parser: argparse.ArgumentParser, all_ok: bool, optional: bool = False) -> None:
    what = "queue ids; - reads them from stdin, one a line"
    if all_ok:
        what += "; ALL (upper case) means every message"
    parser.add_argument("ids", nargs="*" if optional else "+", metavar="ID", help=what)


def register(
    subparsers: argparse._SubParsersAction[Any],
    open_store: Callable[[argparse.Namespace], Store] | None = None,
) -> None:
    """Add the `queue` command and its subcommands to `subparsers`."""
    del open_store  # the caller opens the store and calls args.handler(args, store)

    queue = subparsers.add_parser(
        "queue", help=COMMAND_HELP["queue"])
    cmds = queue.add_subparsers(dest="queue_command", metavar="COMMAND")
    cmds.required = True

    lst = cmds.add_parser("list", help="list queued messages (like mailq / postqueue -j)")
    output = lst.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="one JSON object per message and line, like postqueue -j")
    output.add_argument("-i", "--ids", action="store_true",
                        help="only the queue ids, one a line (like exiqgrep -i)")
    output.add_argument("--count", action="store_true",
                        help="only the number of matching messages (like exiqgrep -c)")
    lst.add_argument("--domain", type=_domain_arg, metavar="DOMAIN",
                     help="messages with a recipient in DOMAIN")
    lst.add_argument("--sender", metavar="SENDER",
                     help="sender address (exact), part of one (substring), or <> (null sender)")
    lst.add_argument("--recipient", metavar="RCPT",
                     help="recipient address (exact) or part of one (substring)")
    lst.add_argument("--older-than", type=_duration_arg, metavar="DURATION",
                     help="received more than DURATION ago (e.g. 30m, 2h, 3d)")
    lst.add_argument("--younger-than", type=_duration_arg, metavar="DURATION",
                     help="received less than DURATION ago")
    lst.add_argument("--account", metavar="NAME",
                     help="messages with a recipient in one of the domains of account NAME")
    lst.add_argument("--state", choices=QUEUE_STATES,
                     help="messages with a recipient in this state "
                     "(deferred = outbound and failed at least once)")
    lst.set_defaults(handler=queue_list)

    show = cmds.add_parser("show", help="envelope, recipient status and headers of a message")
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true",
                      help="print the whole message instead of its headers")
    show.add_argument("--json", action="store_true", help="the message's `list --json` object")
    show.set_defaults(handler=queue_show)

    delete = cmds.add_parser("delete", help="delete messages without notice (postsuper -d)")
    _ids_argument(delete, all_ok=True)
    delete.set_defaults(handler=queue_delete)

    hold = cmds.add_parser("hold", help="put messages on hold: not drained, not delivered")
    _ids_argument(hold, all_ok=True)
    hold.set_defaults(handler=queue_hold)

    release = cmds.add_parser("release", help="release held messages to their previous state")
    _ids_argument(release, all_ok=True)
    release.set_defaults(handler=queue_release)

    bounce = cmds.add_parser("bounce", help="expire messages now, with a DSN to the sender")
    _ids_argument(bounce, all_ok=False)
    bounce.set_defaults(handler=queue_bounce)

    retry = cmds.add_parser("retry", help="make outbound recipients due now")
    _ids_argument(retry, all_ok=False, optional=True)
    retry.add_argument("--domain", type=_domain_arg, metavar="DOMAIN",
                       help="only recipients in DOMAIN")
    retry.set_defaults(handler=queue_retry)

    requeue = cmds.add_parser(
        "requeue", help="route recipients again by the domains hosted now (postsuper -r)")
    _ids_argument(requeue, all_ok=True)
    requeue.set_defaults(handler=queue_requeue)

    stats = cmds.add_parser("stats", help="counts per recipient domain and age (like qshape)")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.add_argument("--top", type=_top_arg, default=20, metavar="N",
                       help="domains shown, most recipients first (default %(default)s)")
    stats.set_defaults(handler=queue_stats)
