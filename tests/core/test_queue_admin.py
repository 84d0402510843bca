"""The queue tools (`fermoposta queue ...`, fermoposta.provider.queue_admin) on a
real SQLite store, through `fermoposta.cli.main` so the real argument parsing
runs.  The test keeps its own store open on the same file, as a running
provider would."""

from __future__ import annotations

import email
import email.message
import email.policy
import io
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import add_customer, write_config
from fermoposta.cli import main
from fermoposta.store import (
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    SQLiteStore,
    open_store,
)
from fermoposta.store.base import QueueFilter

# A text log line of the queue tools on stderr: time, node, component[pid].
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \S+ fermoposta/queue\[\d+\]: (.*)$")
HELD = RecipientState.HELD
OUTBOUND = RecipientState.OUTBOUND
HOLD = RecipientState.HOLD
MINUTE = 60.0


class Clock:
    """Wall time minus `back` seconds: messages enqueued with an age."""

    def __init__(self) -> None:
        self.back = 0.0

    def __call__(self) -> float:
        return time.time() - self.back


@dataclass
class Queue:
    store: SQLiteStore
    clock: Clock
    config: Path
    held: str  # from <>, one HELD recipient, 3 minutes old
    fresh: str  # one OUTBOUND recipient never tried, 12 minutes old
    deferred: str  # one OUTBOUND recipient deferred twice, 130 minutes old
    hold: str  # one recipient on operator HOLD, 2 days old
    mixed: str  # HELD + deferred OUTBOUND + fresh OUTBOUND, 45 minutes old
    sizes: dict[str, int]
    log: list[str] = field(default_factory=list)  # the last command's log lines (messages)

    def enqueue(self, sender: str, recipients: list[tuple[str, RecipientState]],
                age: float = 0.0, *, origin: MessageOrigin = MessageOrigin.MX,
                ret: str | None = None, notify: str | None = None) -> str:
        self.clock.back = age
        try:
            return self.store.enqueue(
                NewMessage(
                    sender=sender,
                    recipients=tuple(NewRecipient(a, a.rsplit("@", 1)[1], s, notify=notify)
                                     for a, s in recipients),
                    origin=origin, ret=ret, client="mail.sender.test[192.0.2.7]"),
                io.BytesIO(body(sender, [a for a, _ in recipients])))
        finally:
            self.clock.back = 0.0

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        """Exit code, stdout, and stderr without the log lines (those are in `log`)."""
        code = main(["-c", str(self.config), "queue", *argv])
        out, err = capsys.readouterr()
        lines = err.splitlines(keepends=True)
        self.log = [m.group(1) for m in map(LOG_LINE.match, lines) if m]
        return code, out, "".join(line for line in lines if not LOG_LINE.match(line))

    def ids(self, where: QueueFilter | None = None) -> list[str]:
        return [i for _, i in self.store.queue_ids(where or QueueFilter(), None, 1000)]

    def states(self, message_id: str) -> dict[str, tuple[Any, ...]]:
        message = self.store.get_message(message_id)
        assert message is not None
        return {r.address: (r.state, r.attempts, r.last_reply, r.next_attempt_at)
                for r in message.recipients}


def body(sender: str, recipients: list[str]) -> bytes:
    return (f"From: <{sender}>\r\nTo: {', '.join(recipients)}\r\nSubject: queue test\r\n"
            "Message-ID: <q@sender.test>\r\n\r\nThe body line\r\nsecond line\r\n").encode()


def defer(store: SQLiteStore, message_id: str, addresses: set[str], reply: str,
          times: int = 1, due_in: float = 3600.0) -> None:
    message = store.get_message(message_id)
    assert message is not None
    ids = [r.id for r in message.recipients if r.address in addresses]
    for _ in range(times):
        store.record_deferred(ids, reply, time.time() + due_in)


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    config = write_config(tmp_path, None)
    clock = Clock()
    store = SQLiteStore(tmp_path / "data" / "fermoposta.sqlite3", clock=clock)
    add_customer(store, "acme", ("example.org",))
    q = Queue(store, clock, config, "", "", "", "", "", {})
    q.held = q.enqueue("", [("bob@example.org", HELD)], 3 * MINUTE, origin=MessageOrigin.DSN)
    q.fresh = q.enqueue("carol@example.org", [("dave@remote.test", OUTBOUND)], 12 * MINUTE,
                        origin=MessageOrigin.SUBMISSION)
    q.deferred = q.enqueue("erin@example.org", [("frank@remote.test", OUTBOUND)],
                           130 * MINUTE, origin=MessageOrigin.SUBMISSION, ret="HDRS")
    defer(store, q.deferred, {"frank@remote.test"}, "451 4.7.1 Greylisted, try later", 2)
    q.hold = q.enqueue("gina@sender.test", [("hal@example.org", HOLD)], 2 * 86400.0)
    q.mixed = q.enqueue("ivan@sender.test", [("jo@example.org", HELD),
                                             ("kim@remote.test", OUTBOUND),
                                             ("lee@other.test", OUTBOUND)], 45 * MINUTE)
    defer(store, q.mixed, {"kim@remote.test"}, "421 4.4.2 mx.remote.test: timeout")
    for message_id in (q.held, q.fresh, q.deferred, q.hold, q.mixed):
        message = store.get_message(message_id)
        assert message is not None
        q.sizes[message_id] = message.size
    yield q
    store.close()


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


