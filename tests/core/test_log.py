"""Logging: Postfix-like event lines, JSON lines, AUTH redaction."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import threading
from collections.abc import Iterator

import pytest

from fermoposta.ops.log import TextFormatter, event, format_event, redact, setup_logging

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) fermoposta/(\S+)\[(\d+)\]: (.*)$")


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """setup_logging changes process-wide state: undo it for the other tests."""
    loggers = [logging.getLogger(name) for name in ("fermoposta", "psycopg")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def test_event_line_exact(stream: io.StringIO) -> None:
    setup_logging("info", "text", stream)
    event(
        "drain",
        "4F9D195432C",
        to="<bob@example.org>",
        relay="cust.example[127.0.0.1]",
        delay=1.2,
        dsn="2.0.0",
        status="sent",
        reason="250 2.0.0 OK",
    )
    m = LINE.match(stream.getvalue().rstrip("\n"))
    assert m is not None, stream.getvalue()
    assert m.group(2) == "drain"
    assert int(m.group(3)) == os.getpid()
    assert m.group(4) == (
        "4F9D195432C: to=<bob@example.org>, relay=cust.example[127.0.0.1], delay=1.2, "
        "dsn=2.0.0, status=sent (250 2.0.0 OK)"
    )


def test_format_event_rules() -> None:
    # order kept, reason attached to status wherever it appears, None left out
    assert (
        format_event(
            "Q1", {"reason": "x y", "from": "<>", "size": 12, "nrcpt": None, "status": "deferred"}
        )
        == "Q1: from=<>, size=12, status=deferred (x y)"
    )
    assert format_event(None, {"client": "h[1.2.3.4]"}) == "client=h[1.2.3.4]"
    assert format_event("Q", {"status": "sent"}) == "Q: status=sent"
    assert format_event("Q", {"reason": "r"}) == "Q: reason=r"
    assert (
        format_event("Q", {"delay": 0.1 + 0.2, "d2": 12.0, "d3": 0.004})
        == "Q: delay=0.3, d2=12, d3=0"
    )
    assert format_event("Q", {"tls": True}) == "Q: tls=yes"


def test_event_escapes_control_characters() -> None:
    text = format_event("Q", {"helo": "evil\r\nfake: line", "status": "bounced", "reason": "a\nb"})
    assert "\n" not in text and "\r" not in text
    assert text == "Q: helo=evil\\x0d\\x0afake: line, status=bounced (a\\x0ab)"


def test_event_escapes_only_control_characters() -> None:
    # Printable text passes as it is; so does text that is not printable
    # but holds no control character (a no-break space, a line separator).
    assert format_event("Q", {"helo": "caf\u00e9.example"}) == "Q: helo=caf\u00e9.example"
    assert format_event("Q", {"x": "a\u00a0b\u2028c"}) == "Q: x=a\u00a0b\u2028c"
    assert format_event("Q", {"x": "a\u00a0b\x7fc\td"}) == "Q: x=a\u00a0b\\x7fc\\x09d"


def test_event_below_level_is_dropped(stream: io.StringIO) -> None:
    setup_logging("warning", "text", stream)
    event("mx", "Q", status="sent")
    assert stream.getvalue() == ""


def test_text_severity_prefix_and_component(stream: io.StringIO) -> None:
    setup_logging("debug", "text", stream)
    logging.getLogger("fermoposta.provider.odmr").warning("lease lost for %s", "example.org")
    logging.getLogger("fermoposta").debug("hello")
    lines = stream.getvalue().splitlines()
    m = LINE.match(lines[0])
    assert m is not None and m.group(2) == "odmr"
    assert m.group(4) == "warning: lease lost for example.org"
    m = LINE.match(lines[1])
    assert m is not None and m.group(2) == "main" and m.group(4) == "hello"


def test_json_format(stream: io.StringIO) -> None:
    setup_logging("info", "json", stream)
    event("mx", "4F9D195432C", to="<bob@example.org>", size=10, status="sent", reason="250 OK")
    logging.getLogger("fermoposta.net").error("boom")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["level"] == "info"
    assert first["component"] == "mx"
    assert first["queue_id"] == "4F9D195432C"
    assert first["message"] == "4F9D195432C: to=<bob@example.org>, size=10, status=sent (250 OK)"
    assert first["to"] == "<bob@example.org>"
    assert first["size"] == 10
    assert first["status"] == "sent" and first["reason"] == "250 OK"
    assert first["pid"] == os.getpid()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first["time"]))
    second = json.loads(lines[1])
    assert second["level"] == "error" and second["component"] == "net"
    assert second["message"] == "boom"


def test_json_reserved_field_names_do_not_clobber(stream: io.StringIO) -> None:
    setup_logging("info", "json", stream)
    event("mx", None, message="hi", level=3)
    obj = json.loads(stream.getvalue())
    assert obj["message"] == "message=hi, level=3"
    assert obj["level"] == "info"
    assert obj["field_message"] == "hi" and obj["field_level"] == 3


def test_setup_is_idempotent(stream: io.StringIO) -> None:
    setup_logging("info", "text", io.StringIO())
    setup_logging("info", "text", stream)
    event("mx", "Q", status="sent")
    assert len(stream.getvalue().splitlines()) == 1
    ours = [
        h
        for h in logging.getLogger("fermoposta").handlers
        if isinstance(h, logging.StreamHandler) and isinstance(h.formatter, TextFormatter)
    ]
    assert len(ours) == 1


def test_setup_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        setup_logging("loud")
    with pytest.raises(ValueError):
        setup_logging("info", "xml")


def test_event_reaches_caplog_without_setup(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fermoposta")
    event("odmr", None, account="acme", status="ok")
    assert "account=acme, status=ok" in caplog.text


@pytest.mark.parametrize(
    ("line", "in_auth", "expected"),
    [
        (b"AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n", False, b"AUTH PLAIN ***\r\n"),
        (b"auth login Ym9i", False, b"auth login ***"),
        (b"AUTH EXTERNAL =\r\n", False, b"AUTH EXTERNAL ***\r\n"),
        (b"AUTH CRAM-MD5\r\n", False, b"AUTH CRAM-MD5\r\n"),
        (b"AUTH c2VjcmV0LXBhc3N3b3JkLXRoYXQtaXMtbG9uZw==\r\n", False, b"AUTH ***\r\n"),
        (b"AUTH pass/word extra\r\n", False, b"AUTH ***\r\n"),
        (b"MAIL FROM:<a@b>\r\n", False, b"MAIL FROM:<a@b>\r\n"),
        (b"AUTHENTICATE x y\r\n", False, b"AUTHENTICATE x y\r\n"),
        (b"Ym9iIDNhNDQ2ZDg2ZmQ=\r\n", True, b"***\r\n"),
        (b"c2VjcmV0", True, b"***"),
        (b"\r\n", True, b"***\r\n"),
        (b"*\r\n", True, b"*\r\n"),
    ],
)
def test_redact(line: bytes, in_auth: bool, expected: bytes) -> None:
    assert redact(line, in_auth=in_auth) == expected


def test_node_name_where_syslog_puts_the_host(stream: io.StringIO) -> None:
    """Several nodes on one store (issue 9): each line says which node wrote it."""
    setup_logging("info", "text", stream, node="mx-2")
    event("mx", "4F9D195432C", status="sent")
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(r"\S+Z mx-2 fermoposta/mx\[\d+\]: 4F9D195432C: status=sent", line), line
    json_stream = io.StringIO()
    setup_logging("info", "json", json_stream, node="mx-2")
    event("mx", "4F9D195432C", status="sent", node="forged")
    obj = json.loads(json_stream.getvalue())
    assert obj["node"] == "mx-2" and obj["field_node"] == "forged"


def test_the_postgresql_drivers_warnings_are_our_lines(stream: io.StringIO) -> None:
    """psycopg and its pool log on their own loggers: their warnings go through
    our handler (component `store`), their debug chatter does not."""
    setup_logging("info", "text", stream, node="mx-1")
    logging.getLogger("psycopg.pool").warning("error connecting in 'fermoposta-store': refused")
    logging.getLogger("psycopg.pool").info("connection requested")  # below WARNING: dropped
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"\S+Z mx-1 fermoposta/store\[\d+\]: warning: error connecting in "
                        r"'fermoposta-store': refused", lines[0]), lines
    again = io.StringIO()
    setup_logging("info", "text", again)  # the handler is replaced, not added
    logging.getLogger("psycopg").warning("x")
    assert stream.getvalue().count("\n") == 1 and again.getvalue().count("\n") == 1


class CountingStream(io.StringIO):
    """A stream that records each write (one system call each on a real file)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _bodies(stream: io.StringIO) -> list[str]:
    return [m.group(4) for line in stream.getvalue().splitlines()
            if (m := LINE.match(line)) is not None]


