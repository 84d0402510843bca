"""Tests of account/domain administration (fermoposta.provider.accounts)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from fermoposta.provider import accounts
from fermoposta.provider.accounts import (
    make_scram_secret,
    normalize_domain,
    normalize_fingerprint,
    read_password_file,
    register,
)
from fermoposta.store import (
    Account,
    Domain,
    MessageOrigin,
    NewMessage,
    NewRecipient,
    RecipientState,
    SQLiteStore,
    Store,
    StoreError,
)

PASSWORD = "S3cret-pässword"
FP = "AB:" * 31 + "AB"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


@pytest.fixture
def pwfile(tmp_path: Path) -> Path:
    p = tmp_path / "pw"
    p.write_text(PASSWORD + "\r\nsecond line\n", encoding="utf-8")
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fermoposta")
    p.add_argument("-c", "--config")
    sub = p.add_subparsers(dest="command", required=True)

    def never(args: argparse.Namespace) -> Store:
        raise AssertionError("not used")

    register(sub, never)
    return p


def run(store: Store, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(list(argv))
    code = args.handler(args, store)
    out, err = capsys.readouterr()
    assert PASSWORD not in out and PASSWORD not in err
    return code, out, err


def test_make_scram_secret_verifies() -> None:
    secret = make_scram_secret(PASSWORD)
    assert secret.iterations == 4096 and len(secret.salt) >= 16
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), secret.salt, secret.iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert hashlib.sha256(client_key).digest() == secret.stored_key
    assert hmac.new(salted, b"Server Key", hashlib.sha256).digest() == secret.server_key
    assert make_scram_secret(PASSWORD).salt != secret.salt
    with pytest.raises(ValueError) as exc:
        make_scram_secret("bad\u0007password")
    assert "bad" not in str(exc.value)


def test_read_password_file(tmp_path: Path, pwfile: Path) -> None:
    assert read_password_file(pwfile) == PASSWORD
    (tmp_path / "lf").write_text(" spaced \n")
    assert read_password_file(tmp_path / "lf") == " spaced "
    (tmp_path / "noeol").write_text("x")
    assert read_password_file(tmp_path / "noeol") == "x"
    (tmp_path / "empty").write_text("\nmore\n")
    with pytest.raises(ValueError, match="empty"):
        read_password_file(tmp_path / "empty")
    with pytest.raises(accounts.UnreadableInputError, match="cannot read"):
        read_password_file(tmp_path / "missing")


def test_normalizers() -> None:
    assert normalize_domain("Example.COM.") == "example.com"
    assert normalize_domain("Bücher.example") == "xn--bcher-kva.example"
    for bad in ["localhost", "", "a..b", "-x.example", "bad_char!.example", "x" * 64 + ".com"]:
        with pytest.raises(ValueError):
            normalize_domain(bad)
    assert normalize_fingerprint(FP) == "ab" * 32
    assert normalize_fingerprint("CD" * 32) == "cd" * 32
    with pytest.raises(ValueError):
        normalize_fingerprint("abcd")
    with pytest.raises(ValueError):
        normalize_fingerprint("zz" * 32)


def test_account_add_list_passwd_remove(
    store: SQLiteStore, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        store,
        capsys,
        "account",
        "add",
        "alice",
        "--domain",
        "Alice.Example",
        "--domain",
        "bücher.example",
        "--password-file",
        str(pwfile),
        "--cert-fingerprint",
        FP,
    )
    assert code == 0 and "alice" in out
    alice = store.get_account("alice")
    assert alice is not None
    assert alice.cram_secret == PASSWORD and alice.scram is not None
    assert alice.cert_fingerprints == ("ab" * 32,)
    assert [d.name for d in store.list_domains("alice")] == [
        "alice.example",
        "xn--bcher-kva.example",
    ]

    code, out, _ = run(
        store, capsys, "account", "add", "bob", "--password-file", str(pwfile), "--no-cram-md5"
    )
    assert code == 0
    bob = store.get_account("bob")
    assert bob is not None and bob.cram_secret is None

    store.record_atrn("alice", 0.0)
    code, out, _ = run(store, capsys, "account", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ACCOUNT", "DOMAINS", "CRAM-MD5", "CERTS", "LAST", "ATRN",
                                "WAIT"]
    assert lines[1].split()[:4] == ["alice", "alice.example,xn--bcher-kva.example", "yes", "1"]
    assert "1970-01-01" in lines[1]
    assert lines[2].split() == ["bob", "(none!)", "no", "0", "never", "-"]  # no domains: marked

    old = alice.scram
    code, out, _ = run(
        store, capsys, "account", "passwd", "alice", "--password-file", str(pwfile), "--no-cram-md5"
    )
    assert code == 0
    alice = store.get_account("alice")
    assert alice is not None and alice.cram_secret is None and alice.scram != old
    assert alice.cert_fingerprints == ("ab" * 32,) and alice.last_atrn_at == 0.0

    code, out, _ = run(store, capsys, "account", "remove", "alice")
    assert code == 0 and "alice.example" in out
    assert store.get_account("alice") is None and store.list_domains() == []


def test_account_add_password_stdin(
    store: SQLiteStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    code, _, _ = run(store, capsys, "account", "add", "carol", "--password-stdin")
    assert code == 0
    carol = store.get_account("carol")
    assert carol is not None and carol.cram_secret == PASSWORD
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(store, capsys, "account", "passwd", "carol", "--password-stdin")
    assert code == 65 and err.startswith("fermoposta: ") and "empty" in err


def test_account_errors(
    store: SQLiteStore, pwfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = ["--password-file", str(pwfile)]
    assert run(store, capsys, "account", "add", "alice", *pw)[0] == 0
    code, _, err = run(store, capsys, "account", "add", "alice", *pw)
    assert code == 65 and "already exists" in err and err.startswith("fermoposta: ")
    code, _, err = run(store, capsys, "account", "add", "bad name", *pw)
    assert code == 64
    code, _, err = run(store, capsys, "account", "add", "bob", "--domain", "localhost", *pw)
    assert code == 64 and "single label" in err
    code, _, err = run(store, capsys, "account", "add", "bob", "--cert-fingerprint", "xyz", *pw)
    assert code == 64
    code, _, err = run(
        store, capsys, "account", "add", "bob", "--password-file", str(tmp_path / "missing")
    )
    assert code == 66 and "cannot read" in err
    assert store.get_account("bob") is None
    code, _, err = run(store, capsys, "account", "remove", "nobody")
    assert code == 65
    code, _, err = run(store, capsys, "account", "passwd", "nobody", *pw)
    assert code == 65
    # a domain already taken: nothing is created
    assert run(store, capsys, "domain", "add", "taken.example", "--account", "alice")[0] == 0
    code, _, err = run(store, capsys, "account", "add", "bob", "--domain", "Taken.example", *pw)
    assert code == 65 and "alice" in err
    assert store.get_account("bob") is None
    with pytest.raises(SystemExit):  # argparse: one password source is required
        parser().parse_args(["account", "add", "bob"])


SUBJECT = "CN=customer@example.org,O=Example\\, Ltd,C=IT"


def test_account_add_with_cert_subject(
    store: SQLiteStore, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = ["--password-file", str(pwfile)]
    code, _, _ = run(
        store, capsys, "account", "add", "alice", *pw,
        "--cert-subject", " cn = customer@example.org , o=Example\\, Ltd , c=IT",
        "--cert-subject", "CN=second", "--cert-fingerprint", FP,
    )
    assert code == 0
    alice = store.get_account("alice")
    assert alice is not None and alice.cert_subjects == (SUBJECT, "CN=second")
    assert store.account_by_subject(SUBJECT) == alice
    code, out, _ = run(store, capsys, "account", "list")
    assert out.splitlines()[1].split()[:4] == ["alice", "(none!)", "yes", "3"]
    # The same subject, typed differently, is taken.
    code, _, err = run(store, capsys, "account", "add", "bob", *pw, "--cert-subject",
                       "commonName=customer@example.org, organizationName=\"Example, Ltd\", C=IT")
    assert code == 65 and "already bound to account 'alice'" in err
    assert store.get_account("bob") is None
    # Most general first (openssl's default output): accepted, with a warning.
    code, _, err = run(store, capsys, "account", "add", "carol", *pw, "--cert-subject",
                       "C = IT, O = Example Ltd, CN = carol")
    assert code == 0 and "warning" in err and "most general" in err
    carol = store.get_account("carol")
    assert carol is not None and carol.cert_subjects == ("C=IT,O=Example Ltd,CN=carol",)
    code, _, err = run(store, capsys, "account", "add", "dan", *pw, "--cert-subject",
                       "CN=dan,DC=example,DC=org", "--cert-subject", "DC=example,DC=org")
    assert code == 0 and "most general" not in err  # (only the no-domains warning)
    for bad in ("customer@example.org", "/C=IT/CN=x", "XYZ=1", ""):
        code, _, err = run(store, capsys, "account", "add", "bob", *pw, "--cert-subject", bad)
        assert code == 64 and "invalid certificate subject" in err
    assert store.get_account("bob") is None


def test_account_certs(
    store: SQLiteStore, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pw = ["--password-file", str(pwfile)]
    assert run(store, capsys, "account", "add", "alice", *pw, "--cert-fingerprint", FP)[0] == 0
    assert run(store, capsys, "account", "add", "bob", *pw)[0] == 0
    store.record_atrn("alice", 5.0)
    before = store.get_account("alice")
    assert before is not None

    code, out, _ = run(store, capsys, "account", "certs", "alice")  # show only
    assert code == 0 and out == f"fingerprint {'ab' * 32}\n"

    code, out, _ = run(
        store, capsys, "account", "certs", "alice",
        "--add-subject", "o = Example\\, Ltd + cn = customer@example.org",
        "--add-fingerprint", "CD" * 32, "--remove-fingerprint", FP,
    )
    assert code == 0
    assert out.splitlines() == [
        f"fingerprint {'cd' * 32}",
        "subject CN=customer@example.org+O=Example\\, Ltd",
    ]
    alice = store.get_account("alice")
    assert alice is not None
    assert alice.cert_fingerprints == ("cd" * 32,)
    assert alice.cert_subjects == ("CN=customer@example.org+O=Example\\, Ltd",)
    # Secrets, creation time and last ATRN are untouched.
    assert (alice.scram, alice.cram_secret, alice.created_at, alice.last_atrn_at) == (
        before.scram, before.cram_secret, before.created_at, 5.0)
    found = store.account_by_subject("CN=customer@example.org+O=Example\\, Ltd")
    assert found is not None and found.name == "alice"
    assert store.account_by_fingerprint("ab" * 32) is None

    # Adding a binding the account already has changes nothing.
    code, _, _ = run(store, capsys, "account", "certs", "alice", "--add-fingerprint", "cd" * 32)
    assert code == 0 and store.get_account("alice") == alice

    # Data errors: bound elsewhere, not bound, unknown account.
    code, _, err = run(store, capsys, "account", "certs", "bob", "--add-fingerprint", "CD" * 32)
    assert code == 65 and "already bound to account 'alice'" in err
    code, _, err = run(store, capsys, "account", "certs", "bob", "--add-subject",
                       "CN=customer@example.org+O=Example\\, Ltd")
    assert code == 65 and "already bound to account 'alice'" in err
    code, _, err = run(store, capsys, "account", "certs", "bob", "--remove-subject", "CN=x")
    assert code == 65 and "has no certificate subject 'CN=x'" in err
    code, _, err = run(store, capsys, "account", "certs", "bob", "--remove-fingerprint", FP)
    assert code == 65
    code, _, err = run(store, capsys, "account", "certs", "nobody", "--add-subject", "CN=x")
    assert code == 65 and "no account" in err
    bob = store.get_account("bob")
    assert bob is not None and bob.cert_fingerprints == () and bob.cert_subjects == ()

    # Usage errors: malformed values, the same binding added and removed.
    for args in (["--add-fingerprint", "xyz"], ["--remove-fingerprint", "12"],
                 ["--add-subject", "nonsense"], ["--remove-subject", "CN=a,"],
                 ["--add-subject", "CN=x", "--remove-subject", "cn = x"]):
        code, _, err = run(store, capsys, "account", "certs", "alice", *args)
        assert code == 64 and err.startswith("fermoposta: "), args
    assert store.get_account("alice") == alice

    # Remove everything.
    code, out, _ = run(
        store, capsys, "account", "certs", "alice", "--remove-fingerprint", "cd:" * 31 + "cd",
        "--remove-subject", "CN=customer@example.org + O=Example\\, Ltd",
    )
    assert code == 0 and out == "account alice has no certificate bindings\n"
    code, out, _ = run(store, capsys, "account", "list")
    assert out.splitlines()[1].split()[:4] == ["alice", "(none!)", "yes", "0"]


def test_domain_commands(
    store: SQLiteStore, pwfile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(store, capsys, "account", "add", "alice", "--password-file", str(pwfile))[0] == 0
    rcpts = tmp_path / "rcpts"
    rcpts.write_text("# staff\nInfo\n\nsales\n")
    code, out, _ = run(
        store,
        capsys,
        "domain",
        "add",
        "A.example",
        "--account",
        "alice",
        "--max-messages",
        "100",
        "--max-bytes",
        "5000000",
        "--recipients-file",
        str(rcpts),
    )
    assert code == 0 and "a.example" in out
    d = store.get_domain("a.example")
    assert d is not None and d.valid_recipients == frozenset({"info", "sales"})
    assert (d.max_messages, d.max_bytes) == (100, 5_000_000)
    assert run(store, capsys, "domain", "add", "b.example", "--account", "alice")[0] == 0

    store.enqueue(
        NewMessage(
            "", (NewRecipient("x@a.example", "a.example", RecipientState.HELD),), MessageOrigin.MX
        ),
        io.BytesIO(b"12345"),
    )
    code, out, _ = run(store, capsys, "domain", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DOMAIN", "ACCOUNT", "HELD", "MSGS", "HELD", "BYTES", "QUOTA",
                                "LIFETIME", "ETRN"]
    assert lines[1].split() == ["a.example", "alice", "1", "5", "100", "msgs/5000000", "bytes",
                                "-", "-"]
    assert lines[2].split() == ["b.example", "alice", "0", "0", "-", "-", "-"]
    code, out, _ = run(store, capsys, "domain", "list", "--account", "alice")
    assert code == 0 and len(out.splitlines()) == 3
    assert run(store, capsys, "domain", "list", "--account", "nobody")[0] == 65

    assert run(store, capsys, "domain", "add", "a.example", "--account", "alice")[0] == 65
    assert run(store, capsys, "domain", "add", "c.example", "--account", "nobody")[0] == 65
    assert run(store, capsys, "domain", "add", "nodot", "--account", "alice")[0] == 64
    assert (
        run(store, capsys, "domain", "add", "c.example", "--account", "alice", "--max-bytes", "-1")[
            0
        ]
        == 64
    )
    assert (
        run(
            store,
            capsys,
            "domain",
            "add",
            "c.example",
            "--account",
            "alice",
            "--recipients-file",
            str(tmp_path / "missing"),
        )[0]
        == 66
    )
    assert run(store, capsys, "domain", "remove", "B.EXAMPLE")[0] == 0
    assert run(store, capsys, "domain", "remove", "b.example")[0] == 65
    assert store.held_message_ids(["a.example"])  # removing domains never deletes mail


class FailingStore:
    def __getattr__(self, name: str) -> object:
        def fail(*args: object, **kwargs: object) -> object:
            raise StoreError("database is locked")

        return fail


def test_store_error_is_tempfail(capsys: pytest.CaptureFixture[str], pwfile: Path) -> None:
    failing: Store = FailingStore()  # type: ignore[assignment]
    for argv in (
        ["account", "list"],
        ["domain", "list"],
        ["account", "add", "x", "--password-file", str(pwfile)],
        ["domain", "remove", "x.example"],
    ):
        code, _, err = run(failing, capsys, *argv)
        assert code == 75 and err.startswith("fermoposta: ") and "locked" in err


def test_passwords_stay_out_of_the_store_dump(
    store: SQLiteStore, pwfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(store, capsys, "account", "add", "dave", "--password-file", str(pwfile), "--no-cram-md5")
    # Every row as SQL, read from the file by a connection of our own (the
    # committed account is in the WAL: the dump must see it), and the raw
    # bytes of the file and its WAL.
    with closing(sqlite3.connect(store.path)) as raw:
        dump = "\n".join(raw.iterdump())
    assert "'dave'" in dump
    assert PASSWORD not in dump
    for part in (store.path, store.path.with_name(store.path.name + "-wal")):
        assert PASSWORD.encode() not in part.read_bytes()
    acct = store.get_account("dave")
    assert isinstance(acct, Account) and acct.scram is not None


def test_domain_hold_lifetime(store: SQLiteStore, capsys: pytest.CaptureFixture[str],
                              pwfile: Path) -> None:
    assert run(store, capsys, "account", "add", "alice", "--password-file", str(pwfile))[0] == 0
    code, _, _ = run(store, capsys, "domain", "add", "a.example", "--account", "alice",
                     "--hold-lifetime", "60d")
    assert code == 0
    d = store.get_domain("a.example")
    assert d is not None and d.hold_lifetime == 60 * 86400
    assert run(store, capsys, "domain", "add", "b.example", "--account", "alice",
               "--hold-lifetime", "90m")[0] == 0
    code, out, _ = run(store, capsys, "domain", "list")
    assert [line.split()[-2] for line in out.splitlines()[1:]] == ["60d", "90m"]
    for bad in ("soon", "0", "-1d"):
        assert run(store, capsys, "domain", "add", "c.example", "--account", "alice",
                   f"--hold-lifetime={bad}")[0] == 64


def test_domain_etrn_options(store: SQLiteStore, capsys: pytest.CaptureFixture[str],
                             pwfile: Path) -> None:
    assert run(store, capsys, "account", "add", "alice", "--password-file", str(pwfile))[0] == 0
    code, out, _ = run(store, capsys, "domain", "add", "a.example", "--account", "alice",
                       "--etrn-host", "Mail.A.Example:2525")
    assert code == 0 and "(ETRN: mail.a.example:2525)" in out
    assert run(store, capsys, "domain", "add", "b.example", "--account", "alice",
               "--etrn-mx")[0] == 0
    assert run(store, capsys, "domain", "add", "c.example", "--account", "alice")[0] == 0
    assert [(d.name, d.etrn) for d in store.list_domains()] == [
        ("a.example", "mail.a.example:2525"), ("b.example", ""), ("c.example", None)]
    code, out, _ = run(store, capsys, "domain", "list")
    assert [line.split()[-1] for line in out.splitlines()[1:]] == [
        "mail.a.example:2525", "mx", "-"]
    assert run(store, capsys, "domain", "set", "c.example", "--etrn-host", "[::1]:26")[0] == 0
    assert run(store, capsys, "domain", "set", "a.example", "--no-etrn")[0] == 0
    code, out, _ = run(store, capsys, "domain", "set", "b.example", "--etrn-host", "192.0.2.9")
    assert code == 0 and out.strip() == "domain b.example: ETRN 192.0.2.9"
    assert [(d.name, d.etrn) for d in store.list_domains()] == [
        ("a.example", None), ("b.example", "192.0.2.9"), ("c.example", "[::1]:26")]
    for bad in ("", "host:0", "host:70000", "::1", "[::1", "bad_host", "h:x", "-h.example"):
        assert run(store, capsys, "domain", "set", "b.example", f"--etrn-host={bad}")[0] == 64
    assert run(store, capsys, "domain", "set", "nowhere.example", "--etrn-mx")[0] == 65
    with pytest.raises(SystemExit):  # one of the options is required, and only one
        run(store, capsys, "domain", "set", "b.example")
    with pytest.raises(SystemExit):
        run(store, capsys, "domain", "set", "b.example", "--etrn-mx", "--no-etrn")
    assert store.get_domain("b.example") == Domain("b.example", "alice", etrn="192.0.2.9")


def test_account_atrn_wait(store: SQLiteStore, capsys: pytest.CaptureFixture[str],
                           pwfile: Path) -> None:
    code, _, _ = run(store, capsys, "account", "add", "acme", "--domain", "acme.example",
                     "--password-file", str(pwfile), "--atrn-wait", "5m")
    assert code == 0
    account = store.get_account("acme")
    assert account is not None and account.atrn_wait == 300.0
    code, out, _ = run(store, capsys, "account", "list")
    assert out.splitlines()[1].split()[-1] == "5m"
    code, out, _ = run(store, capsys, "account", "set", "acme", "--atrn-wait", "90")
    assert (code, out) == (0, "account acme: an ATRN without mail waits up to 90s for it\n")
    account = store.get_account("acme")
    assert account is not None and account.atrn_wait == 90.0
    assert account.scram is not None  # nothing else changed
    code, out, _ = run(store, capsys, "account", "set", "acme", "--no-atrn-wait")
    assert (code, out) == (0, "account acme: an ATRN without mail gets 453 at once\n")
    account = store.get_account("acme")
    assert account is not None and account.atrn_wait is None
    for value, message in (("10m", "at most 9m"), ("0", "longer than 0"),
                           ("soon", "expected a duration")):
        code, _, err = run(store, capsys, "account", "set", "acme", "--atrn-wait", value)
        assert code == 64 and message in err, err
    code, _, err = run(store, capsys, "account", "set", "nobody", "--atrn-wait", "1m")
    assert code == 65 and "no account 'nobody'" in err
    code, _, err = run(store, capsys, "account", "add", "b", "--password-file", str(pwfile),
                       "--atrn-wait", "1h")
    assert code == 64 and store.get_account("b") is None
