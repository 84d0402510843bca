"""Logging: Postfix-like lines keyed by queue ID, or JSON lines.

Contract:
- `setup_logging(level, fmt, stream, node=None)` configures the "fermoposta"
  logger (and only it): one handler writing to `stream`, either text lines
  ``<time> fermoposta/<component>[<pid>]: <message>`` (operators.md §2.2, so
  existing Postfix log tooling and habits carry over) or one JSON object a
  line (``time, level, component, message`` plus structured fields).  With
  a `node` name (the provider's `[store] node`), text lines carry it where
  syslog puts the host name, ``<time> <node> fermoposta/...``, and JSON
  objects a ``node`` key, so the logs of several nodes can be merged.
  The same handler takes the warnings of the PostgreSQL driver and its pool
  (loggers ``psycopg*``, component ``store``), so they are lines like ours
  instead of bare text from Python's last-resort handler.  Calling
  it again replaces the handler it installed before; it never touches the
  root logger.
- `event(component, queue_id, **fields)` writes one delivery/queue line such
  as ``4F9D195432C: to=<bob@example.org>, relay=cust.example[127.0.0.1],
  delay=1.2, dsn=2.0.0, status=sent (250 2.0.0 OK)``.  Fields keep the order
  given; ``None`` values are left out; ``status`` and ``reason`` render
  together as ``status=sent (reason)``.  Control characters in values are
  escaped, so a peer cannot forge log lines.
- `redact(line, in_auth=...)` hides SASL secrets in protocol traces.  Nothing
  in this package may log a password, an AUTH initial response or a SASL
  continuation line without passing it through `redact`.
- Timestamps are UTC, RFC 3339 with milliseconds.
- Lines logged on a running event loop at INFO or below (debug lines
  too) are written together at the end of the loop's turn, in writes of
  whole lines of at most 4 KiB (atomic on a pipe), and at once when 256
  are pending: where a write a line cost a system call each, two lines of
  every message taken in.  Warnings and errors, lines from other threads
  and lines logged without a running loop are written at once, after the
  pending lines before them, so the lines of this handler come in the
  order they were logged (text Python or a library writes to stderr by
  other ways, a traceback of the interpreter's own, may come before
  pending lines logged earlier).  A process killed (SIGKILL) may lose the
  pending lines of its last turn; lines of a loop that stopped before its
  turn ended are written by the next line written, by `flush()` or
  `close()` (a handler `setup_logging` replaces) and by
  `logging.shutdown` at exit.  A write that fails is reported on stderr
  by `logging`'s usual "--- Logging error ---" (`handleError`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
from typing import TextIO

__all__ = ["JSONFormatter", "TextFormatter", "event", "redact", "setup_logging"]

ROOT = "fermoposta"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Postfix prefixes problems with a severity word; info lines carry none.
_SEVERITY = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}
# Keys of the JSON object that fields may not overwrite.
_RESERVED = frozenset({"time", "level", "component", "message", "pid", "queue_id", "exc",
                       "node"})


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _timestamp(created: float) -> str:
    global _second
    whole = int(created)
    if _second[0] != whole:  # formatted once a second, not once a line
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


def _component(record: logging.LogRecord) -> str:
    """The `component` given to `event`, else the last part of the logger name."""
    component = getattr(record, "component", None)
    if isinstance(component, str) and component:
        return component
    name = record.name
    if name == ROOT:
        return "main"
    if name.startswith("psycopg"):
        return "store"
    return name.rsplit(".", 1)[-1]


class TextFormatter(logging.Formatter):
    """``2024-11-28T13:48:01.123Z [node ]fermoposta/odmr[4242]: message``."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = f"{_escape(node)} " if node else ""

    def format(self, record: logging.LogRecord) -> str:
        message = _escape(record.getMessage())
        line = (
            f"{_timestamp(record.created)} {self.node}{ROOT}/{_component(record)}"
            f"[{record.process}]: "
            f"{_SEVERITY.get(record.levelno, '')}{message}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object a line: time, level, component, message, then fields."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "component": _component(record),
            "message": record.getMessage(),
            "pid": record.process,
        }
        if self.node:
            obj["node"] = self.node
        queue_id = getattr(record, "queue_id", None)
        if queue_id is not None:
            obj["queue_id"] = queue_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                obj[f"field_{key}" if key in _RESERVED else str(key)] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class _TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A `StreamHandler` that writes a loop turn's info lines at once (see
    the module docstring).  `emit` runs under the handler's lock
    (`Handler.handle`), and so does the end-of-turn write."""

    MAX_PENDING = 256  # lines: written at once beyond, whatever the turn
    # Bytes a write at most, cut at line ends: a write to a pipe up to
    # PIPE_BUF is atomic, so processes sharing one stderr pipe never cut
    # each other's lines (each line was a write of its own before).
    PIECE = 4096

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        # (line, its size in bytes as written in UTF-8, its record)
        self._pending: list[tuple[str, int, logging.LogRecord]] = []
        # The loop whose end of turn will write `_pending`, once scheduled.
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
            size = len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
            self._pending.append((text, size, record))
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:  # another thread, or no loop at all
                loop = None
            if (loop is None or record.levelno > logging.INFO
                    or len(self._pending) >= self.MAX_PENDING):
                self._write_pending()
            elif loop is not self._scheduled_on:
                # call_soon: after every callback of this turn (the loop's
                # ready queue), before its next wait for events.
                self._scheduled_on = loop
                loop.call_soon(self._end_of_turn)
        except Exception:
            self.handleError(record)

    def _end_of_turn(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled_on = None
            self._write_pending()

    def _write_pending(self) -> None:
        """Write what is pending, in pieces of whole lines; a piece that
        fails is reported once (`handleError`, with its first record) and
        the next ones are still tried."""
        pending, self._pending = self._pending, []
        start = 0
        while start < len(pending):
            size, end = 0, start
            while end < len(pending) and (end == start or size + pending[end][1]
                                          <= self.PIECE):
                size += pending[end][1]
                end += 1
            try:
                self.stream.write("".join(text for text, _, _ in pending[start:end]))
                self.stream.flush()
            except Exception:
                self.handleError(pending[start][2])
            start = end

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
        super().flush()

    def close(self) -> None:
        self.flush()  # a handler replaced by setup_logging keeps no line
        super().close()


_installed: logging.Handler | None = None
_DRIVER_LOGGERS = ("psycopg",)  # warnings of the PostgreSQL driver and its pool


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None,
                  node: str | None = None) -> None:
    """Configure the "fermoposta" logger.

    `level`: "debug", "info", "warning" or "error".  `fmt`: "text" or "json".
    `stream`: where lines go; ``None`` means `sys.stderr` at call time.
    Raises ValueError for an unknown level or format.
    """
    global _installed
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    logger = logging.getLogger(ROOT)
    # No line shows the thread or the multiprocessing name: skip their lookup.
    logging.logThreads = False
    logging.logMultiprocessing = False
    if _installed is not None:
        logger.removeHandler(_installed)
        _installed.close()
    handler = _TurnHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JSONFormatter(node) if fmt == "json" else TextFormatter(node))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level.lower()])
    # Our handler is the only output; do not duplicate lines through the root logger.
    logger.propagate = False
    for name in _DRIVER_LOGGERS:
        driver = logging.getLogger(name)
        if _installed is not None:
            driver.removeHandler(_installed)
        driver.addHandler(handler)
        driver.setLevel(max(LEVELS[level.lower()], logging.WARNING))
        driver.propagate = False
    _installed = handler


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(text: str) -> str:
    """Escape control characters (CR, LF, ...) so a line stays one line."""
    if text.isprintable():  # no control character (they are not printable): most texts
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _render(value: object) -> str:
    if type(value) is str:  # most fields: addresses, ids, statuses
        return value if value.isprintable() else _escape(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # Postfix style: delay=1.2, delay=0.03, delay=12; never 0.30000000000000004.
        text = f"{value:.2f}".rstrip("0").rstrip(".")
        return "0" if text in ("", "-0") else text
    return _escape(str(value))


def format_event(queue_id: str | None, fields: dict[str, object]) -> str:
    """The text of one `event` line (without time/component prefix)."""
    parts: list[str] = []
    reason = fields.get("reason")
    for key, value in fields.items():
        if value is None or (key == "reason" and "status" in fields):
            continue
        text = f"{key}={_render(value)}"
        if key == "status" and reason is not None:
            text += f" ({_render(reason)})"
        parts.append(text)
    body = ", ".join(parts)
    return f"{_escape(queue_id)}: {body}" if queue_id else body


def event(component: str, queue_id: str | None, **fields: object) -> None:
    """Log one Postfix-like line at INFO on logger ``fermoposta.<component>``.

    Example: ``event("drain", "4F9D195432C", to="<bob@example.org>",
    relay="cust.example[127.0.0.1]", delay=1.2, dsn="2.0.0", status="sent",
    reason="250 2.0.0 OK")``.  Callers bracket addresses themselves.
    """
    logger = _EVENT_LOGGERS.get(component)
    if logger is None:
        logger = _EVENT_LOGGERS.setdefault(component, logging.getLogger(f"{ROOT}.{component}"))
    if not logger.isEnabledFor(logging.INFO):
        return
    # A record of our own and handle() rather than logger.info: that would
    # also walk the stack for the caller's file and line, and LogRecord's
    # constructor derive names from them, which no line prints.
    logger.handle(_EventRecord(logger.name, format_event(queue_id, fields), component,
                               queue_id, dict(fields)))


_EVENT_LOGGERS: dict[str, logging.Logger] = {}
_STARTED = time.time()


class _EventRecord(logging.LogRecord):
    """An INFO record of `event`, with every attribute a handler or
    formatter reads, and none of what `LogRecord.__init__` derives from a
    caller's source file (about half its cost): two lines of every message
    taken in come here.  It is not made by the record factory, and its
    `relativeCreated` counts from this module's import."""

    def __init__(self, name: str, text: str, component: str, queue_id: str | None,
                 fields: dict[str, object]) -> None:
        created = time.time()
        self.name, self.msg, self.args = name, text, ()
        self.levelname, self.levelno = "INFO", logging.INFO
        self.pathname = self.filename = self.module = ""
        self.exc_info = self.exc_text = self.stack_info = None
        self.lineno, self.funcName = 0, ""
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - _STARTED) * 1000
        self.processName = self.taskName = None
        # setup_logging turns thread names off; before it, a handler may print them.
        if logging.logThreads:
            self.thread, self.threadName = threading.get_ident(), threading.current_thread().name
        else:
            self.thread = self.threadName = None
        self.process = os.getpid()
        self.component, self.queue_id, self.fields = component, queue_id, fields


_AUTH_RE = re.compile(rb"(?i)([ \t]*AUTH)([ \t]+)(\S+)([ \t]+\S)?")
_MECH_RE = re.compile(rb"[A-Za-z0-9_-]{1,20}")


def redact(line: bytes, in_auth: bool = False) -> bytes:
    """Hide SASL secrets in a protocol trace line (RFC 4954).

    - ``in_auth=True`` (the line is a client response to a 334 challenge):
      returns ``***`` (a lone ``*``, the client's cancel, is kept).
    - ``AUTH <MECH> <initial-response>`` returns ``AUTH <MECH> ***``; a
      mechanism token that does not look like a mechanism name is hidden too.
    - Any other line is returned unchanged.
    The line ending (CRLF or LF), if any, is kept.
    """
    body = line.rstrip(b"\r\n")
    ending = line[len(body) :]
    if in_auth:
        return line if body.strip() == b"*" else b"***" + ending
    m = _AUTH_RE.match(body)
    if m is None:
        return line
    verb, space, mech, initial = m.group(1), m.group(2), m.group(3), m.group(4)
    if not _MECH_RE.fullmatch(mech):
        return verb + space + b"***" + ending
    if initial is None:
        return line
    return verb + space + mech + b" ***" + ending