# --- list -------------------------------------------------------------------------------------


def test_list_text(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("-Queue ID-") and "-Sender/Recipient-" in lines[0]
    # Oldest first; one block per message, a blank line after each.
    starts = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ")
              and not line.startswith("--")]
    assert starts == [queue.hold + "!", queue.deferred, queue.mixed, queue.fresh, queue.held]
    first = next(line for line in lines if line.startswith(queue.deferred))
    message = queue.store.get_message(queue.deferred)
    assert message is not None
    arrival = time.strftime("%a %b %e %H:%M:%S", time.localtime(message.received_at))
    assert first == (f"{queue.deferred}  {queue.sizes[queue.deferred]:>8} {arrival:<20}"
                     "  erin@example.org")
    assert ("frank@remote.test  outbound attempts=2 (451 4.7.1 Greylisted, try later)"
            in out)
    assert "bob@example.org  held attempts=0\n" in out
    assert "hal@example.org  hold attempts=0" in out
    assert "kim@remote.test  outbound attempts=1 (421 4.4.2 mx.remote.test: timeout)" in out
    assert "lee@other.test  outbound attempts=0\n" in out
    held_line = next(line for line in lines if line.startswith(queue.held))
    assert held_line.endswith("MAILER-DAEMON")  # the null sender, as mailq shows it
    total = sum(queue.sizes.values())
    assert lines[-1] == f"-- {-(-total // 1024)} Kbytes in 5 Requests."


def test_list_marks_messages_being_delivered(queue: Queue,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    [claimed] = queue.store.claim_due_outbound(time.time(), 1, "runner-1", 600)
    assert claimed.id == queue.fresh
    code, out, _ = queue.run(capsys, "list")
    assert code == 0
    assert f"\n{queue.fresh}*" in out and f"\n{queue.hold}!" in out
    [entry] = json_lines(queue.run(capsys, "list", "--json", "--recipient", "dave")[1])
    assert entry["active"] is True and entry["recipients"][0]["active"] is True
    queue.store.release_claims("runner-1")
    assert f"\n{queue.fresh}*" not in queue.run(capsys, "list")[1]


def test_list_json(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "list", "--json")
    assert (code, err) == (0, "")
    entries = {e["queue_id"]: e for e in json_lines(out)}
    assert list(entries) == [queue.hold, queue.deferred, queue.mixed, queue.fresh, queue.held]
    deferred = entries[queue.deferred]
    message = queue.store.get_message(queue.deferred)
    assert message is not None
    assert deferred["arrival_time"] == int(message.received_at)
    assert deferred["message_size"] == queue.sizes[queue.deferred]
    assert (deferred["sender"], deferred["origin"]) == ("erin@example.org", "submission")
    [frank] = deferred["recipients"]
    assert frank["address"] == "frank@remote.test" and frank["state"] == "outbound"
    assert frank["attempts"] == 2 and frank["last_reply"] == "451 4.7.1 Greylisted, try later"
    assert frank["next_attempt_at"] > time.time() + 3000
    assert entries[queue.held]["sender"] == ""
    assert entries[queue.hold]["on_hold"] is True
    assert [(r["address"], r["state"], r["attempts"]) for r in
            entries[queue.mixed]["recipients"]] == [
        ("jo@example.org", "held", 0), ("kim@remote.test", "outbound", 1),
        ("lee@other.test", "outbound", 0)]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--domain", "remote.test"], ["deferred", "mixed", "fresh"]),
        (["--domain", "EXAMPLE.org."], ["hold", "mixed", "held"]),
        (["--state", "held"], ["mixed", "held"]),
        (["--state", "outbound"], ["deferred", "mixed", "fresh"]),
        (["--state", "deferred"], ["deferred", "mixed"]),
        (["--state", "hold"], ["hold"]),
        (["--sender", "carol@example.org"], ["fresh"]),
        (["--sender", "<CAROL@example.org>"], ["fresh"]),
        (["--sender", "rol@example.org"], []),  # a whole address matches exactly
        (["--sender", "@example.org"], ["deferred", "fresh"]),
        (["--sender", "<>"], ["held"]),
        (["--recipient", "frank@remote.test"], ["deferred"]),
        (["--recipient", "REMOTE.test"], ["deferred", "mixed", "fresh"]),
        (["--older-than", "1h"], ["hold", "deferred"]),
        (["--older-than", "1d"], ["hold"]),
        (["--older-than", "30m", "--domain", "remote.test", "--state", "deferred"],
         ["deferred", "mixed"]),
        (["--domain", "other.test", "--state", "deferred"], []),  # one recipient matches both
        (["--sender", "sender.test", "--state", "held", "--older-than", "10m"], ["mixed"]),
    ],
)
def test_list_filters(queue: Queue, capsys: pytest.CaptureFixture[str], argv: list[str],
                      expected: list[str]) -> None:
    code, out, err = queue.run(capsys, "list", "--json", *argv)
    assert (code, err) == (0, "")
    names = {getattr(queue, name): name for name in ("held", "fresh", "deferred", "hold",
                                                     "mixed")}
    entries = json_lines(out)
    assert [names[e["queue_id"]] for e in entries] == expected
    # A listed message shows all its recipients, not only the matching ones.
    for entry in entries:
        message = queue.store.get_message(entry["queue_id"])
        assert message is not None and len(entry["recipients"]) == len(message.recipients)
    code, text, _ = queue.run(capsys, "list", *argv)
    assert code == 0
    if expected:
        assert text.endswith(f"in {len(expected)} Request{'s' if len(expected) > 1 else ''}.\n")
    else:
        assert text == "No message matches\n"


