"""A scripted test customer for the reversed session (independent of fermoposta).

After the provider's 250 to ATRN the test plays the SMTP server on the same
stream: it greets, answers EHLO with chosen capabilities, answers each RCPT by
a policy, records the messages it accepted and can drop the connection right
after a final dot (before answering it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from support.dialog import Dialog

DEFAULT_EHLO = ["customer.example.org", "PIPELINING", "SIZE 100000000", "8BITMIME",
                "ENHANCEDSTATUSCODES", "SMTPUTF8"]


@dataclass
class Received:
    sender: str
    recipients: list[str]
    body: bytes


@dataclass
class Transcript:
    messages: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    quit: bool = False
    transactions: int = 0  # final dots seen


async def _readline(d: Dialog) -> bytes:
    """A line from the provider, or b"" once it is gone (EOF, reset, or a
    write of ours that met its closed socket: EPIPE comes back on the read)."""
    try:
        return await d.reader.readline()
    except ConnectionError:  # ConnectionResetError, BrokenPipeError, ...
        return b""


async def serve_reversed(
    d: Dialog,
    *,
    ehlo: list[str] | None = None,
    rcpt_policy: Callable[[str], str] = lambda rcpt: "250 2.1.5 OK",
    mail_reply: str = "250 2.1.0 OK",
    data_reply: Callable[[int], str | None] = lambda n: "250 2.0.0 OK",
    drop_after_dot: int | None = None,
    greeting: str = "220 customer.example.org ESMTP ready",
) -> Transcript:
    lines = ehlo or DEFAULT_EHLO
    t = Transcript()
    await d.send(greeting)
    if not greeting.startswith("220"):
        while True:
            raw = await _readline(d)
            if not raw:
                return t
            t.commands.append(raw.decode().strip())
            if raw.upper().startswith(b"QUIT"):
                await d.send("221 bye")
                t.quit = True
                return t
    sender: str | None = None
    rcpts: list[str] = []
    while True:
        raw = await _readline(d)
        if not raw:
            return t
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        t.commands.append(line)
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            out = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
            await d.raw(("\r\n".join(out) + "\r\n").encode())
        elif verb == "HELO":
            await d.send("250 customer.example.org")
        elif verb == "MAIL":
            rcpts = []
            sender = line[line.index("<") + 1: line.index(">")] if mail_reply[0] == "2" else None
            await d.send(mail_reply)
        elif verb == "RCPT":
            rcpt = line[line.index("<") + 1: line.index(">")]
            reply = rcpt_policy(rcpt)
            if reply.startswith("2"):
                rcpts.append(rcpt)
            await d.send(reply)
        elif verb == "DATA":
            if sender is None or not rcpts:
                await d.send("554 5.5.1 No valid recipients")  # as real servers do
                continue
            await d.send("354 go ahead")
            body = bytearray()
            while True:
                data_line = await _readline(d)
                if not data_line:
                    return t
                if data_line == b".\r\n":
                    break
                if data_line.startswith(b"."):
                    data_line = data_line[1:]
                body += data_line
            t.transactions += 1
            if drop_after_dot is not None and t.transactions >= drop_after_dot:
                d.writer.close()
                return t
            reply = data_reply(t.transactions)
            if reply is None:  # say nothing: wait until the provider goes away
                while await _readline(d):
                    pass
                return t
            if reply.startswith("2"):
                t.messages.append(Received(sender or "", list(rcpts), bytes(body)))
            await d.send(reply)
        elif verb == "RSET":
            sender, rcpts = None, []
            await d.send("250 OK")
        elif verb == "QUIT":
            await d.send("221 customer.example.org bye")
            t.quit = True
            return t
        else:
            await d.send("502 5.5.1 not implemented")