def test_a_loop_turn_writes_its_info_lines_at_once() -> None:
    stream = CountingStream()
    setup_logging("info", "text", stream)

    async def turn() -> tuple[str, list[str]]:
        event("mx", "AAA", client="a[127.0.0.1]")
        event("mx", "AAA", status="held")
        logging.getLogger("fermoposta.smtp").info("connect from b[127.0.0.1]")
        during = stream.getvalue()  # nothing written yet: the turn goes on
        await asyncio.sleep(0)  # the end of this turn
        return during, list(stream.writes)

    during, writes = asyncio.run(turn())
    assert during == ""
    assert len(writes) == 1
    assert _bodies(stream) == ["AAA: client=a[127.0.0.1]", "AAA: status=held",
                               "connect from b[127.0.0.1]"]


def test_warnings_and_other_threads_write_at_once_in_order() -> None:
    stream = CountingStream()
    setup_logging("info", "text", stream)
    smtp = logging.getLogger("fermoposta.smtp")

    async def turn() -> tuple[list[str], list[str]]:
        event("mx", "AAA", status="held")
        smtp.warning("store error")  # at once, after the line before it
        after_warning = _bodies(stream)
        event("mx", "BBB", status="held")
        # A thread's line, in this very turn (the loop does not run while
        # we wait for the thread): written at once, the pending line first.
        worker = threading.Thread(target=smtp.info, args=("from a worker thread",))
        worker.start()
        worker.join()
        return after_warning, _bodies(stream)

    after_warning, after_thread = asyncio.run(turn())
    assert after_warning == ["AAA: status=held", "warning: store error"]
    assert after_thread == ["AAA: status=held", "warning: store error", "BBB: status=held",
                            "from a worker thread"]


