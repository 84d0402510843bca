"""The status page's parts without a server: the operators file and its
scrypt hashes, `fermoposta web passwd`, session expiry, the pull activity."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fermoposta.cli import main
from fermoposta.provider.activity import Activity
from fermoposta.provider.web.operators import (
    OperatorsFileError,
    check_password,
    hash_password,
    load_operators,
    operator_for_certificate,
    verify_password,
)
from fermoposta.provider.web.sessions import MAX_AGE, Sessions


def test_hash_round_trip_and_malformed_hashes() -> None:
    stored = hash_password("pw")
    assert stored.startswith("$scrypt$n=16384,r=8,p=1$")
    assert verify_password(stored, "pw") and not verify_password(stored, "pW")
    assert hash_password("pw") != stored  # a new salt each time
    for bad in ("", "pw", stored.replace("n=16384", "n=1000"), stored[:-4] + "!!!!",
                stored.replace("$scrypt$", "$bcrypt$")):
        assert not verify_password(bad, "pw")


def test_operators_file(tmp_path: Path) -> None:
    path = tmp_path / "ops"
    fingerprint = "ab" * 32
    path.write_text(f"# comment\n\nalice:{hash_password('a')}\n"
                    f"alice:sha256:{':'.join(['AB'] * 32)}\nbob:{hash_password('b')}\n")
    operators = load_operators(path)
    assert sorted(operators) == ["alice", "bob"]
    assert check_password(operators, "alice", "a") and not check_password(operators, "alice", "b")
    assert not check_password(operators, "carol", "a")
    assert operator_for_certificate(operators, fingerprint) == "alice"
    assert operator_for_certificate(operators, "cd" * 32) is None
    path.write_text(f"alice:{hash_password('a')}\nbob:plaintext-password\n")
    with pytest.raises(OperatorsFileError, match=r"line 2: operator bob: not a hash") as exc:
        load_operators(path)
    assert "plaintext-password" not in str(exc.value)
    path.write_text("no colon here\n")
    with pytest.raises(OperatorsFileError, match="line 1: expected name:hash"):
        load_operators(path)
    with pytest.raises(OperatorsFileError, match="cannot read"):
        load_operators(tmp_path / "missing")


def test_web_passwd_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n")
    assert main(["web", "passwd", "alice", "--password-file", str(secret)]) == 0
    line = capsys.readouterr().out.strip()
    name, _, stored = line.partition(":")
    assert name == "alice" and verify_password(stored, "s3cret")
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
    assert main(["web", "passwd", "bob"]) == 0
    assert verify_password(capsys.readouterr().out.strip().partition(":")[2], "from stdin")
    assert main(["web", "passwd", "bad:name", "--password-file", str(secret)]) == 64
    assert main(["web", "passwd", "x", "--password-file", str(tmp_path / "none")]) == 66


def test_sessions_expire_when_idle_and_when_old() -> None:
    now = [1000.0]
    sessions = Sessions(idle=60, clock=lambda: now[0], max_sessions=2)
    a = sessions.create("operator", "alice")
    assert a.token != a.csrf and sessions.get(a.token) is a
    now[0] += 59
    assert sessions.get(a.token) is a  # used: idle again from now
    now[0] += 60
    assert sessions.get(a.token) is None
    b = sessions.create("customer", "acme")
    for _ in range(int(MAX_AGE // 50) + 1):
        now[0] += 50
        if sessions.get(b.token) is None:
            break
    assert sessions.get(b.token) is None and now[0] - b.created_at >= MAX_AGE
    c, d, e = (sessions.create("customer", n) for n in "cde")
    assert sessions.get(c.token) is None and len(sessions) == 2  # the oldest went
    assert sessions.get(d.token) is d and sessions.get(e.token) is e


def test_activity_rings() -> None:
    activity = Activity(clock=lambda: 5.0)
    one = activity.started("acme", ["example.org"])
    assert [p.account for p in activity.in_progress()] == ["acme"]
    activity.finished(one, messages=2, delivered=2, deferred=0, failed=0, aborted=None)
    two = activity.started("acme", ["example.org"])
    activity.finished(two, messages=1, delivered=0, deferred=1, failed=0, aborted=None)
    assert activity.in_progress() == []
    pulls = activity.pulls("acme")
    assert [p.delivered for p in pulls] == [0, 2]  # newest first
    assert activity.last_success("acme") is pulls[1] and activity.last_success("other") is None
