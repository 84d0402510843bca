"""The queue commands that act: `fermoposta queue
delete|hold|release|bounce|retry|requeue`, and their log lines.

Contract (the handlers `queue_delete` ... `queue_requeue`, wired by
`provider.queue_admin.register`, whose docstring states the commands'
conventions, ids, exit codes and log lines):
- `delete(store, ids, **fields)`, `hold(...)` and `release(...)` are the
  store's actions with their per-message log lines (logger
  ``fermoposta.queue``, component ``queue``; `fields` go into each line,
  e.g. ``by`` from the status page); they return what the store did.
- A handler reads its ids in full first (`-` reads stdin, `ALL` alone and
  in upper case means every message; `bounce` and `retry` refuse `ALL`),
  then acts `BATCH` messages a call, and reports unknown ids on stderr
  after the known ones were done (65).
- `bounce` fails every remaining recipient at once with one DSN to the
  sender (Status `EXPIRED_STATUS` 4.7.0, `EXPIRED_TEXT`; NOTIFY honoured,
  never to `<>`); `retry` makes OUTBOUND recipients due now; `requeue`
  routes each recipient again by the domains hosted now.
- From the CLI (no handler on the ``fermoposta`` logger), an acting
  command's lines go to stderr in the provider's `[log]` format for its
  duration (`_command_log`); stdout keeps the command's output.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO

from fermoposta.provider.account_input import normalize_domain
from fermoposta.provider.admin import EX_DATAERR, EX_OK
from fermoposta.provider.admin import UsageError as _UsageError
from fermoposta.provider.admin import error as _error
from fermoposta.provider.admin import guarded as _guarded
from fermoposta.provider.admin import safe as _safe
from fermoposta.provider.queue_common import all_ids as _all_ids
from fermoposta.provider.queue_common import chunks as _chunks
from fermoposta.provider.queue_common import normalize_id as _normalize_id
from fermoposta.provider.queue_common import plural as _plural
from fermoposta.store.base import AdminStore, QueuedMessage, Requeued

__all__ = [
    "EXPIRED_STATUS",
    "EXPIRED_TEXT",
    "delete",
    "hold",
    "queue_bounce",
    "queue_delete",
    "queue_hold",
    "queue_release",
    "queue_requeue",
    "queue_retry",
    "release",
]

EXPIRED_STATUS = "4.7.0"  # Postfix's code for a forced expiry (postsuper -e)
EXPIRED_TEXT = "message is administratively expired"

_log = logging.getLogger("fermoposta.queue")


# --- the log lines of the actions --------------------------------------------------------


def _note(queue_id: str, action: str, text: str | None = None, **fields: object) -> None:
    """One postsuper-like line ``<ID>: <text>`` (text defaults to `action`);
    the extras are those of `fermoposta.ops.log.event`, so a JSON line
    carries queue_id, action and the fields."""
    _log.info("%s: %s", queue_id, text or action,
              extra={"component": "queue", "queue_id": queue_id,
                     "fields": {"action": action, **fields}})


def delete(store: AdminStore, ids: Sequence[str], **fields: object) -> list[str]:
    """`delete_messages` with its log lines (``<ID>: removed``, with `fields`,
    e.g. who asked from the status page); returns the ids removed."""
    removed = store.delete_messages(ids)
    for message_id in removed:
        _note(message_id, "removed", None, **fields)
    return removed


def hold(store: AdminStore, ids: Sequence[str], **fields: object) -> dict[str, int]:
    """`hold_messages` with its log lines (``<ID>: placed on hold``)."""
    result = store.hold_messages(ids)
    for message_id, recipients in result.items():
        if recipients:
            _note(message_id, "hold", "placed on hold", recipients=recipients, **fields)
    return result


def release(store: AdminStore, ids: Sequence[str], **fields: object) -> dict[str, int]:
    """`release_messages` with its log lines (``<ID>: released from hold``)."""
    result = store.release_messages(ids)
    for message_id, recipients in result.items():
        if recipients:
            _note(message_id, "release", "released from hold", recipients=recipients,
                  **fields)
    return result


@contextlib.contextmanager
def _command_log(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs from the CLI, where no one has configured the
    ``fermoposta`` logger, send its lines to stderr in the provider's format;
    put the logger back as it was afterwards (the tests run many commands in
    one process)."""
    root = logging.getLogger("fermoposta")
    if root.handlers:  # configured by whoever runs us: their lines, their handler
        yield
        return
    from fermoposta.ops.log import LEVELS, JSONFormatter, TextFormatter

    level, fmt, node = "info", "text", ""
    config = getattr(args, "provider_config", None)  # loaded by the CLI already
    if config is None and getattr(args, "config", None) is not None:
        from fermoposta.config import load_provider_config

        config = load_provider_config(args.config, warn=None)
    if config is not None:
        level, fmt, node = config.log.level, config.log.format, config.store.node
    if getattr(args, "verbose", False):
        level = "debug"
    fmt = getattr(args, "log_format", None) or fmt
    import socket

    node = node or socket.gethostname()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(node) if fmt == "json" else TextFormatter(node))
    saved = (root.level, root.propagate)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]
        handler.close()