def test_lines_without_a_loop_are_written_at_once() -> None:
    stream = CountingStream()
    setup_logging("info", "text", stream)
    event("mx", "AAA", status="held")
    assert _bodies(stream) == ["AAA: status=held"]
    event("mx", "BBB", status="held")
    assert len(stream.writes) == 2


def test_pending_lines_survive_a_loop_that_ends_and_a_replaced_handler() -> None:
    stream = CountingStream()
    setup_logging("info", "text", stream)

    async def last_words() -> None:
        loop = asyncio.get_running_loop()
        event("mx", "AAA", status="held")
        loop.stop()  # run_forever returns before the end-of-turn write

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(last_words())
        loop.run_forever()
        assert task.done()
    finally:
        loop.close()
    assert _bodies(stream) == []  # still pending
    setup_logging("info", "text", io.StringIO())  # replacing the handler writes them
    assert _bodies(stream) == ["AAA: status=held"]


def test_a_long_turn_writes_every_max_pending_lines() -> None:
    stream = CountingStream()
    setup_logging("info", "text", stream)
    limit = 256

    async def turn() -> int:
        for n in range(limit + 10):
            event("mx", f"Q{n}", status="held")
        written = "".join(stream.writes).count("\n")
        await asyncio.sleep(0)
        return written

    assert asyncio.run(turn()) == limit  # the first `limit` lines, at once
    assert _bodies(stream) == [f"Q{n}: status=held" for n in range(limit + 10)]


def test_writes_are_whole_lines_of_at_most_4_kib() -> None:
    """Atomic on a pipe (PIPE_BUF): processes sharing stderr never cut each
    other's lines; a line longer than that goes alone."""
    stream = CountingStream()
    setup_logging("info", "text", stream)

    async def turn() -> None:
        for n in range(100):  # UTF-8: more bytes than characters
            event("mx", f"Q{n}", status="held", note="é" * (50 + n))
        event("mx", "LONG", note="y" * 6000)
        event("mx", "AFTER", status="held")
        await asyncio.sleep(0)

    asyncio.run(turn())
    assert len(stream.writes) > 2
    for piece in stream.writes:
        assert piece.endswith("\n")
        assert len(piece.encode()) <= 4096 or piece.count("\n") == 1
    assert [b.split(":")[0] for b in _bodies(stream)] == [
        *(f"Q{n}" for n in range(100)), "LONG", "AFTER"]


def test_a_failed_write_is_reported_and_the_next_lines_still_go() -> None:
    class Failing(CountingStream):
        fail = True

        def write(self, text: str) -> int:
            if self.fail:
                self.fail = False
                raise OSError("disk full (test)")
            return super().write(text)

    stream = Failing()
    setup_logging("info", "text", stream)
    handler = logging.getLogger("fermoposta").handlers[-1]
    reported: list[str] = []
    handler.handleError = lambda record: reported.append(record.getMessage())  # type: ignore[method-assign]

    async def turn() -> None:
        event("mx", "AAA", status="held")
        await asyncio.sleep(0)  # its write fails
        event("mx", "BBB", status="held")
        await asyncio.sleep(0)

    asyncio.run(turn())
    assert reported == ["AAA: status=held"]
    assert _bodies(stream) == ["BBB: status=held"]
