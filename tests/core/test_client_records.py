"""`SMTPClient`'s write layout: one write per pipelined line and a lone final
dot with `line_records` over TLS (fetchmail's SSL relay, net/client.py); one
write for the whole group otherwise, so other peers keep the same packets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from fermoposta.net.client import SMTPClient
from fermoposta.net.connection import Connection


class FakeConnection:
    peer_ip = "192.0.2.1"

    def __init__(self, tls: bool) -> None:
        self.tls_active = tls
        self.writes: list[bytes] = []  # what the client handed over, in order
        self.held: list[bytes] = []  # the part of it handed to hold()

    def hold(self, data: bytes) -> bool:
        self.writes.append(data)
        self.held.append(data)
        return True

    def enable_quickack(self) -> bool:
        return False

    async def write(self, data: bytes, timeout: float) -> None:
        self.writes.append(data)


def client(tls: bool, line_records: bool) -> tuple[SMTPClient, FakeConnection]:
    conn = FakeConnection(tls)
    return SMTPClient(cast(Connection, cast(Any, conn)), line_records=line_records), conn


GROUP = ["MAIL FROM:<a@b.test>", "RCPT TO:<c@d.test>", "RCPT TO:<e@d.test>", "DATA"]


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part


async def test_group_over_tls_with_line_records_is_one_write_per_line() -> None:
    c, conn = client(tls=True, line_records=True)
    await c.send_group(GROUP, 5.0)
    assert conn.writes == [line.encode() + b"\r\n" for line in GROUP]


@pytest.mark.parametrize(("tls", "line_records"), [(False, True), (True, False), (False, False)])
async def test_group_is_one_write_otherwise(tls: bool, line_records: bool) -> None:
    c, conn = client(tls, line_records)
    await c.send_group(GROUP, 5.0)
    assert conn.writes == [b"\r\n".join(line.encode() for line in GROUP) + b"\r\n"]


@pytest.mark.parametrize("body", [b"one\r\ntwo\r\n", b"one\r\ntwo"])
async def test_final_dot_alone_over_tls(body: bytes) -> None:
    c, conn = client(tls=True, line_records=True)
    await c.send_body(chunks(body[:4], body[4:]))
    assert conn.writes[-1] == b".\r\n"
    assert b"".join(conn.writes) == b"one\r\ntwo\r\n.\r\n"


async def test_missing_line_end_and_dot_share_a_write_in_clear_text() -> None:
    c, conn = client(tls=False, line_records=True)
    await c.send_body(chunks(b"one\r\ntwo"))
    assert conn.writes[-1].endswith(b"two\r\n.\r\n")


async def test_the_last_piece_and_the_dot_are_held_for_the_next_write() -> None:
    """Without line records the last piece of the body and the dot are held
    (Connection.hold), to leave with the next message's pipelined group."""
    c, conn = client(tls=True, line_records=False)
    await c.send_body(chunks(b"one\r\n", b"two\r\n"))
    assert conn.held == [b"two\r\n.\r\n"]
    assert b"".join(conn.writes) == b"one\r\ntwo\r\n.\r\n"
    c2, conn2 = client(tls=True, line_records=True)
    await c2.send_body(chunks(b"one\r\n", b"two\r\n"))
    assert conn2.held == []  # fetchmail's records: nothing held, the dot alone