def _logged(func: Callable[[argparse.Namespace, AdminStore], int]
            ) -> Callable[[argparse.Namespace, AdminStore], int]:
    """Run an acting command inside `_command_log`."""
    @functools.wraps(func)
    def run(args: argparse.Namespace, store: AdminStore) -> int:
        with _command_log(args):
            return func(args, store)

    return run


# --- the ids a command acts on ------------------------------------------------------------


def _read_ids(stream: IO[str]) -> Iterator[str]:
    """Queue ids from `stream`, one a line (blank lines and # comments skipped)."""
    for line in stream:
        value = line.strip()
        if value and not value.startswith("#"):
            yield _normalize_id(value)


# Why a command refuses ALL (None: it accepts ALL).
_NO_ALL = {
    "bounce": "bounce does not take ALL: name the messages, or pipe their ids to -",
    "retry": "without ids, retry makes every outbound recipient due",
}


def _targets(values: Sequence[str], command: str) -> list[str] | None:
    """The ids named on the command line (`-` reads stdin), or None for ALL."""
    words = [v.strip() for v in values]
    no_all = _NO_ALL.get(command)
    if "ALL" in words:
        if no_all is not None:
            raise _UsageError(f"queue {command}: {no_all}")
        if len(words) > 1:
            raise _UsageError(f"queue {command}: ALL stands alone; do not add ids or -")
        return None
    for word in words:
        if word.lower() == "all":
            hint = no_all or "to act on every message, write ALL in upper case"
            raise _UsageError(f"queue {command}: {word!r} is not a queue id; {hint}")
    ids: list[str] = []
    stdin_read = False
    for word in words:
        if word == "-":
            if not stdin_read:
                ids.extend(_read_ids(sys.stdin))
                stdin_read = True
        elif word:
            ids.append(_normalize_id(word))
    return list(dict.fromkeys(i for i in ids if i))


def _apply(store: AdminStore, targets: list[str] | None,
           action: Callable[[Sequence[str]], Iterable[str]]) -> tuple[list[str], list[str]]:
    """Run `action` on the targets (None = every message now queued), BATCH
    ids at a time; return (ids done, unknown ids)."""
    done: list[str] = []
    if targets is None:
        for page in _all_ids(store, time.time()):
            done += action(page)
        return done, []
    for chunk in _chunks(targets):
        done += action(chunk)
    found = set(done)
    return done, [i for i in targets if i not in found]


def _report_unknown(command: str, unknown: Sequence[str]) -> int:
    for message_id in unknown:
        _error(f"queue {command}: {message_id}: no such message in the queue")
    return EX_DATAERR if unknown else EX_OK


# --- delete, hold, release --------------------------------------------------------------------


@_guarded
@_logged
def queue_delete(args: argparse.Namespace, store: AdminStore) -> int:
    """Delete messages without notice (postsuper -d)."""
    targets = _targets(args.ids, "delete")

    def act(ids: Sequence[str]) -> list[str]:
        return delete(store, ids)

    done, unknown = _apply(store, targets, act)
    print(f"Deleted: {_plural(len(done), 'message')}")
    return _report_unknown("delete", unknown)


def _hold_or_release(args: argparse.Namespace, store: AdminStore, command: str,
                     action: Callable[[Sequence[str]], dict[str, int]], verb: str) -> int:
    targets = _targets(args.ids, command)
    changed = 0

    def act(ids: Sequence[str]) -> list[str]:
        nonlocal changed
        result = action(ids)
        changed += sum(result.values())
        return list(result)

    done, unknown = _apply(store, targets, act)
    print(f"{verb}: {_plural(len(done), 'message')} ({_plural(changed, 'recipient')} changed)")
    return _report_unknown(command, unknown)


@_guarded
@_logged
def queue_hold(args: argparse.Namespace, store: AdminStore) -> int:
    """Put messages on operator hold (postsuper -h)."""
    return _hold_or_release(args, store, "hold", functools.partial(hold, store),
                            "Placed on hold")


@_guarded
@_logged
def queue_release(args: argparse.Namespace, store: AdminStore) -> int:
    """Release messages from operator hold (postsuper -H)."""
    return _hold_or_release(args, store, "release", functools.partial(release, store),
                            "Released from hold")


# --- bounce ------------------------------------------------------------------------------------


def _hostname(args: argparse.Namespace) -> str:
    from fermoposta.config import load_provider_config

    return load_provider_config(args.config).hostname


def _sender_hosted(store: AdminStore, sender: str) -> bool:
    if "@" not in sender:
        return False
    domain = sender.rsplit("@", 1)[1]
    try:
        domain = normalize_domain(domain)
    except ValueError:
        domain = domain.lower()
    return store.get_domain(domain) is not None


