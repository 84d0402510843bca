"""`fermoposta customer check|pull|run|outbox`: the customer's commands.

Contract: each command loads the customer config (`-c FILE` before or after
any word of the command -- `fermoposta.cli` gives every subcommand the option
and merges them into `args.config` -- else $FERMOPOSTA_CUSTOMER_CONFIG, else
/etc/fermoposta/customer.toml; `fermoposta.cli` refuses a provider config
as such, 78, before the command runs),
prints a human summary on stdout, logs on stderr, and exits with the codes
of `fermoposta.customer.errors` (0 when the session worked, whether or not
there was mail).  `pull` with several blocks
exits with the first non-zero code of the blocks, after running them all.

`outbox list` prints the outbox (exit 0, 75 if its spool cannot be read);
`outbox push` pushes it now and prints the push summary (exit codes as
`pull`; 73 when another push runs, unless `--wait`); `outbox serve` runs the
outbox listener (and the continuous push) without pulling, until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from fermoposta.cli_help import COMMAND_HELP
from fermoposta.ops.log import setup_logging

EX_CONFIG = 78
EX_USAGE = 64


def _load(args: argparse.Namespace) -> Any:
    from fermoposta.customer.config import default_customer_config_path, load_customer_config

    path = args.config if args.config_given else default_customer_config_path()
    config = load_customer_config(path)
    setup_logging("debug" if args.verbose else config.log.level,
                  args.log_format or config.log.format)
    return config


def _cmd_check(args: argparse.Namespace) -> int:
    from fermoposta.customer.pull import check

    config = _load(args)
    code, lines = asyncio.run(check(config))
    print("\n".join(lines))
    return code


def _cmd_pull(args: argparse.Namespace) -> int:
    from fermoposta.customer.pull import pull_once

    config = _load(args)
    pulls = [p for p in config.pulls if not args.only or p.name in args.only]
    unknown = set(args.only or ()) - {p.name for p in config.pulls}
    if unknown:
        print(f"fermoposta: no [[pull]] block named {', '.join(sorted(unknown))}",
              file=sys.stderr)
        return EX_USAGE

    async def all_pulls() -> int:
        code = 0
        for pull in pulls:
            summary = await pull_once(config, pull, wait=args.wait)
            print("\n".join(summary.lines()), flush=True)
            code = code or summary.exit_code
        return code

    return asyncio.run(all_pulls())


def _cmd_outbox_list(args: argparse.Namespace) -> int:
    from fermoposta.customer.outbox import (
        notice_message_ids,
        open_outbox,
        outbox_message_ids,
        outbox_path,
    )
    from fermoposta.store import StoreError

    config = _load(args)
    if not outbox_path(config).exists():
        print("outbox: empty" + ("" if config.outbox.enabled else " (no [outbox] listen)"))
        return 0
    try:
        store = open_outbox(config)
        try:
            ids = outbox_message_ids(store) + notice_message_ids(store)
            messages = [m for m in (store.get_message(i) for i in ids) if m is not None]
        finally:
            store.close()
    except StoreError as exc:
        print(f"fermoposta: cannot read the outbox: {exc}", file=sys.stderr)
        return 75
    if not messages:
        print("outbox: empty")
        return 0
    for message in messages:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(message.received_at))
        kind = "notice " if message.sender == "" else ""
        print(f"{message.id}  {message.size:>9}  {when}  {kind}<{message.sender}>")
        for rcpt in message.recipients:
            state = "to push" if rcpt.state == "outbound" else "to deliver locally"
            tried = f", {rcpt.attempts} attempt(s)" if rcpt.attempts else ""
            print(f"    {rcpt.address} ({state}{tried})"
                  + (f": {rcpt.last_reply}" if rcpt.last_reply else ""))
    print(f"-- {len(messages)} message(s)")
    return 0


def _cmd_outbox_push(args: argparse.Namespace) -> int:
    from fermoposta.customer.outbox_push import push_outbox

    config = _load(args)
    result = asyncio.run(push_outbox(config, wait=args.wait))
    print("\n".join(result.lines()), flush=True)
    return result.exit_code


def _cmd_outbox_serve(args: argparse.Namespace) -> int:
    from fermoposta.customer.daemon import serve_outbox

    config = _load(args)
    return asyncio.run(serve_outbox(config))


def _cmd_run(args: argparse.Namespace) -> int:
    from fermoposta.customer.daemon import Daemon

    config = _load(args)
    return asyncio.run(Daemon(config).run())


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    customer = commands.add_parser("customer", help=COMMAND_HELP["customer"])
    sub = customer.add_subparsers(dest="customer_command", metavar="COMMAND")

    check = sub.add_parser("check", help="connect, STARTTLS, verify, AUTH; no ATRN")
    check.set_defaults(command_func=_cmd_check)
    pull = sub.add_parser("pull", help="one session per [[pull]] block now; prints a summary")
    pull.add_argument("--wait", action="store_true",
                      help="wait for a session of the same block to end instead of exiting 73")
    pull.add_argument("--only", action="append", metavar="NAME",
                      help="only this [[pull]] block (repeatable)")
    pull.set_defaults(command_func=_cmd_pull)
    run = sub.add_parser("run", help="daemon: pull on schedule; SIGUSR1 pulls now")
    run.set_defaults(command_func=_cmd_run)

    outbox = sub.add_parser("outbox", help="the outbox: outgoing mail of the site")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", metavar="COMMAND")
    listing = outbox_sub.add_parser("list", help="show the mail waiting in the outbox")
    listing.set_defaults(command_func=_cmd_outbox_list)
    push = outbox_sub.add_parser("push", help="push the outbox to the provider now")
    push.add_argument("--wait", action="store_true",
                      help="wait for a push in progress to end instead of exiting 73")
    push.set_defaults(command_func=_cmd_outbox_push)
    serve = outbox_sub.add_parser("serve", help="run the outbox listener (and the continuous "
                                  "push) without pulling")
    serve.set_defaults(command_func=_cmd_outbox_serve)

    def show_outbox_help(args: argparse.Namespace) -> int:
        outbox.print_help(sys.stderr)
        return EX_USAGE

    outbox.set_defaults(command_func=show_outbox_help)

    def show_help(args: argparse.Namespace) -> int:
        customer.print_help(sys.stderr)
        return EX_USAGE

    customer.set_defaults(command_func=show_help)
