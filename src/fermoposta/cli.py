"""The `fermoposta` command line.

Contract:
- `main(argv)` parses the arguments, runs one command and returns a sysexits
  code; it never calls `sys.exit` itself (argparse's exits for ``--help``,
  ``--version`` and usage errors are caught and returned as codes).
- Commands: ``provider run``; ``account add|list|remove|passwd|certs``,
  ``domain add|list|remove`` and ``queue list|show|delete|hold|release|bounce|
  retry|stats`` (defined in `fermoposta.provider.accounts` and
  `provider.queue_admin`, which set ``handler(args, store) -> int``; here we
  load the config, open the store and close it afterwards); ``customer
  check|pull|run|outbox`` (`fermoposta.customer.cli`); ``config check|show
  [--kind provider|customer] [FILE]``; ``store migrate|copy``
  (`provider.store_admin`); ``demo``.
- Exit codes (sysexits.h): 0 OK, 64 EX_USAGE (bad command line), 69
  EX_UNAVAILABLE (a command whose module is not installed), 70 EX_SOFTWARE
  (unexpected error), 75 EX_TEMPFAIL (the store is unavailable), 78 EX_CONFIG
  (bad or missing config: stderr says ``fermoposta: <file>: <key>: <problem>``,
  one line for each problem the loader found).
  Handlers may return others (65 EX_DATAERR, 66 EX_NOINPUT, ...).
- ``-c/--config FILE`` is accepted before the command and after any of its
  words (``fermoposta queue list -c FILE`` = ``fermoposta -c FILE queue
  list``), with one meaning: the config file of that command (the provider's,
  or the customer's for ``customer ...``; for ``config check|show`` the file
  to check, like the positional FILE).  Given more than once with different
  values (the positional FILE included): 64, naming both.
- The wrong kind of file is named as such (78): a customer config given to a
  provider command (``provider run``, ``account``, ``domain``, ``queue``,
  ``store``) or a provider config to ``customer ...``.
- Commands that only read the store (``queue``, ``account``/``domain`` other
  than ``add``, ``store copy``) on a SQLite store that does not exist yet:
  66 EX_NOINPUT, ``no store at <path>; is data_dir right? (provider run
  creates it)``, and no empty store is created.  ``account add``, ``domain
  add`` and ``store migrate`` create it.  A PostgreSQL store is not checked.
- Heavy modules (the server, the store, the account commands) are imported
  lazily, so ``config check`` and ``--help`` stay fast and independent of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fermoposta import __version__
from fermoposta.cli_help import COMMAND_HELP
from fermoposta.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ProviderConfig,
    default_config_path,
    load_provider_config,
)

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


class _ConfigOption(argparse.Action):
    """``-c/--config FILE`` at one level of the command line.  Each level keeps
    its own attribute (a subcommand's parser fills a fresh namespace that is
    then copied over its parent's, so one shared attribute would lose the
    outer value); `main()` merges them.  Twice at one level with different
    values is a usage error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        previous = getattr(namespace, self.dest, None)
        if previous is not None and _same_file_key(previous) != _same_file_key(values):
            parser.error(f"-c/--config given twice: {previous} and {values}")
        setattr(namespace, self.dest, values)


def _same_file_key(path: Path) -> Path:
    """One key for every way of naming the same file (relative, absolute,
    through symbolic links)."""
    try:
        return path.resolve()
    except OSError:
        return path


_PROVIDER_CONFIG_HELP = (
    f"provider config file (default: $FERMOPOSTA_CONFIG or {DEFAULT_CONFIG_PATH})"
)
_CUSTOMER_CONFIG_HELP = (
    "customer config file (default: $FERMOPOSTA_CUSTOMER_CONFIG or "
    "/etc/fermoposta/customer.toml)"
)
_NESTED_CONFIG = "config_at_"  # + depth: the attribute of a -c given after a command word


