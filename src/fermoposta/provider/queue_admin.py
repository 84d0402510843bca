"""Queue tools: `fermoposta queue list|show|delete|hold|release|bounce|retry|requeue|stats`.

Contract:
- `register(subparsers, open_store=None)` adds the `queue` command.  Each
  subcommand sets `handler=<callable(args, store) -> int>` with
  `set_defaults`, like `fermoposta.provider.accounts`: the caller loads the
  config (`-c FILE`), opens the store, calls `args.handler(args, store)` and
  closes the store.  `bounce` also reads `hostname` from the config at
  `args.config` (the DSN's Reporting-MTA and From).
- The store may be live (a provider running on it): every store call is one
  short transaction and commands act on at most `BATCH` messages per call,
  so the provider keeps receiving, draining and delivering meanwhile.  What
  a command does to a recipient that a queue runner is delivering at that
  moment (`*` in `list`) races with that delivery, as with Postfix's
  active queue: a deleted or bounced message may still be delivered once.
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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import heapq
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, TypeVar

from fermoposta.config_common import parse_duration
from fermoposta.provider.accounts import normalize_domain
from fermoposta.provider.admin import EX_DATAERR, EX_OK
from fermoposta.provider.admin import DataError as _DataError
from fermoposta.provider.admin import UsageError as _UsageError
from fermoposta.provider.admin import error as _error
from fermoposta.provider.admin import guarded as _guarded
from fermoposta.provider.admin import safe as _safe
from fermoposta.store.base import (
    QUEUE_STATES,
    AdminStore,
    DomainShape,
    QueuedMessage,
    QueueEntry,
    QueueFilter,
    RecipientState,
    Requeued,
    Store,
)

__all__ = ["AGE_LIMITS_MINUTES", "BATCH", "delete", "hold", "register", "release"]


BATCH = 500  # messages per store call (one short transaction each)
AGE_LIMITS_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's buckets
EXPIRED_STATUS = "4.7.0"  # Postfix's code for a forced expiry (postsuper -e)
EXPIRED_TEXT = "message is administratively expired"

_log = logging.getLogger("fermoposta.queue")
_T = TypeVar("_T")


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



# --- small helpers -----------------------------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _age(seconds: float) -> str:
    """A short age: 45s, 12m, 3h05m, 2d04h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _local(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(at))


def _int_time(at: float | None) -> int | None:
    return None if at is None else int(at)


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


def _address_match(text: str) -> tuple[str, bool]:
    """(value, exact): a whole address (local@domain, brackets optional) or
    `<>` matches exactly; anything else is a substring."""
    value = text.strip()
    if value in ("<>", ""):
        return "", True
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    local, at, domain = value.rpartition("@")
    return value, bool(at and local and domain)


def _filter(args: argparse.Namespace, now: float) -> QueueFilter:
    """The store's filter of the list options (the age bound and the account
    are applied around it: see `_matching`)."""
    sender = sender_exact = None
    if args.sender is not None:
        sender, sender_exact = _address_match(args.sender)
    recipient = recipient_exact = None
    if args.recipient is not None:
        recipient, recipient_exact = _address_match(args.recipient)
        if not recipient:
            raise _UsageError("--recipient: a recipient is never the null address <>")
    return QueueFilter(
        domain=args.domain,
        sender=sender,
        sender_exact=bool(sender_exact),
        recipient=recipient,
        recipient_exact=bool(recipient_exact),
        received_before=None if args.older_than is None else now - args.older_than,
        state=args.state,
    )


def _normalize_id(text: str) -> str:
    return text.strip().rstrip("*!").upper()


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


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def _all_ids(store: AdminStore, start: float) -> Iterator[list[str]]:
    """Pages of the ids of every message received before `start`."""
    where = QueueFilter(received_before=start)
    after: tuple[float, str] | None = None
    while True:
        page = store.queue_ids(where, after, BATCH)
        if not page:
            return
        yield [message_id for _, message_id in page]
        if len(page) < BATCH:
            return
        after = page[-1]


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