def test_list_empty_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, None)
    open_store(tmp_path / "data").close()  # an empty store (a missing one is an error, 66)
    assert main(["-c", str(config), "queue", "list"]) == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"
    assert main(["-c", str(config), "queue", "list", "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_list_pages_through_a_long_queue(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from fermoposta.provider import queue_common

    monkeypatch.setattr(queue_common, "BATCH", 3)
    config = write_config(tmp_path, None)
    with open_store(tmp_path / "data") as store:
        ids = [store.enqueue(NewMessage(f"s{i}@a.test", (NewRecipient(f"r{i}@b.test", "b.test",
                                                                      OUTBOUND),),
                                        MessageOrigin.SUBMISSION), io.BytesIO(b"x\r\n"))
               for i in range(8)]
    assert main(["-c", str(config), "queue", "list", "--json"]) == 0
    assert [e["queue_id"] for e in json_lines(capsys.readouterr().out)] == ids
    assert main(["-c", str(config), "queue", "hold", "ALL"]) == 0
    assert capsys.readouterr().out == "Placed on hold: 8 messages (8 recipients changed)\n"
    assert main(["-c", str(config), "queue", "delete", "ALL"]) == 0
    assert capsys.readouterr().out == "Deleted: 8 messages\n"


# --- show -------------------------------------------------------------------------------------


def test_show(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "show", queue.mixed.lower())
    assert (code, err) == (0, "")
    assert f"Queue ID:   {queue.mixed} (queued)" in out
    assert f"Size:       {queue.sizes[queue.mixed]} bytes" in out
    assert "Sender:     <ivan@sender.test>" in out
    assert "Origin:     mx from mail.sender.test[192.0.2.7]" in out
    assert f"Node:       {queue.store.node} (accepted it)\n" in out  # issue 9: which node
    assert "  <kim@remote.test>\n    state:         outbound\n    attempts:      1\n" in out
    assert "    last reply:    421 4.4.2 mx.remote.test: timeout" in out
    assert "  <jo@example.org>\n    state:         held\n" in out
    assert "-- headers --\n" in out and "Subject: queue test\n" in out
    assert "The body line" not in out and "\r" not in out

    code, out, _ = queue.run(capsys, "show", queue.mixed, "--body")
    assert code == 0
    assert "-- message --\n" in out
    assert out.endswith("Subject: queue test\nMessage-ID: <q@sender.test>\n\n"
                        "The body line\nsecond line\n")

    code, out, _ = queue.run(capsys, "show", queue.hold)
    assert f"Queue ID:   {queue.hold}! (on hold)" in out

    [entry] = json_lines(queue.run(capsys, "show", queue.deferred, "--json")[1])
    assert entry["queue_id"] == queue.deferred and entry["recipients"][0]["attempts"] == 2


def test_show_unknown_id(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "show", "0123456789AB")
    assert (code, out) == (65, "")
    assert err == "fermoposta: queue show: 0123456789AB: no such message in the queue\n"


# --- delete -----------------------------------------------------------------------------------


def test_delete_ids_and_unknown(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "delete", queue.held, "FFFFFFFFFFFF",
                               queue.fresh.lower() + "*")
    assert code == 65
    assert out == "Deleted: 2 messages\n"
    assert err == "fermoposta: queue delete: FFFFFFFFFFFF: no such message in the queue\n"
    assert queue.ids() == [queue.hold, queue.deferred, queue.mixed]
    assert queue.store.get_message(queue.held) is None


def test_delete_from_stdin(queue: Queue, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The documented pipeline: queue list --json | jq -r .queue_id | queue delete -
    code, out, _ = queue.run(capsys, "list", "--json", "--state", "deferred")
    ids = "\n".join(e["queue_id"] for e in json_lines(out))
    monkeypatch.setattr("sys.stdin", io.StringIO(ids + "\n\n# a comment\n"))
    code, out, err = queue.run(capsys, "delete", "-")
    assert (code, out, err) == (0, "Deleted: 2 messages\n", "")
    assert queue.ids() == [queue.hold, queue.fresh, queue.held]


def test_delete_all(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    assert queue.run(capsys, "delete", "ALL") == (0, "Deleted: 5 messages\n", "")
    assert queue.ids() == []
    assert queue.store.queue_summary() == [("held", 0, 0, None), ("outbound", 0, 0, None),
                                           ("hold", 0, 0, None)]
    assert queue.run(capsys, "list") == (0, "Mail queue is empty\n", "")


@pytest.mark.parametrize("command", ["delete", "hold", "release"])
def test_all_must_be_upper_case_and_alone(queue: Queue, capsys: pytest.CaptureFixture[str],
                                          command: str) -> None:
    code, out, err = queue.run(capsys, command, queue.held, "all")
    assert (code, out) == (64, "")
    assert err == (f"fermoposta: queue {command}: 'all' is not a queue id; to act on every "
                   "message, write ALL in upper case\n")
    code, out, err = queue.run(capsys, command, "ALL", queue.held)
    assert (code, out) == (64, "")
    assert "ALL stands alone" in err
    assert len(queue.ids()) == 5  # nothing was done
    assert queue.states(queue.held)["bob@example.org"][0] == HELD


def test_usage_errors(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "list", "--state", "stuck")
    assert (code, out) == (64, "")
    assert "argument --state: invalid choice: 'stuck'" in err
    code, out, err = queue.run(capsys, "list", "--older-than", "yesterday")
    assert (code, out) == (64, "")
    assert "argument --older-than: expected a duration like 10m" in err
    assert 'got "yesterday"' in err
    code, _, err = queue.run(capsys, "list", "--older-than", "-5m")
    assert code == 64 and "--older-than" in err
    code, _, err = queue.run(capsys, "list", "--domain", "bad_domain!.test")
    assert code == 64 and "argument --domain: invalid domain name" in err
    code, _, err = queue.run(capsys, "list", "--recipient", "<>")
    assert code == 64 and "never the null address" in err
    code, _, err = queue.run(capsys, "stats", "--top", "0")
    assert code == 64 and "expected a positive integer" in err
    assert queue.run(capsys, "delete")[0] == 64  # at least one ID, - or ALL
    assert queue.run(capsys, "show")[0] == 64
    code, _, err = queue.run(capsys)
    assert code == 64 and "COMMAND" in err


def test_store_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, None)
    (tmp_path / "data").write_text("a file where the data directory should be")
    assert main(["-c", str(config), "queue", "list"]) == 75
    assert "cannot open the store" in capsys.readouterr().err


# --- hold and release -------------------------------------------------------------------------


def test_hold_and_release_are_exact(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    # States a "hosted domain -> held, else outbound" guess would get wrong:
    # held mail for a domain no longer hosted, and outbound mail to a hosted one.
    odd = queue.enqueue("mo@sender.test", [("nia@gone.test", HELD),
                                           ("oz@example.org", OUTBOUND)])
    before = {i: queue.states(i) for i in queue.ids()}
    code, out, err = queue.run(capsys, "hold", odd, queue.mixed)
    assert (code, out, err) == (0, "Placed on hold: 2 messages (5 recipients changed)\n", "")
    assert {s[0] for s in queue.states(odd).values()} == {HOLD}
    assert {s[0] for s in queue.states(queue.mixed).values()} == {HOLD}
    # Neither drained nor delivered, nor expired:
    assert queue.store.held_message_ids(["gone.test", "example.org"]) == [queue.held]
    due = queue.store.claim_due_outbound(time.time(), 100, "runner", 60)
    assert {m.id for m in due} == {queue.fresh}
    queue.store.release_claims("runner")
    assert {m.id for m in queue.store.held_older_than(time.time() + 10, 100)} == {queue.held}
    entries = {e["queue_id"]: e for e in json_lines(queue.run(capsys, "list", "--json")[1])}
    assert [(r["address"], r["state"], r["hold_from"]) for r in entries[odd]["recipients"]] == [
        ("nia@gone.test", "hold", "held"), ("oz@example.org", "hold", "outbound")]
    assert f"\n{odd}!" in queue.run(capsys, "list")[1]
    code, out, _ = queue.run(capsys, "show", odd)
    assert "state:         hold (was held)" in out

    code, out, err = queue.run(capsys, "release", odd, queue.mixed)
    assert (code, out, err) == (0, "Released from hold: 2 messages (5 recipients changed)\n",
                                "")
    assert {i: queue.states(i) for i in queue.ids()} == before  # attempts, replies, schedule too
    # Releasing again changes nothing.
    assert queue.run(capsys, "release", odd)[1] == (
        "Released from hold: 1 message (0 recipients changed)\n")


def test_hold_all_and_release_all_round_trip(queue: Queue,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = {i: queue.states(i) for i in queue.ids()}
    assert queue.run(capsys, "hold", "ALL") == (
        0, "Placed on hold: 5 messages (6 recipients changed)\n", "")
    assert all(s[0] == HOLD for i in queue.ids() for s in queue.states(i).values())
    assert queue.store.claim_due_outbound(time.time() + 7200, 100, "runner", 60) == []
    assert queue.run(capsys, "release", "ALL") == (
        0, "Released from hold: 5 messages (7 recipients changed)\n", "")
    after = {i: queue.states(i) for i in queue.ids()}
    # hal@example.org was on hold before any `queue hold` (no state remembered):
    # it goes to HELD, since example.org is hosted.
    assert after[queue.hold] == {"hal@example.org": (HELD, 0, None, None)}
    del before[queue.hold], after[queue.hold]
    assert after == before


def test_hold_release_from_stdin_and_unknown(queue: Queue, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{queue.fresh}\n{queue.deferred}!\n"))
    code, out, err = queue.run(capsys, "hold", "-", "ABCDEF012345")
    assert code == 65
    assert out == "Placed on hold: 2 messages (2 recipients changed)\n"
    assert err == "fermoposta: queue hold: ABCDEF012345: no such message in the queue\n"
    assert queue.states(queue.fresh)["dave@remote.test"][0] == HOLD
    code, _, err = queue.run(capsys, "release", queue.fresh, "ABCDEF012345")
    assert code == 65 and "ABCDEF012345: no such message" in err
    assert queue.states(queue.fresh)["dave@remote.test"][0] == OUTBOUND


# --- bounce -----------------------------------------------------------------------------------


def parse(store: SQLiteStore, message_id: str) -> email.message.Message:
    raw = b"".join(store.read_body(message_id))
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def test_bounce_sends_a_dsn(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "bounce", queue.mixed)
    assert (code, err) == (0, "")
    dsn_id = out.split("DSN ", 1)[1].split()[0]
    assert out == (f"{queue.mixed}: expired 3 recipients; DSN {dsn_id} queued for "
                   "<ivan@sender.test>\nExpired: 1 message (3 recipients); 1 DSN queued\n")
    assert queue.store.get_message(queue.mixed) is None
    dsn = queue.store.get_message(dsn_id)
    assert dsn is not None and dsn.sender == "" and dsn.origin == MessageOrigin.DSN
    # sender.test is not hosted: the DSN goes out with the outbound runner.
    assert [(r.address, r.state) for r in dsn.recipients] == [("ivan@sender.test", OUTBOUND)]
    report = parse(queue.store, dsn_id)
    assert report.get_content_type() == "multipart/report"
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@mx.provider.test>"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.provider.test"
    assert per_message["X-Fermoposta-Queue-ID"] == queue.mixed
    assert [(r["Final-Recipient"], r["Action"], r["Status"]) for r in per_recipient] == [
        ("rfc822; jo@example.org", "failed", "4.7.0"),
        ("rfc822; kim@remote.test", "failed", "4.7.0"),
        ("rfc822; lee@other.test", "failed", "4.7.0"),
    ]
    assert "message is administratively expired" in per_recipient[0]["Diagnostic-Code"]
    assert "421 4.4.2 mx.remote.test: timeout" in " ".join(
        per_recipient[1]["Diagnostic-Code"].split())
    headers = next(p for p in report.walk() if p.get_content_type() == "text/rfc822-headers")
    assert b"Subject: queue test" in headers.get_payload(decode=True)


def test_bounce_from_stdin_hosted_sender_and_no_dsn_cases(
        queue: Queue, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    never = queue.enqueue("pat@sender.test", [("quinn@remote.test", OUTBOUND)], notify="NEVER")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{queue.deferred}\n{queue.held}\n{never}\n"
                                                 "FFFFFFFFFFFF\n"))
    code, out, err = queue.run(capsys, "bounce", "-")
    assert code == 65
    assert err == "fermoposta: queue bounce: FFFFFFFFFFFF: no such message in the queue\n"
    lines = out.splitlines()
    assert lines[1] == f"{queue.held}: expired 1 recipient; no DSN (null sender)"
    assert lines[2] == f"{never}: expired 1 recipient; no DSN (NOTIFY asks for none)"
    assert lines[3] == "Expired: 3 messages (3 recipients); 1 DSN queued"
    dsn_id = lines[0].split("DSN ", 1)[1].split()[0]
    assert queue.ids() == [queue.hold, queue.mixed, queue.fresh, dsn_id]
    dsn = queue.store.get_message(dsn_id)
    # erin@example.org is one of our customers: the DSN waits for its ATRN.
    assert dsn is not None and [(r.address, r.state) for r in dsn.recipients] == [
        ("erin@example.org", HELD)]
    [rcpt] = parse(queue.store, dsn_id).get_payload()[1].get_payload()[1:]
    assert (rcpt["Final-Recipient"], rcpt["Action"]) == ("rfc822; frank@remote.test", "failed")


def test_bounce_refuses_all(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "bounce", "ALL")
    assert (code, out) == (64, "")
    assert err == ("fermoposta: queue bounce: bounce does not take ALL: name the messages, "
                   "or pipe their ids to -\n")
    code, _, err = queue.run(capsys, "bounce", "all")
    assert code == 64 and "'all' is not a queue id; bounce does not take ALL" in err
    assert len(queue.ids()) == 5


# --- retry ------------------------------------------------------------------------------------


def test_retry_by_domain_makes_recipients_due(queue: Queue,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "retry", "--domain", "remote.test")
    assert (code, err) == (0, "")
    assert out.startswith("Due now: 3 outbound recipients of 3 messages;")
    claimed = queue.store.claim_due_outbound(time.time(), 100, "runner", 60)
    got = {r.address for m in claimed for r in m.recipients}
    # frank and kim were deferred for an hour; lee (other.test) was due anyway.
    assert got == {"dave@remote.test", "frank@remote.test", "kim@remote.test", "lee@other.test"}
    frank = next(r for m in claimed for r in m.recipients if r.address == "frank@remote.test")
    assert frank.attempts == 2 and frank.last_reply == "451 4.7.1 Greylisted, try later"
    # Claimed recipients are the runner's: retry leaves them alone.
    code, out, _ = queue.run(capsys, "retry")
    assert out.startswith("Due now: 0 outbound recipients of 0 messages;")


def test_retry_ids_and_unknown(queue: Queue, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = queue.run(capsys, "retry", queue.deferred, queue.held, "FFFFFFFFFFFF")
    assert code == 65
    assert out.startswith("Due now: 1 outbound recipient of 1 message;")
    assert err == "fermoposta: queue retry: FFFFFFFFFFFF: no such message in the queue\n"
    claimed = queue.store.claim_due_outbound(time.time(), 100, "runner", 60)
    assert {r.address for m in claimed for r in m.recipients} == {
        "dave@remote.test", "frank@remote.test", "lee@other.test"}  # not kim: not asked
    queue.store.release_claims("runner", next_attempt_at=time.time() + 3600)
    monkeypatch.setattr("sys.stdin", io.StringIO(queue.mixed + "\n"))
    code, out, _ = queue.run(capsys, "retry", "-", "--domain", "other.test")
    assert code == 0 and out.startswith("Due now: 1 outbound recipient of 1 message;")
    code, _, err = queue.run(capsys, "retry", "all")
    assert code == 64 and err == ("fermoposta: queue retry: 'all' is not a queue id; without "
                                  "ids, retry makes every outbound recipient due\n")
    assert queue.run(capsys, "retry", "ALL")[0] == 64


# --- stats ------------------------------------------------------------------------------------


def test_stats_json(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "stats", "--json")
    assert (code, err) == (0, "")
    stats = json.loads(out)
    assert stats["age_buckets"] == ["5m", "10m", "20m", "40m", "80m", "160m", "320m", "640m",
                                    "1280m", "1280m+"]
    sizes = queue.sizes
    total = stats["total"]
    assert (total["messages"], total["recipients"], total["bytes"]) == (5, 7, sum(sizes.values()))
    assert total["states"] == {"held": 2, "outbound": 4, "deferred": 2, "hold": 1}
    assert 2 * 86400 <= total["oldest_age"] < 2 * 86400 + 60
    ages = {k: v for k, v in total["ages"].items() if v}
    assert ages == {"5m": 1, "20m": 1, "80m": 3, "160m": 1, "1280m+": 1}
    domains = {d["domain"]: d for d in stats["domains"]}
    assert [d["domain"] for d in stats["domains"]] == ["example.org", "remote.test", "other.test"]
    org = domains["example.org"]
    assert (org["messages"], org["recipients"]) == (3, 3)
    assert org["bytes"] == sizes[queue.held] + sizes[queue.hold] + sizes[queue.mixed]
    assert org["states"] == {"held": 2, "outbound": 0, "deferred": 0, "hold": 1}
    assert {k: v for k, v in org["ages"].items() if v} == {"5m": 1, "80m": 1, "1280m+": 1}
    remote = domains["remote.test"]
    assert remote["bytes"] == sizes[queue.fresh] + sizes[queue.deferred] + sizes[queue.mixed]
    assert remote["states"] == {"held": 0, "outbound": 3, "deferred": 2, "hold": 0}
    assert 130 * 60 <= remote["oldest_age"] < 131 * 60
    assert {k: v for k, v in remote["ages"].items() if v} == {"20m": 1, "80m": 1, "160m": 1}
    assert domains["other.test"]["messages"] == 1 and stats["more_domains"] == 0
    top = json.loads(queue.run(capsys, "stats", "--json", "--top", "1")[1])
    assert [d["domain"] for d in top["domains"]] == ["example.org"]
    assert top["more_domains"] == 2 and top["total"] == total


def test_stats_text(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = queue.run(capsys, "stats", "--top", "2")
    assert code == 0
    counts, shape, more = out.split("\n\n")
    rows = [line.split() for line in counts.splitlines()]
    assert rows[0] == ["DOMAIN", "MSGS", "RCPTS", "BYTES", "OLDEST", "HELD", "OUTBOUND",
                       "DEFERRED", "HOLD"]
    total = sum(queue.sizes.values())
    assert rows[1][:4] == ["TOTAL", "5", "7", str(total)] and rows[1][4].startswith("2d00h")
    assert rows[1][5:] == ["2", "4", "2", "1"]
    assert rows[2][0] == "example.org" and rows[3][0] == "remote.test" and len(rows) == 4
    shape_rows = [line.split() for line in shape.splitlines()]
    assert shape_rows[0] == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                             "1280+"]
    assert shape_rows[1] == ["TOTAL", "7", "1", "0", "1", "0", "3", "1", "0", "0", "0", "1"]
    assert shape_rows[3] == ["remote.test", "3", "0", "0", "1", "0", "1", "1", "0", "0", "0",
                             "0"]
    assert more == "(and 1 more domain, counted in TOTAL; see --top)\n"


def test_queue_summary_for_metrics(queue: Queue) -> None:
    rows = {state: (messages, size, oldest)
            for state, messages, size, oldest in queue.store.queue_summary()}
    assert list(rows) == ["held", "outbound", "hold"]
    sizes = queue.sizes
    assert rows["held"][:2] == (2, sizes[queue.held] + sizes[queue.mixed])
    assert rows["outbound"][:2] == (3, sizes[queue.fresh] + sizes[queue.deferred]
                                    + sizes[queue.mixed])
    assert rows["hold"][:2] == (1, sizes[queue.hold])
    mixed = queue.store.get_message(queue.mixed)
    deferred = queue.store.get_message(queue.deferred)
    hold = queue.store.get_message(queue.hold)
    assert mixed is not None and deferred is not None and hold is not None
    assert rows["held"][2] == mixed.received_at
    assert rows["outbound"][2] == deferred.received_at
    assert rows["hold"][2] == hold.received_at


@pytest.mark.parametrize("command", ["delete", "hold", "bounce", "retry"])
def test_an_empty_pipe_does_nothing(queue: Queue, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """`... | queue delete -` with no ids acts on no message, never on all."""
    before = {i: queue.states(i) for i in queue.ids()}
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    code, out, err = queue.run(capsys, command, "-")
    assert (code, err) == (0, "")
    assert " 0 " in out or out.startswith(("Deleted: 0", "Placed on hold: 0"))
    assert {i: queue.states(i) for i in queue.ids()} == before


# --- list: ids, count, age window, account ---------------------------------------------------


def names_of(queue: Queue, ids: list[str]) -> list[str]:
    names = {getattr(queue, n): n for n in ("held", "fresh", "deferred", "hold", "mixed")}
    return [names[i] for i in ids]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["hold", "deferred", "mixed", "fresh", "held"]),
        (["--younger-than", "1h"], ["mixed", "fresh", "held"]),
        (["--younger-than", "10m"], ["held"]),
        (["--younger-than", "1h", "--older-than", "10m"], ["mixed", "fresh"]),
        (["--younger-than", "10m", "--older-than", "1h"], []),  # an empty window
        (["--younger-than", "1h", "--state", "held"], ["mixed", "held"]),
        (["--account", "acme"], ["hold", "mixed", "held"]),  # example.org
        # beta has other.test and remote.test: mixed has recipients in both, listed once.
        (["--account", "beta"], ["deferred", "mixed", "fresh"]),
        (["--account", "beta", "--domain", "other.test"], ["mixed"]),
        (["--account", "beta", "--domain", "example.org"], []),  # not beta's
        (["--account", "beta", "--state", "deferred"], ["deferred", "mixed"]),
        (["--account", "beta", "--younger-than", "1h"], ["mixed", "fresh"]),
        (["--account", "empty"], []),  # an account without domains
    ],
)
def test_list_ids_and_count(queue: Queue, capsys: pytest.CaptureFixture[str], argv: list[str],
                            expected: list[str]) -> None:
    add_customer(queue.store, "beta", ("other.test", "remote.test"))
    add_customer(queue.store, "empty", ())
    code, out, err = queue.run(capsys, "list", "--ids", *argv)
    assert (code, err) == (0, "")
    assert names_of(queue, out.splitlines()) == expected
    assert queue.run(capsys, "list", "-i", *argv) == (0, out, "")
    assert queue.run(capsys, "list", "--count", *argv) == (0, f"{len(expected)}\n", "")
    # The same filters in the full listing and in JSON.
    code, out, _ = queue.run(capsys, "list", "--json", *argv)
    assert names_of(queue, [e["queue_id"] for e in json_lines(out)]) == expected
    code, out, _ = queue.run(capsys, "list", *argv)
    if expected:
        assert out.endswith(f"in {len(expected)} Request{'s' if len(expected) > 1 else ''}.\n")
    else:
        assert out == "No message matches\n"


def test_list_ids_page_through_a_long_queue(queue: Queue, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fermoposta.provider.queue_common.BATCH", 2)
    add_customer(queue.store, "beta", ("other.test", "remote.test"))
    extra = [queue.enqueue("x@sender.test", [(f"u{i}@remote.test", OUTBOUND),
                                             (f"u{i}@other.test", OUTBOUND)], 30 * MINUTE - i)
             for i in range(5)]
    code, out, _ = queue.run(capsys, "list", "--ids", "--account", "beta")
    assert code == 0
    assert out.split() == [queue.deferred, queue.mixed, *extra, queue.fresh]
    assert queue.run(capsys, "list", "--count", "--younger-than", "40m")[1] == "7\n"


def test_list_usage_errors_and_unknown_account(queue: Queue,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = queue.run(capsys, "list", "--account", "nobody")
    assert (code, out) == (65, "")
    assert err == "fermoposta: queue list: --account nobody: no such account\n"
    assert queue.run(capsys, "list", "--count", "--account", "nobody")[0] == 65
    for argv in (["--ids", "--json"], ["--count", "--ids"], ["--younger-than", "soon"]):
        code, out, err = queue.run(capsys, "list", *argv)
        assert (code, out) == (64, "")
        assert "error:" in err


# --- requeue ----------------------------------------------------------------------------------


def test_requeue_after_domains_moved(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing moved yet: nothing changes, nothing is logged.
    code, out, err = queue.run(capsys, "requeue", queue.mixed)
    assert (code, out, err, queue.log) == (
        0, f"{queue.mixed}: no change\nRequeued: 1 message, 0 changed (no change)\n", "", [])
    # example.org leaves this provider; remote.test is now hosted here.
    assert queue.store.remove_domain("example.org")
    add_customer(queue.store, "beta", ("remote.test",))
    queue.store.hold_messages([queue.hold])  # remembers HELD: now wrong
    before = time.time()
    code, out, err = queue.run(capsys, "requeue", queue.mixed, queue.held, queue.hold,
                               queue.fresh, "FFFFFFFFFFFF")
    assert code == 65
    assert out.splitlines() == [
        f"{queue.mixed}: 1 recipient held -> outbound, 1 recipient outbound -> held",
        f"{queue.held}: 1 recipient held -> outbound",
        f"{queue.hold}: no change",  # enqueued on hold: no state remembered
        f"{queue.fresh}: 1 recipient outbound -> held",
        "Requeued: 4 messages, 3 changed (2 recipients held -> outbound, "
        "2 recipients outbound -> held)",
    ]
    assert err == "fermoposta: queue requeue: FFFFFFFFFFFF: no such message in the queue\n"
    assert queue.log == [
        f"{queue.mixed}: requeued (1 recipient held -> outbound, 1 recipient outbound -> held)",
        f"{queue.held}: requeued (1 recipient held -> outbound)",
        f"{queue.fresh}: requeued (1 recipient outbound -> held)",
    ]
    states = queue.states(queue.mixed)
    assert states["jo@example.org"][:2] == (OUTBOUND, 0)
    assert before <= states["jo@example.org"][3] <= time.time()  # due now
    assert states["kim@remote.test"][:3] == (HELD, 1, "421 4.4.2 mx.remote.test: timeout")
    assert states["lee@other.test"][0] == OUTBOUND
    # ALL: the deferred message is the one left to move.
    code, out, err = queue.run(capsys, "requeue", "ALL")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == ("Requeued: 5 messages, 1 changed "
                                    "(1 recipient outbound -> held)")
    assert queue.log == [f"{queue.deferred}: requeued (1 recipient outbound -> held)"]
    assert queue.states(queue.deferred)["frank@remote.test"][:2] == (HELD, 2)


def test_requeue_arguments(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["all"], ["ALL", queue.held], []):
        code, out, err = queue.run(capsys, "requeue", *argv)
        assert (code, out) == (64, "")
        assert err
    assert queue.log == []


# --- the log lines of the actions ---------------------------------------------------------------


def test_each_action_logs_a_line_per_message(queue: Queue,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = queue.run(capsys, "hold", queue.mixed, queue.hold)
    assert (code, out) == (0, "Placed on hold: 2 messages (3 recipients changed)\n")
    assert queue.log == [f"{queue.mixed}: placed on hold"]  # the other one was on hold already
    queue.run(capsys, "release", queue.mixed, queue.held)
    assert queue.log == [f"{queue.mixed}: released from hold"]
    queue.run(capsys, "retry", queue.mixed, queue.held)
    assert queue.log == [f"{queue.mixed}: due now"]
    code, out, _ = queue.run(capsys, "bounce", queue.mixed, queue.held)
    dsn_id = out.split("DSN ", 1)[1].split()[0]
    assert queue.log == [f"{queue.mixed}: expired, DSN {dsn_id}",
                         f"{queue.held}: expired, no DSN (null sender)"]
    assert not any(LOG_LINE.match(line) for line in out.splitlines())  # stdout: results only
    queue.run(capsys, "delete", queue.fresh, "FFFFFFFFFFFF", queue.deferred)
    assert sorted(queue.log) == sorted([f"{queue.fresh}: removed", f"{queue.deferred}: removed"])
    queue.run(capsys, "delete", "ALL")
    assert sorted(queue.log) == sorted(f"{i}: removed" for i in (queue.hold, dsn_id))
    # Reading commands log nothing.
    code, out, err = queue.run(capsys, "list")
    assert (code, err, queue.log) == (0, "", [])


def test_action_log_lines_in_json(queue: Queue, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["-c", str(queue.config), "--log-format", "json", "queue", "hold", queue.mixed])
    out, err = capsys.readouterr()
    assert (code, out) == (0, "Placed on hold: 1 message (3 recipients changed)\n")
    [line] = [json.loads(text) for text in err.splitlines()]
    assert line["component"] == "queue" and line["level"] == "info"
    assert line["message"] == f"{queue.mixed}: placed on hold"
    assert (line["queue_id"], line["action"], line["recipients"]) == (queue.mixed, "hold", 3)


def test_action_log_respects_a_configured_logger(queue: Queue,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("fermoposta")
    before = (list(logger.handlers), logger.level, logger.propagate)
    queue.run(capsys, "retry", queue.mixed)
    # The CLI's stderr handler is gone after the command.
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    # Someone configured logging already (an embedding program): its handler, not ours.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code, out, err = queue.run(capsys, "delete", queue.held)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[1])
    assert (code, out, err, queue.log) == (0, "Deleted: 1 message\n", "", [])
    assert stream.getvalue() == f"{queue.held}: removed\n"


def test_action_log_level_from_the_config(tmp_path: Path, queue: Queue,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    text = queue.config.read_text()
    queue.config.write_text(text.replace("[log]", "[log]\nlevel = \"warning\"", 1)
                            if "[log]" in text else text + "\n[log]\nlevel = \"warning\"\n")
    code, out, err = queue.run(capsys, "delete", queue.held)
    assert (code, out, err, queue.log) == (0, "Deleted: 1 message\n", "", [])