def _add_config_options(parser: argparse.ArgumentParser, depth: int, help_text: str) -> None:
    """Give every subcommand below `parser` its own ``-c/--config``, so the
    option may follow any word of the command."""
    seen: set[int] = set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias
                continue
            seen.add(id(sub))
            text = {"customer": _CUSTOMER_CONFIG_HELP,
                    "config": "the config file (as the positional FILE)"}.get(name, help_text)
            taken = sub._option_string_actions
            if "-c" not in taken and "--config" not in taken:
                sub.add_argument("-c", "--config", dest=f"{_NESTED_CONFIG}{depth}",
                                 action=_ConfigOption, type=Path, default=argparse.SUPPRESS,
                                 metavar="FILE", help=text)
            _add_config_options(sub, depth + 1, text)


def _merge_config(args: argparse.Namespace) -> str | None:
    """Set ``args.config`` from the ``-c`` given anywhere (and ``config check|
    show FILE``); the usage error when they name different files, else None."""
    given: list[Path] = [] if args.config is None else [args.config]
    given += [value for key, value in sorted(vars(args).items())
              if key.startswith(_NESTED_CONFIG)]
    file = getattr(args, "file", None)
    if file is not None:
        given.append(file)
    distinct: list[Path] = []
    for path in given:
        if _same_file_key(path) not in map(_same_file_key, distinct):
            distinct.append(path)
    if len(distinct) > 1:
        return f"-c/--config given twice: {distinct[0]} and {distinct[1]}"
    args.config = distinct[0] if distinct else None
    if file is not None:
        args.file = args.config
    return None


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _effective(config: ProviderConfig, args: argparse.Namespace) -> ProviderConfig:
    """Apply command-line overrides (``-v`` = debug logging with a protocol
    trace, ``--log-format``) to a loaded config."""
    log = config.log
    if args.verbose:
        log = dataclasses.replace(log, level="debug")
    if args.log_format:
        log = dataclasses.replace(log, format=args.log_format)
    return dataclasses.replace(config, log=log)


# -- command handlers: (args) -> exit code ---------------------------------


def _cmd_provider_run(args: argparse.Namespace) -> int:
    _refuse_customer_config(args, "provider")
    # No warning on stderr here: the daemon logs it itself at start (and daily).
    config = _effective(load_provider_config(args.config, warn=None), args)
    # Imported here so config/admin commands do not load the server stack.
    # run() sets up logging from config.log itself.
    from fermoposta.provider.server import run

    return int(run(config))


# Tables of the provider's config that the customer's never has; `make run`'s
# config names several of them.
PROVIDER_MARKERS = frozenset({"listen", "odmr", "store", "limits", "mx", "outbound"})


def _guess_kind(path: Path) -> str | None:
    """"customer" or "provider" as the file looks; None when it cannot be
    read or parsed, or is empty (the loader then reports the problem precisely)."""
    import tomllib

    try:
        with open(path, "rb") as stream:
            raw = tomllib.load(stream)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if "pull" in raw or "provider" in raw:
        return "customer"  # a customer config has a [provider] table and [[pull]] blocks
    if not raw:
        return None
    if set(raw) & PROVIDER_MARKERS:
        # Tables only a provider config has (tests/core/test_cli.py checks
        # them against both schemas): no need to load the customer's.
        return "provider"
    # Without those two tables: by the names only one kind declares (a
    # customer file still missing its [provider] is not a provider config).
    provider_only, customer_only = _names_of_one_kind()
    names = set(raw)
    if names & customer_only and not names & provider_only:
        return "customer"
    return "provider"


def _names_of_one_kind() -> tuple[set[str], set[str]]:
    """The top-level keys and tables only the provider's config declares, and
    those only the customer's does."""
    from fermoposta.config_schema import declared_keys, declared_tables
    from fermoposta.customer.config_tables import CustomerConfig
    from fermoposta.provider_config_tables import ProviderConfig

    def names(cls: type[Any]) -> set[str]:
        return set(declared_keys(cls)) | set(declared_tables(cls))

    provider, customer = names(ProviderConfig), names(CustomerConfig)
    return provider - customer, customer - provider


def _config_kind(path: Path, forced: str | None) -> str:
    """"provider" or "customer": the --kind given, else guessed from the file
    (a customer config has a [provider] table and [[pull]] blocks)."""
    if forced:
        return forced
    return "customer" if _guess_kind(path) == "customer" else "provider"