# --- list ------------------------------------------------------------------------------------

_HEADER = (f"{'-Queue ID-':<13} {'--Size--':>8} {'----Arrival Time----':<20}"
           "  -Sender/Recipient-------")
_INDENT = " " * 45


def _marker(entry: QueueEntry) -> str:
    if entry.active:
        return "*"
    if any(r.state == RecipientState.HOLD for r in entry.message.recipients):
        return "!"
    return ""


def _sender_text(sender: str) -> str:
    return _safe(sender) if sender else "MAILER-DAEMON"


def _block(entry: QueueEntry) -> list[str]:
    m = entry.message
    arrival = time.strftime("%a %b %e %H:%M:%S", time.localtime(m.received_at))
    lines = [f"{m.id + _marker(entry):<13} {m.size:>8} {arrival:<20}  {_sender_text(m.sender)}"]
    for r in m.recipients:
        line = f"{_INDENT}{_safe(r.address)}  {r.state} attempts={r.attempts}"
        if r.last_reply:
            line += f" ({_safe(r.last_reply)})"
        lines.append(line)
    return lines


def _json_entry(entry: QueueEntry) -> dict[str, Any]:
    m = entry.message
    return {
        "queue_id": m.id,
        "arrival_time": int(m.received_at),
        "message_size": m.size,
        "sender": m.sender,
        "origin": str(m.origin),
        "client": m.client,
        "node": m.node,
        "active": bool(entry.active),
        "on_hold": any(r.state == RecipientState.HOLD for r in m.recipients),
        "recipients": [
            {
                "address": r.address,
                "domain": r.domain,
                "state": str(r.state),
                "attempts": r.attempts,
                "last_reply": r.last_reply,
                "next_attempt_at": _int_time(r.next_attempt_at),
                "first_failure_at": _int_time(r.first_failure_at),
                "active": r.id in entry.active,
                "hold_from": (str(entry.hold_from[r.id]) if r.id in entry.hold_from
                              else None),
            }
            for r in m.recipients
        ],
    }


def _pages(fetch: Callable[[QueueFilter, tuple[float, str] | None, int], list[_T]],
           where: QueueFilter, after: tuple[float, str] | None,
           key: Callable[[_T], tuple[float, str]]) -> Iterator[_T]:
    """Every item `fetch` returns for `where` after the key `after`, BATCH a call."""
    while True:
        page = fetch(where, after, BATCH)
        yield from page
        if len(page) < BATCH:
            return
        after = key(page[-1])


def _matching(store: AdminStore, args: argparse.Namespace, now: float,
              fetch: Callable[[QueueFilter, tuple[float, str] | None, int], list[_T]],
              key: Callable[[_T], tuple[float, str]]) -> Iterator[_T]:
    """The items (entries or keys) of the messages matching the list options,
    oldest first.  `--younger-than` starts the pages at its cutoff (they are
    keyed by arrival); `--account` is one store filter per domain of the
    account, merged by key (a message with recipients in two of them comes
    once)."""
    where = _filter(args, now)
    after: tuple[float, str] | None = None
    cutoff: float | None = None
    if args.younger_than is not None:
        cutoff = now - args.younger_than
        after = (cutoff, "")  # every id sorts after "": arrival >= cutoff
    domains: list[str | None] = [where.domain]
    if args.account is not None:
        if store.get_account(args.account) is None:
            raise _DataError(f"queue list: --account {_safe(args.account)}: no such account")
        owned = sorted(d.name for d in store.list_domains(args.account))
        domains = [d for d in owned if where.domain in (None, d)]
    streams = [_pages(fetch, dataclasses.replace(where, domain=d), after, key)
               for d in domains]
    last: tuple[float, str] | None = None
    for item in heapq.merge(*streams, key=key):
        k = key(item)
        if k == last or (cutoff is not None and k[0] <= cutoff):
            continue
        last = k
        yield item


