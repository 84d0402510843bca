"""The `fermoposta` command line.

Contract:
- `main(argv)` parses the arguments, runs one command and returns a sysexits
  code; it never calls `sys.exit` itself (argparse's exits for ``--help``,
  ``--version`` and usage errors are caught and returned as codes).
- Commands: ``provider run``; ``account add|list|remove|passwd|certs`` and
  ``domain add|list|remove`` (defined in `fermoposta.provider.accounts`, which
  sets ``handler(args, store) -> int``; here we load the config, open the store
  and close it afterwards); ``config check [FILE]``.
- Exit codes (sysexits.h): 0 OK, 64 EX_USAGE (bad command line), 69
  EX_UNAVAILABLE (a command whose module is not installed), 70 EX_SOFTWARE
  (unexpected error), 75 EX_TEMPFAIL (the store is unavailable), 78 EX_CONFIG
  (bad or missing config: stderr says ``fermoposta: <file>: <key>: <problem>``).
  Handlers may return others (65 EX_DATAERR, 66 EX_NOINPUT, ...).
- Heavy modules (the server, the store, the account commands) are imported
  lazily, so ``config check`` and ``--help`` stay fast and independent of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from fermoposta import __version__
from fermoposta.config import ConfigError, ProviderConfig, default_config_path, load_provider_config

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

PROG = "fermoposta"


class _Parser(argparse.ArgumentParser):
    """argparse with sysexits: a usage error exits 64 (EX_USAGE), not 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _effective(config: ProviderConfig, args: argparse.Namespace) -> ProviderConfig:
    """Apply command-line overrides (``-v`` = debug logging) to a loaded config."""
    if args.verbose:
        return dataclasses.replace(config, log=dataclasses.replace(config.log, level="debug"))
    return config


# -- command handlers: (args) -> exit code ---------------------------------


def _cmd_provider_run(args: argparse.Namespace) -> int:
    config = _effective(load_provider_config(args.config), args)
    # Imported here so config/admin commands do not load the server stack.
    # run() sets up logging from config.log itself.
    from fermoposta.provider.server import run

    return int(run(config))


def _cmd_config_check(args: argparse.Namespace) -> int:
    path = args.file if args.file is not None else args.config
    config = load_provider_config(path)  # ConfigError -> 78 in main()
    print(f"OK: {config.path}")
    return EX_OK


def _cmd_store(args: argparse.Namespace) -> int:
    """Run an `account`/`domain` handler with the store opened from the config."""
    config = load_provider_config(args.config)
    from fermoposta.store import StoreError, open_store

    try:
        store = open_store(config.data_dir)
    except (StoreError, OSError) as exc:
        _err(f"cannot open the store in {config.data_dir}: {exc}")
        return EX_TEMPFAIL
    try:
        handler: Callable[[argparse.Namespace, Any], int] = args.handler
        return int(handler(args, store))
    except StoreError as exc:
        _err(f"store error: {exc}")
        return EX_TEMPFAIL
    finally:
        store.close()


def _cmd_unavailable(args: argparse.Namespace) -> int:
    _err(f"the {args.command} commands are not available in this installation")
    return EX_UNAVAILABLE


# -- parser ----------------------------------------------------------------


def _help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EX_USAGE

    return show


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="On-Demand Mail Relay (RFC 2645 ODMR/ATRN) provider and tools."
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"provider config file (default: $FERMOPOSTA_CONFIG or {default_config_path()})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(command_func=_help(parser))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    provider = commands.add_parser("provider", help="the provider daemon")
    provider.set_defaults(command_func=_help(provider))
    provider_cmds = provider.add_subparsers(dest="provider_command", metavar="COMMAND")
    run = provider_cmds.add_parser("run", help="run the MX and ODMR listeners (foreground)")
    run.set_defaults(command_func=_cmd_provider_run)

    try:
        from fermoposta.provider import accounts
    except ModuleNotFoundError as exc:
        if exc.name != "fermoposta.provider.accounts":
            raise
        for name in ("account", "domain"):
            p = commands.add_parser(name, help=f"manage {name}s (not installed)")
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(command_func=_cmd_unavailable)
    else:
        accounts.register(commands, None)
        for name in ("account", "domain"):
            commands.choices[name].set_defaults(command_func=_cmd_store)

    from fermoposta.customer.cli import register as register_customer

    register_customer(commands)

    config = commands.add_parser("config", help="configuration tools")
    config.set_defaults(command_func=_help(config))
    config_cmds = config.add_subparsers(dest="config_command", metavar="COMMAND")
    check = config_cmds.add_parser(
        "check", help="load and validate the config; print OK or the error (exit 78)"
    )
    check.add_argument("file", nargs="?", type=Path, metavar="FILE", help="default: -c FILE")
    check.set_defaults(command_func=_cmd_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (EX_OK if exc.code is None else EX_USAGE)
    args.config_given = args.config is not None
    if args.config is None:
        args.config = default_config_path()
    func: Callable[[argparse.Namespace], int] = args.command_func
    try:
        return func(args)
    except ConfigError as exc:
        _err(str(exc))
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_OK
    except Exception:  # a bug: show it, exit EX_SOFTWARE
        traceback.print_exc()
        return EX_SOFTWARE


if __name__ == "__main__":
    raise SystemExit(main())