def _refuse_provider_config(args: argparse.Namespace) -> None:
    """ConfigError (78) when a `customer ...` command was given a provider config.
    (Checked here, not in `customer.cli`, which `fermoposta.cli` imports.)"""
    from fermoposta.customer.config import (
        DEFAULT_CUSTOMER_CONFIG_PATH,
        default_customer_config_path,
    )

    path = args.config if args.config_given else default_customer_config_path()
    if _guess_kind(path) == "provider":
        raise ConfigError(
            f"{path}: this is a provider config; customer commands need the customer's "
            f"(-c {DEFAULT_CUSTOMER_CONFIG_PATH})"
        )


def _refuse_customer_config(args: argparse.Namespace, what: str) -> None:
    """ConfigError (78) when the provider command `what` was given a customer config."""
    if _guess_kind(args.config) == "customer":
        raise ConfigError(
            f"{args.config}: this is a customer config; {what} commands need the "
            f"provider's (-c {DEFAULT_CONFIG_PATH})"
        )


def _load_any(args: argparse.Namespace) -> Any:
    path = args.file if args.file is not None else args.config
    if args.file is None and not args.config_given and args.kind == "customer":
        from fermoposta.customer.config import default_customer_config_path

        path = default_customer_config_path()
    if _config_kind(path, args.kind) == "customer":
        from fermoposta.customer.config import load_customer_config

        return load_customer_config(path)
    return load_provider_config(path)  # ConfigError -> 78 in main()


def _cmd_demo(args: argparse.Namespace) -> int:
    from fermoposta.demo import main as demo

    return demo(keep=args.keep)


def _cmd_config_check(args: argparse.Namespace) -> int:
    config = _load_any(args)
    kind = "customer" if type(config).__name__ == "CustomerConfig" else "provider"
    print(f"OK: {config.path} ({kind} config)")
    return EX_OK


def _cmd_config_show(args: argparse.Namespace) -> int:
    """The effective config, defaults included, as TOML-like text.  The config
    holds no secrets itself (passwords live in files, shown by path); the
    values of keys that name secrets are redacted all the same."""
    config = _load_any(args)
    values = dataclasses.asdict(config)
    if "pulls" in values:  # show a customer config in the shape it is written in
        values["pull"] = [_pull_as_written(p) for p in values.pop("pulls")]
        values["metrics"] = {"listen": values.pop("metrics_listen")}
    if args.changed:
        import tomllib

        with open(config.path, "rb") as f:  # it loaded just now: it parses
            values = {"path": config.path, **_written_only(values, tomllib.load(f))}
    print("\n".join(_render(values)))
    return EX_OK


def _written_only(values: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """`values` (the effective config) cut down to the keys the file sets,
    like `postconf -n`: what the operator changed, with its effective value."""
    kept: dict[str, Any] = {}
    for key, written in raw.items():
        if key not in values:
            continue
        value = values[key]
        if isinstance(written, dict) and isinstance(value, dict) and set(written) <= set(value):
            # A table of declared keys.  (A map of the user's own keys, such
            # as aliases or transport routes, comes back normalised, lower
            # case and A-labels: it is kept whole.)
            kept[key] = _written_only(value, written)
        elif isinstance(written, list) and written and isinstance(written[0], dict) \
                and isinstance(value, list):
            kept[key] = [_written_only(v, w) for v, w in zip(value, written, strict=False)]
        else:
            kept[key] = value
    return kept


def _pull_as_written(pull: dict[str, Any]) -> dict[str, Any]:
    schedule = pull.pop("schedule")
    jitter = schedule["jitter"]
    pull["every"] = schedule["every"] or "push"
    pull["jitter"] = f"{jitter['fraction'] * 100:g}%" if jitter["fraction"] else jitter["seconds"]
    pull["backoff_max"] = schedule["backoff_max"]
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    pull["window"] = [
        {"days": ",".join(days[d] for d in sorted(w["days"])),
         "hours": f"{w['start_hour']:02d}-{w['end_hour']:02d}", "every": w["every"] or "push"}
        for w in schedule["windows"]
    ]
    delivery = {k: v for k, v in pull.pop("delivery").items() if v not in (None, "")}
    if "socket_path" in delivery:
        delivery["address"] = delivery.pop("socket_path")
    if "hostport" in delivery:
        delivery["address"] = delivery.pop("hostport")
    if delivery.get("type") != "maildir":
        delivery.pop("create", None)
        delivery.pop("aliases", None)
    pull["delivery"] = delivery
    return pull


_SECRET_KEYS = ("password", "secret", "key_material")


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)
    )


