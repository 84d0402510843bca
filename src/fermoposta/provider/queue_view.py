"""The queue commands that only look: `fermoposta queue list|show|stats`.

Contract (the handlers `queue_list`, `queue_show`, `queue_stats`, wired by
`provider.queue_admin.register`, whose docstring states the commands'
conventions):
- `list` prints mailq-like blocks (markers `*` being delivered, `!` on
  operator hold) and a ``-- N Kbytes in M Requests.`` total, or with
  `--json` one object a line (`postqueue -j`), `--ids` the ids, `--count`
  their number; the filters (`--domain`, `--sender`, `--recipient`,
  `--older-than`, `--younger-than`, `--account`, `--state`) are applied by
  the store (`QueueFilter`), the age bound and the account around it
  (`_matching`), `BATCH` messages a call, oldest first.
- `show ID` prints the envelope, each recipient's status and the headers
  (`--body`: the message as stored, line ends as LF; `--json`: its `list
  --json` object); an unknown id is a data error (65).
- `stats` prints counts per recipient domain and qshape's age buckets
  (`AGE_LIMITS_MINUTES`), `--top N` domains, or one JSON object.
- Nothing from the queue reaches the terminal with control characters
  (`admin.safe`), except `show --body`.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from fermoposta.provider.admin import EX_OK
from fermoposta.provider.admin import DataError as _DataError
from fermoposta.provider.admin import UsageError as _UsageError
from fermoposta.provider.admin import guarded as _guarded
from fermoposta.provider.admin import safe as _safe
from fermoposta.provider.queue_common import normalize_id as _normalize_id
from fermoposta.provider.queue_common import pages as _pages
from fermoposta.provider.queue_common import plural as _plural
from fermoposta.store.base import (
    AdminStore,
    DomainShape,
    QueueEntry,
    QueueFilter,
    RecipientState,
)

__all__ = ["AGE_LIMITS_MINUTES", "queue_list", "queue_show", "queue_stats"]

AGE_LIMITS_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)  # qshape's buckets

_T = TypeVar("_T")


# --- small helpers -----------------------------------------------------------------------


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


# --- the filters -------------------------------------------------------------------------


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
    if args.count and args.account is None:
        # One count query, not every page of ids (1,000,000 held on
        # PostgreSQL: 2.35 s of pages).  --account pages on: a message with
        # recipients in two of the account's domains counts once.
        cutoff = None if args.younger_than is None else now - args.younger_than
        print(store.count_queue(_filter(args, now), cutoff))
        return EX_OK
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