def _entry_key(entry: QueueEntry) -> tuple[float, str]:
    return (entry.message.received_at, entry.message.id)


def _key(key: tuple[float, str]) -> tuple[float, str]:
    return key


@_guarded
def queue_list(args: argparse.Namespace, store: AdminStore) -> int:
    """mailq-like listing (or JSON lines, ids, a count) of the messages matching the filters."""
    now = time.time()
    filtered = (_filter(args, now) != QueueFilter() or args.younger_than is not None
                or args.account is not None)
    if args.ids or args.count:
        count = 0
        for _, message_id in _matching(store, args, now, store.queue_ids, _key):
            if args.ids:
                print(message_id)
            count += 1
        if args.count:
            print(count)
        return EX_OK
    count = total = 0
    for entry in _matching(store, args, now, store.queue_page, _entry_key):
        if args.json:
            print(json.dumps(_json_entry(entry)))
        else:
            if count == 0:
                print(_HEADER)
            print("\n".join(_block(entry)))
            print()
        count += 1
        total += entry.message.size
    if args.json:
        return EX_OK
    if count == 0:
        print("No message matches" if filtered else "Mail queue is empty")
    else:
        print(f"-- {math.ceil(total / 1024)} Kbytes in {count} "
              f"Request{'' if count == 1 else 's'}.")
    return EX_OK


# --- show --------------------------------------------------------------------------------------


def _one_id(text: str) -> str:
    message_id = _normalize_id(text)
    if not message_id:
        raise _UsageError("queue show: empty queue id")
    return message_id


def _write_message(store: AdminStore, message_id: str) -> None:
    """The stored message on stdout, CRLF as LF, bytes unchanged otherwise."""
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    carry = b""
    for chunk in store.read_body(message_id):
        data = (carry + chunk).replace(b"\r\n", b"\n")
        carry = b""
        if data.endswith(b"\r"):
            data, carry = data[:-1], b"\r"
        if out is not None:
            out.write(data)
        else:
            sys.stdout.write(data.decode("utf-8", "replace"))
    if carry:
        if out is not None:
            out.write(carry)
        else:
            sys.stdout.write(carry.decode())
    if out is not None:
        out.flush()


@_guarded
def queue_show(args: argparse.Namespace, store: AdminStore) -> int:
    """Envelope, per-recipient status and headers (or the whole message) of one message."""
    message_id = _one_id(args.id)
    entry = store.get_queue_entry(message_id)
    if entry is None:
        raise _DataError(f"queue show: {message_id}: no such message in the queue")
    if args.json:
        print(json.dumps(_json_entry(entry)))
        return EX_OK
    m = entry.message
    now = time.time()
    params = [p for p in (
        f"RET={m.ret}" if m.ret else "",
        f"ENVID={_safe(m.envid)}" if m.envid else "",
        "SMTPUTF8" if m.smtputf8 else "",
        "BODY=8BITMIME" if m.body_8bit else "",
    ) if p]
    status = ("being delivered" if entry.active
              else "on hold" if _marker(entry) == "!" else "queued")
    lines = [
        f"Queue ID:   {m.id}{_marker(entry)} ({status})",
        f"Arrival:    {_local(m.received_at)} ({_age(now - m.received_at)} ago)",
        f"Size:       {m.size} bytes",
        f"Sender:     <{_safe(m.sender)}>",
        f"Origin:     {m.origin}" + (f" from {_safe(m.client)}" if m.client else ""),
        f"Node:       {_safe(m.node) if m.node else 'unknown'} (accepted it)",
        f"Parameters: {' '.join(params) if params else 'none'}",
        f"Recipients: {len(m.recipients)}",
    ]
    for r in m.recipients:
        state = str(r.state)
        if r.id in entry.hold_from:
            state += f" (was {entry.hold_from[r.id]})"
        if r.id in entry.active:
            state += " (being delivered)"
        lines += [f"  <{_safe(r.address)}>", f"    state:         {state}",
                  f"    attempts:      {r.attempts}"]
        if r.first_failure_at is not None:
            lines.append(f"    first failure: {_local(r.first_failure_at)}")
        if r.state == RecipientState.OUTBOUND and r.id not in entry.active:
            due = r.next_attempt_at
            lines.append("    next attempt:  "
                         + ("now" if due is None or due <= now else _local(due)))
        if r.notify or r.orcpt:
            lines.append(f"    dsn:           NOTIFY={_safe(r.notify or '-')} "
                         f"ORCPT={_safe(r.orcpt or '-')}")
        if r.delay_notified:
            lines.append("    delay notice:  sent")
        if r.last_reply:
            lines.append(f"    last reply:    {_safe(r.last_reply)}")
    print("\n".join(lines))
    if args.body:
        print("-- message --")
        _write_message(store, m.id)
        return EX_OK
    from fermoposta.mail.dsn import read_headers

    print("-- headers --")
    text = read_headers(store, m.id).decode("utf-8", "replace").replace("\r\n", "\n")
    print("\n".join(_safe(line.replace("\t", " ")) for line in text.splitlines()))
    return EX_OK


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