def _render(values: dict[str, Any], prefix: str = "") -> list[str]:
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in values.items():
        if key == "config_path" or (key == "path" and not prefix):
            if not prefix:
                lines.append(f"# loaded from {value}")
            continue
        if _is_table(value) and key not in ("aliases", "transport"):
            tables.append((key, value))
        elif value and any(s in key for s in _SECRET_KEYS) and not key.endswith("_file"):
            lines.append(f"{key} = \"***\"")
        elif key == "url" and isinstance(value, str) and "@" in value:
            from fermoposta.store import redact_url  # a password in a store URL

            lines.append(f"{key} = {_toml(redact_url(value))}")
        else:
            lines.append(f"{key} = {_toml(value)}")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += ["", f"[{name}]", *_render(value, name + ".")]
        else:
            for item in value:
                lines += ["", f"[[{name}]]", *_render(item, name + ".")]
    return lines


def _toml(value: Any) -> str:
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int):
        return f'"{value[0]}:{value[1]}"'  # host:port
    if isinstance(value, (list, tuple, frozenset, set)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return "[" + ", ".join(_toml(v) for v in items) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


#: The store commands that may create the store: the others only find what
#: is there, so on a store that does not exist they fail (66) instead.
_CREATING = {("account", "add"), ("domain", "add"), ("store", "migrate")}


def _subcommand(args: argparse.Namespace) -> tuple[str, str | None]:
    command = str(args.command)
    sub = getattr(args, f"{command}_command", None)
    return command, None if sub is None else str(sub)


def _missing_store(config: ProviderConfig) -> Path | None:
    """The SQLite file when it does not exist yet (and its directory is not
    something else, which opening reports as unavailable); None otherwise, and
    always for PostgreSQL (the database is there or not)."""
    if config.store.engine != "sqlite":
        return None
    path = config.store_path
    if path.exists() or (path.parent.exists() and not path.parent.is_dir()):
        return None
    return path


def _cmd_store(args: argparse.Namespace) -> int:
    """Run an `account`/`domain`/`queue`/`store` handler with the store opened from the config."""
    command, sub = _subcommand(args)
    _refuse_customer_config(args, command)
    config = load_provider_config(args.config)
    from fermoposta.provider.storage import open_provider_store, store_description
    from fermoposta.store import StoreError

    missing = _missing_store(config)
    if missing is not None and (command, sub) not in _CREATING:
        _err(f"no store at {missing}; is data_dir right? (provider run creates it)")
        return EX_NOINPUT
    try:
        store = open_provider_store(config)
    except (StoreError, OSError) as exc:
        _err(f"cannot open the {store_description(config)}: {exc}")
        return EX_TEMPFAIL
    args.provider_config = config  # for handlers that need more than the store
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


def _command_word(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The command `argv` names (its first word that is not an option of
    `parser`'s own or the value of one), or None when it names none or an
    option is not one of `parser`'s (an abbreviation, say): then every
    command is registered and argparse decides."""
    options = parser._option_string_actions
    words = iter(argv)
    for word in words:
        if word == "--":
            return next(words, None)
        if not word.startswith("-") or word == "-":
            return word
        if word.startswith("--"):
            action = options.get(word.split("=", 1)[0])
            if action is None:
                return None
            if action.nargs != 0 and "=" not in word:
                next(words, None)  # its value
            continue
        for at in range(1, len(word)):  # -v, -cFILE, -vc FILE: flags, then one with a value
            action = options.get("-" + word[at])
            if action is None:
                return None
            if action.nargs != 0:
                if at == len(word) - 1:
                    next(words, None)  # its value is the next word
                break
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser.  With `argv`, only the command it names
    is registered in full (the others are stand-ins with their help line,
    and their modules are not imported: `config check` starts in two thirds
    of the time); without, every command."""
    parser = _Parser(
        prog=PROG, description="On-Demand Mail Relay (RFC 2645 ODMR/ATRN) provider and tools."
    )
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        action=_ConfigOption,
        help=_PROVIDER_CONFIG_HELP + "; also accepted after the command",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at debug level, with a protocol trace (SASL redacted)")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="log lines as text (default) or one JSON object a line")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(command_func=_help(parser))
    only = None if argv is None else _command_word(parser, argv)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    provider = commands.add_parser("provider", help="the provider daemon")
    provider.set_defaults(command_func=_help(provider))
    provider_cmds = provider.add_subparsers(dest="provider_command", metavar="COMMAND")
    run = provider_cmds.add_parser(
        "run",
        help="run the provider in the foreground: the MX, ODMR, ODMR over TLS, submission, "
        "submissions and metrics listeners [listen] and [metrics] turn on",
        description="Run the provider in the foreground until SIGTERM (SIGHUP reloads). "
        "It serves each listener the config turns on: [listen] mx (public MX, port 25), "
        "odmr (ODMR with STARTTLS, port 366), odmr_tls (ODMR over implicit TLS), "
        "submission (port 587, STARTTLS) and submissions (implicit TLS, port 465) for the "
        "customers' outgoing mail, and [metrics] listen (Prometheus /metrics).",
    )
    run.set_defaults(command_func=_cmd_provider_run)

    def in_full(*names: str) -> bool:
        """Whether to register `names` in full; if not, their stand-ins are."""
        if only is None or only in names:
            return True
        for name in names:  # a stand-in: the same line in --help, nothing imported
            stand_in = commands.add_parser(name, help=COMMAND_HELP[name], add_help=False)
            stand_in.add_argument("rest", nargs=argparse.REMAINDER)
            stand_in.set_defaults(stand_in=True)  # main() parses again with every command
        return False

    if in_full("account", "domain"):
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

    if in_full("queue"):
        from fermoposta.provider import queue_admin

        queue_admin.register(commands, None)
        commands.choices["queue"].set_defaults(command_func=_cmd_store)

    if in_full("store"):
        from fermoposta.provider import store_admin

        store_admin.register(commands)
        commands.choices["store"].set_defaults(command_func=_cmd_store)

    if in_full("web"):
        from fermoposta.provider.web import operators as web_operators

        web_operators.register(commands)

    if in_full("customer"):
        from fermoposta.customer.cli import register as register_customer

        register_customer(commands)

    demo = commands.add_parser(
        "demo", help="run a provider and a customer on loopback and narrate one round trip"
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    demo.set_defaults(command_func=_cmd_demo)

    config = commands.add_parser("config", help="configuration tools")
    config.set_defaults(command_func=_help(config))
    config_cmds = config.add_subparsers(dest="config_command", metavar="COMMAND")
    check = config_cmds.add_parser(
        "check", help="load and validate the config; print OK or the error (exit 78)"
    )
    check.add_argument("file", nargs="?", type=Path, metavar="FILE", help="default: -c FILE")
    check.add_argument("--kind", choices=("provider", "customer"), default=None,
                       help="the kind of config (default: guessed from the file)")
    check.set_defaults(command_func=_cmd_config_check)
    show = config_cmds.add_parser(
        "show", help="print the effective config with defaults (secrets redacted)"
    )
    show.add_argument("file", nargs="?", type=Path, metavar="FILE", help="default: -c FILE")
    show.add_argument("--kind", choices=("provider", "customer"), default=None,
                      help="the kind of config (default: guessed from the file)")
    show.add_argument("--changed", action="store_true",
                      help="only the keys the file sets, with their effective values "
                      "(like postconf -n)")
    show.set_defaults(command_func=_cmd_config_show)
    _add_config_options(parser, 1, _PROVIDER_CONFIG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
        if getattr(args, "stand_in", False):  # not the command we took it for
            parser = build_parser()
            args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (EX_OK if exc.code is None else EX_USAGE)
    problem = _merge_config(args)
    if problem is not None:
        parser.print_usage(sys.stderr)
        _err(f"error: {problem}")
        return EX_USAGE
    args.config_given = args.config is not None
    if args.config is None:
        args.config = default_config_path()
    func: Callable[[argparse.Namespace], int] = args.command_func
    try:
        if args.command == "customer" and getattr(args, "customer_command", None):
            _refuse_provider_config(args)
        return func(args)
    except ConfigError as exc:
        for problem in exc.problems:  # every problem the loader found, one a line
            _err(problem)
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
