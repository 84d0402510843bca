"""The sans-I/O server dialog machine (smtp/server.py): the verb table and
its flags, line limits, error counting, STARTTLS forgetting; in memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fermoposta.smtp import reply as R
from fermoposta.smtp.server import (
    COMMAND_LINE_LIMIT,
    Dispatch,
    Needs,
    Refuse,
    ServerMachine,
    VerbSpec,
    verb_table,
)

BASE = verb_table(
    VerbSpec("EHLO", "smtp_ehlo"),
    VerbSpec("HELO", "smtp_helo"),
    VerbSpec("QUIT", "smtp_quit"),
    VerbSpec("STARTTLS", "smtp_starttls"),
)
TABLE = verb_table(
    VerbSpec("AUTH", "smtp_auth", Needs.EHLO | Needs.TLS | Needs.NO_AUTH | Needs.NO_TRANSACTION),
    VerbSpec("MAIL", "smtp_mail", Needs.TLS | Needs.HELO | Needs.AUTH | Needs.NO_TRANSACTION,
             sequence_reply=R.Reply(503, "5.5.1", "Nested MAIL command")),
    VerbSpec("RCPT", "smtp_rcpt", Needs.TRANSACTION),
    base=BASE,
)


def code(action: Refuse | Dispatch) -> tuple[int, str | None]:
    assert isinstance(action, Refuse), action
    return action.reply.code, action.reply.enhanced


def test_unknown_and_unoffered_verbs() -> None:
    m = ServerMachine(TABLE)
    assert code(m.receive_line(b"FROB x\r\n")) == (500, "5.5.2")
    assert code(m.receive_line(b"ATRN\r\n")) == (502, "5.5.1")  # known, not offered here
    assert code(m.receive_line(b"\x00\r\n")) == (500, "5.5.2")
    action = m.receive_line(b"ehlo client.test\r\n")
    assert isinstance(action, Dispatch) and action.spec.handler == "smtp_ehlo"
    assert action.command.arg == "client.test"


def test_each_flag_in_order() -> None:
    m = ServerMachine(TABLE, require_tls=True)
    assert code(m.receive_line(b"AUTH PLAIN\r\n")) == (530, "5.7.0")  # TLS first
    m.tls_started()
    assert code(m.receive_line(b"AUTH PLAIN\r\n")) == (503, "5.5.1")  # EHLO first
    m.helo("client.test", esmtp=False)
    assert code(m.receive_line(b"AUTH PLAIN\r\n")) == (503, "5.5.1")  # HELO is not EHLO
    assert code(m.receive_line(b"MAIL FROM:<a@b.test>\r\n")) == (530, "5.7.0")  # AUTH first
    m.helo("client.test", esmtp=True)
    assert isinstance(m.receive_line(b"AUTH PLAIN\r\n"), Dispatch)
    m.state.account = "acme"
    assert code(m.receive_line(b"AUTH PLAIN\r\n")) == (503, "5.5.1")  # already
    assert code(m.receive_line(b"RCPT TO:<x@y.test>\r\n")) == (503, "5.5.1")  # no MAIL
    assert isinstance(m.receive_line(b"MAIL FROM:<a@b.test>\r\n"), Dispatch)
    m.state.transaction_open = True
    nested = m.receive_line(b"MAIL FROM:<a@b.test>\r\n")
    assert isinstance(nested, Refuse) and "Nested" in str(nested.reply)
    assert isinstance(m.receive_line(b"RCPT TO:<x@y.test>\r\n"), Dispatch)


def test_tls_not_required_means_the_tls_flag_is_ignored() -> None:
    m = ServerMachine(TABLE)
    m.helo("c", esmtp=True)
    assert isinstance(m.receive_line(b"AUTH PLAIN\r\n"), Dispatch)


def test_starttls_forgets_what_came_before() -> None:
    m = ServerMachine(TABLE)
    m.helo("c", esmtp=True)
    m.state.account = "acme"
    m.state.transaction_open = True
    m.tls_started()
    assert m.state.helo_name is None and m.state.account is None
    assert not m.state.transaction_open and m.state.tls


def test_line_limit_is_512_for_auth_too() -> None:
    m = ServerMachine(TABLE)
    m.helo("c", esmtp=True)
    line = b"AUTH PLAIN " + b"A" * (COMMAND_LINE_LIMIT - len(b"AUTH PLAIN \r\n")) + b"\r\n"
    assert len(line) == COMMAND_LINE_LIMIT
    assert isinstance(m.receive_line(line), Dispatch)
    assert code(m.receive_line(line[:-2] + b"A\r\n")) == (500, "5.5.6")


def test_errors_end_the_dialog_with_421_and_delivery_resets_the_count() -> None:
    m = ServerMachine(TABLE, max_errors=3)
    assert m.replied(R.Reply(550, "5.1.1", "no")) == []
    assert m.replied(R.Reply(452, "4.5.3", "too many recipients")) == []  # flow control
    assert m.replied(R.OK) == []
    m.delivered()
    assert m.errors == 0
    for _ in range(2):
        assert m.replied(R.Reply(501, "5.5.4", "bad")) == []
    assert m.replied(R.Reply(501, "5.5.4", "bad")) == [R.TOO_MANY_ERRORS]
    assert m.closing


def test_a_421_closes() -> None:
    m = ServerMachine(TABLE)
    assert m.replied(R.TIMEOUT) == []
    assert m.closing


@pytest.mark.parametrize("counts", [True, False])
def test_a_dialog_may_override_what_counts(counts: bool) -> None:
    m = ServerMachine(TABLE, max_errors=1)
    result = m.replied(R.Reply(550, "5.1.1", "no"), counts=counts)
    assert (result == [R.TOO_MANY_ERRORS]) is counts


@given(st.binary(max_size=600))
def test_any_line_gets_an_action_never_an_exception(line: bytes) -> None:
    m = ServerMachine(TABLE)
    action = m.receive_line(line + b"\r\n")
    if isinstance(action, Refuse):
        assert 500 <= action.reply.code < 600
        assert action.reply.to_bytes().endswith(b"\r\n")
    else:
        assert action.spec is TABLE[action.command.verb]


# --- ETRN (RFC 1985 §5) ------------------------------------------------------------------

ETRN_TABLE = verb_table(VerbSpec("ETRN", "smtp_etrn", Needs.HELO | Needs.NO_TRANSACTION),
                        base=BASE)


@pytest.mark.parametrize(("arg", "expected"), [
    ("example.org", ("example.org", False, False)),
    ("Example.ORG.", ("example.org", False, False)),
    ("@example.org", ("example.org", True, False)),
    ("#queue-1", ("queue-1", False, True)),
    ("bücher.example", ("xn--bcher-kva.example", False, False)),
    ("  example.org  ", ("example.org", False, False)),
])
def test_etrn_forms(arg: str, expected: tuple[str, bool, bool]) -> None:
    from fermoposta.smtp.server import parse_etrn
    node = parse_etrn(arg)
    assert (node.name, node.subdomains, node.queue) == expected
    assert str(node) == ("@" if expected[1] else "#" if expected[2] else "") + expected[0]


@pytest.mark.parametrize("arg", [
    "", "   ", "@", "#", "a b", "example.org extra", "@@example.org", "#@x", "[192.0.2.1]",
    "@[192.0.2.1]", "exa_mple.org", "-bad.example", "a..b", "x" * 64 + ".example",
    "#que\x7fue",
])
def test_etrn_syntax_errors_are_501_before_dispatch(arg: str) -> None:
    m = ServerMachine(ETRN_TABLE)
    m.helo("client.test", esmtp=True)
    assert code(m.receive_line(f"ETRN {arg}\r\n".encode())) == (501, "5.5.4")
    assert m.errors == 0  # counted when the driver reports the reply
    action = m.receive_line(b"ETRN example.org\r\n")
    assert isinstance(action, Dispatch) and action.spec.handler == "smtp_etrn"


def test_etrn_bare_verb_and_sequence() -> None:
    m = ServerMachine(ETRN_TABLE)
    assert code(m.receive_line(b"ETRN example.org\r\n")) == (503, "5.5.1")  # HELO first
    m.helo("client.test", esmtp=False)
    assert code(m.receive_line(b"ETRN\r\n")) == (501, "5.5.4")
    m.state.transaction_open = True
    assert code(m.receive_line(b"ETRN example.org\r\n")) == (503, "5.5.1")
    m.state.transaction_open = False
    assert isinstance(m.receive_line(b"etrn @example.org\r\n"), Dispatch)
    # A dialog without ETRN: a known verb it does not offer.
    assert code(ServerMachine(BASE).receive_line(b"ETRN example.org\r\n")) == (502, "5.5.1")