# --- stats -------------------------------------------------------------------------------------

_BUCKETS = (*(f"{m}m" for m in AGE_LIMITS_MINUTES), f"{AGE_LIMITS_MINUTES[-1]}m+")


def _shape_json(shape: DomainShape, now: float) -> dict[str, Any]:
    return {
        "domain": shape.domain or None,
        "messages": shape.messages,
        "recipients": shape.recipients,
        "bytes": shape.bytes,
        "oldest_age": None if shape.oldest is None else max(0, int(now - shape.oldest)),
        "states": {"held": shape.held, "outbound": shape.outbound,
                   "deferred": shape.deferred, "hold": shape.hold},
        "ages": dict(zip(_BUCKETS, shape.ages, strict=True)),
    }


def _columns(rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Rows as columns: the first `left` columns left-aligned, others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
                  for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]


@_guarded
def queue_stats(args: argparse.Namespace, store: AdminStore) -> int:
    """Counts per recipient domain and qshape's age distribution."""
    now = time.time()
    shape = store.queue_shape(now, [m * 60.0 for m in AGE_LIMITS_MINUTES])
    shown = shape.domains[: args.top]
    more = len(shape.domains) - len(shown)
    if args.json:
        print(json.dumps({
            "time": int(now),
            "age_buckets": list(_BUCKETS),
            "total": _shape_json(shape.total, now),
            "domains": [_shape_json(d, now) for d in shown],
            "more_domains": more,
        }))
        return EX_OK

    def oldest(d: DomainShape) -> str:
        return "-" if d.oldest is None else _age(now - d.oldest)

    rows = [["DOMAIN", "MSGS", "RCPTS", "BYTES", "OLDEST", "HELD", "OUTBOUND", "DEFERRED",
             "HOLD"]]
    for name, d in [("TOTAL", shape.total), *((_safe(d.domain), d) for d in shown)]:
        rows.append([name, str(d.messages), str(d.recipients), str(d.bytes), oldest(d),
                     str(d.held), str(d.outbound), str(d.deferred), str(d.hold)])
    print("\n".join(_columns(rows, 1)))
    print()
    ages = [["", "T", *(b.removesuffix("m").replace("m+", "+") for b in _BUCKETS)]]
    for name, d in [("TOTAL", shape.total), *((_safe(d.domain), d) for d in shown)]:
        ages.append([name, str(d.recipients), *(str(n) for n in d.ages)])
    print("\n".join(_columns(ages, 0)))
    if more:
        print(f"\n(and {_plural(more, 'more domain')}, counted in TOTAL; see --top)")
    return EX_OK


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
        "queue", help="look at and act on the mail queue (like mailq, postsuper, qshape)")
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