def _expire(store: AdminStore, hostname: str, message: QueuedMessage) -> tuple[int, str | None]:
    """Fail every recipient of `message` with a DSN; (recipients, DSN id)."""
    from fermoposta.mail.dsn import Action, RecipientReport, build_dsn

    reports = [
        RecipientReport(r, EXPIRED_STATUS, diagnostic=EXPIRED_TEXT + (
            f" (last reply: {r.last_reply})" if r.last_reply else ""))
        for r in message.recipients
    ]
    dsn = build_dsn(store, hostname=hostname, message=message, action=Action.FAILED,
                    reports=reports, sender_domain_hosted=_sender_hosted(store, message.sender),
                    now=time.time())
    try:
        dsn_id = store.record_failed([r.id for r in message.recipients],
                                     f"{EXPIRED_STATUS} {EXPIRED_TEXT}", dsn)
    finally:
        if dsn is not None:
            dsn[1].close()
    return len(message.recipients), dsn_id


@_guarded
@_logged
def queue_bounce(args: argparse.Namespace, store: AdminStore) -> int:
    """Expire messages now with a DSN to the sender (postsuper -e)."""
    targets = _targets(args.ids, "bounce")
    assert targets is not None  # ALL is refused above
    hostname = _hostname(args)
    unknown: list[str] = []
    messages = recipients = notices = 0
    for message_id in targets:
        message = store.get_message(message_id)
        if message is None:
            unknown.append(message_id)
            continue
        count, dsn_id = _expire(store, hostname, message)
        messages += 1
        recipients += count
        if dsn_id is not None:
            notices += 1
            print(f"{message_id}: expired {_plural(count, 'recipient')}; "
                  f"DSN {dsn_id} queued for <{_safe(message.sender)}>")
            _note(message_id, "expired", f"expired, DSN {dsn_id}", recipients=count,
                  dsn=dsn_id)
        else:
            why = "null sender" if not message.sender else "NOTIFY asks for none"
            print(f"{message_id}: expired {_plural(count, 'recipient')}; no DSN ({why})")
            _note(message_id, "expired", f"expired, no DSN ({why})", recipients=count)
    print(f"Expired: {_plural(messages, 'message')} ({_plural(recipients, 'recipient')}); "
          f"{_plural(notices, 'DSN')} queued")
    return _report_unknown("bounce", unknown)


# --- retry -------------------------------------------------------------------------------------


@_guarded
@_logged
def queue_retry(args: argparse.Namespace, store: AdminStore) -> int:
    """Make OUTBOUND recipients due now (postqueue -f / -s)."""
    targets = _targets(args.ids, "retry") if args.ids else None
    now = time.time()
    unknown: list[str] = []
    result: dict[str, int] = {}
    if targets is None:
        result = store.retry_outbound(now, domain=args.domain)
    else:
        for chunk in _chunks(targets):
            result.update(store.retry_outbound(now, message_ids=chunk, domain=args.domain))
        unknown = [i for i in targets if i not in result]
    for message_id, count in result.items():
        if count:
            _note(message_id, "due now", recipients=count)
    recipients = sum(result.values())
    messages = sum(1 for n in result.values() if n)
    print(f"Due now: {_plural(recipients, 'outbound recipient')} of "
          f"{_plural(messages, 'message')}; the provider delivers them at its next queue run "
          "([outbound] queue_interval)")
    return _report_unknown("retry", unknown)


# --- requeue -------------------------------------------------------------------------------


def _requeue_text(change: Requeued) -> str:
    parts = []
    if change.to_outbound:
        parts.append(f"{_plural(change.to_outbound, 'recipient')} held -> outbound")
    if change.to_held:
        parts.append(f"{_plural(change.to_held, 'recipient')} outbound -> held")
    if change.on_hold:
        parts.append(f"{_plural(change.on_hold, 'recipient')} on hold rerouted")
    return ", ".join(parts) if parts else "no change"


@_guarded
@_logged
def queue_requeue(args: argparse.Namespace, store: AdminStore) -> int:
    """Route the recipients again by the domains hosted now (postsuper -r)."""
    targets = _targets(args.ids, "requeue")
    total = Requeued()
    changed = 0

    def act(ids: Sequence[str]) -> list[str]:
        nonlocal total, changed
        result = store.requeue_messages(ids, time.time())
        for message_id in (i for i in ids if i in result):  # in the order given
            change = result[message_id]
            text = _requeue_text(change)
            print(f"{message_id}: {text}")
            if change != Requeued():
                changed += 1
                _note(message_id, "requeued", f"requeued ({text})",
                      to_outbound=change.to_outbound, to_held=change.to_held,
                      on_hold=change.on_hold)
            total = Requeued(total.to_outbound + change.to_outbound,
                             total.to_held + change.to_held, total.on_hold + change.on_hold)
        return list(result)

    done, unknown = _apply(store, targets, act)
    print(f"Requeued: {_plural(len(done), 'message')}, {changed} changed "
          f"({_requeue_text(total)})")
    return _report_unknown("requeue", unknown)
