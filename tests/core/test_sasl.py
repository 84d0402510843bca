"""SASL mechanisms, both sides, in memory (no sockets)."""

from __future__ import annotations

import base64
import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fermoposta.mail.auth import StoreCredentials
from fermoposta.smtp.sasl import (
    Challenge,
    ClientMechanism,
    CramMD5Client,
    CramMD5Server,
    ExternalClient,
    ExternalServer,
    Failure,
    LoginServer,
    PlainClient,
    Result,
    SASLClientError,
    ScramSha256Client,
    ScramSha256Server,
    ServerMechanism,
    Success,
    certificate_fingerprint,
    client_mechanism,
    make_scram_secret,
    server_mechanism,
    verify_password,
)
from fermoposta.store import SQLiteStore
from fermoposta.store.base import Account, StoreError

ALICE_FP = certificate_fingerprint(b"alice-cert-der")
DAVE_SUBJECT = "CN=dave@example.org,O=Example Ltd,C=IT"
PASSWORDS = {
    "alice": "correct horse",
    "bob": "pässwörd\u00a0x",
    "carol": "carol-pw",
    "dave": "dave-pw",
}


def _account(
    name: str, *, cram: bool = True, fps: tuple[str, ...] = (), subjects: tuple[str, ...] = ()
) -> Account:
    pw = PASSWORDS[name]
    return Account(
        name=name,
        scram=make_scram_secret(pw, iterations=4096),
        cram_secret=pw if cram else None,
        cert_fingerprints=fps,
        cert_subjects=subjects,
    )


ACCOUNTS = {
    "alice": _account("alice", fps=(ALICE_FP,)),
    "bob": _account("bob"),
    "carol": _account("carol", cram=False),
    "dave": _account("dave", subjects=(DAVE_SUBJECT,)),
}


class Creds:
    def __init__(self, accounts: dict[str, Account] | None = None, broken: bool = False):
        self.accounts = ACCOUNTS if accounts is None else accounts
        self.broken = broken

    def account(self, username: str) -> Account | None:
        if self.broken:
            raise StoreError("disk on fire")
        return self.accounts.get(username)

    def account_for_certificate(self, fingerprint: str, subject: str | None) -> Account | None:
        if self.broken:
            raise StoreError("disk on fire")
        for acc in self.accounts.values():
            if fingerprint in acc.cert_fingerprints:
                return acc
        for acc in self.accounts.values():
            if subject and subject in acc.cert_subjects:
                return acc
        return None


CREDS = Creds()
MECHS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")


def make_server(
    name: str, creds: Creds = CREDS, fp: str | None = ALICE_FP, subject: str | None = None
) -> ServerMechanism:
    mech = server_mechanism(
        name,
        credentials=creds,
        hostname="mx.example.net",
        client_cert_fingerprint=fp,
        client_cert_subject=subject,
    )
    assert mech is not None
    return mech


def run(client: ClientMechanism, server: ServerMechanism, *, use_initial: bool = True) -> Result:
    """Drive an exchange like the SMTP layer does (incl. the SCRAM final 334)."""
    initial = client.initial_response() if use_initial else None
    result = server.start(initial)
    for _ in range(10):
        if not isinstance(result, Challenge):
            break
        result = server.step(client.respond(result.data))
    if isinstance(result, Success):
        if result.server_final is not None:
            assert client.respond(result.server_final) == b""
        client.verify_final(None)
    return result


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("user", ["alice", "bob"])
@pytest.mark.parametrize("use_initial", [True, False])
def test_round_trip_success(mech: str, user: str, use_initial: bool) -> None:
    client = client_mechanism(mech, username=user, password=PASSWORDS[user])
    result = run(client, make_server(mech), use_initial=use_initial)
    assert result == Success(user, result.server_final if mech == "SCRAM-SHA-256" else None)
    if mech == "SCRAM-SHA-256":
        assert result.server_final is not None and result.server_final.startswith(b"v=")


@pytest.mark.parametrize("mech", MECHS)
def test_wrong_password_and_unknown_user_look_alike(mech: str) -> None:
    wrong = run(client_mechanism(mech, username="alice", password="nope"), make_server(mech))
    unknown = run(client_mechanism(mech, username="mallory", password="x"), make_server(mech))
    assert isinstance(wrong, Failure) and isinstance(unknown, Failure)
    assert not wrong.temporary and not unknown.temporary
    assert "nope" not in wrong.reason


@pytest.mark.parametrize("mech", MECHS)
def test_store_error_is_temporary(mech: str) -> None:
    client = client_mechanism(mech, username="alice", password=PASSWORDS["alice"])
    result = run(client, make_server(mech, Creds(broken=True)))
    assert isinstance(result, Failure) and result.temporary


def test_factory() -> None:
    scram = server_mechanism(
        "scram-sha-256", credentials=CREDS, hostname="h", client_cert_fingerprint=None
    )
    assert isinstance(scram, ScramSha256Server)
    assert (
        server_mechanism("GSSAPI", credentials=CREDS, hostname="h", client_cert_fingerprint=None)
        is None
    )
    assert isinstance(client_mechanism("plain", username="a", password="b"), PlainClient)
    with pytest.raises(ValueError):
        client_mechanism("NTLM", username="a", password="b")


def test_calls_after_end_fail() -> None:
    server = make_server("PLAIN")
    assert isinstance(server.start(b"\0alice\0" + PASSWORDS["alice"].encode()), Success)
    assert isinstance(server.step(b"\0alice\0" + PASSWORDS["alice"].encode()), Failure)
    assert isinstance(server.start(None), Failure)


# --- PLAIN / LOGIN -----------------------------------------------------------------------


def test_verify_password_matches_scramp_saslprep() -> None:
    import scramp

    salt, stored, server, _ = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        "I\u00adX", iteration_count=4096
    )
    secret = make_scram_secret("IX", salt=salt)
    assert (secret.stored_key, secret.server_key) == (stored, server)
    assert verify_password(secret, "I\u00adX")  # soft hyphen mapped to nothing
    assert verify_password(secret, "IX")
    assert not verify_password(secret, "IY")
    assert not verify_password(secret, "\u0007")  # prohibited by SASLprep


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"alice",
        b"\0alice",
        b"\0alice\0",
        b"\0\0correct horse",
        b"\0alice\0correct horse\0",
        b"\0al\xffice\0correct horse",
        b"\0alice\0correct hors\xff",
    ],
)
def test_plain_malformed(message: bytes) -> None:
    assert isinstance(make_server("PLAIN").start(message), Failure)


def test_plain_authzid() -> None:
    ok = b"alice\0alice\0correct horse"
    assert make_server("PLAIN").start(ok) == Success("alice")
    foreign = b"bob\0alice\0correct horse"
    assert isinstance(make_server("PLAIN").start(foreign), Failure)
    client = PlainClient("alice", "correct horse", authzid="bob")
    assert isinstance(run(client, make_server("PLAIN")), Failure)


def test_plain_empty_challenge_first() -> None:
    server = make_server("PLAIN")
    assert server.start(None) == Challenge(b"")
    assert server.step(b"\0alice\0correct horse") == Success("alice")


def test_login_challenges_and_initial_username() -> None:
    server = LoginServer(CREDS)
    assert server.start(None) == Challenge(b"Username:")
    assert server.step(b"alice") == Challenge(b"Password:")
    assert server.step(b"correct horse") == Success("alice")
    server = LoginServer(CREDS)
    assert server.start(b"alice") == Challenge(b"Password:")
    assert isinstance(server.step(b""), Failure)


# --- CRAM-MD5 ----------------------------------------------------------------------------

RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_RESPONSE = b"tim b913a602c7eda7a495b4e6e7334d3890"


def test_cram_md5_rfc2195_vector() -> None:
    tim = Account(name="tim", scram=None, cram_secret="tanstaaftanstaaf")
    server = CramMD5Server(
        Creds({"tim": tim}),
        "postoffice.reston.mci.net",
        random=lambda: 1896,
        clock=lambda: 697170952.4,
    )
    assert server.start(None) == Challenge(RFC2195_CHALLENGE)
    assert server.step(RFC2195_RESPONSE) == Success("tim")
    assert CramMD5Client("tim", "tanstaaftanstaaf").respond(RFC2195_CHALLENGE) == RFC2195_RESPONSE


def test_cram_md5_challenges_are_fresh() -> None:
    a, b = CramMD5Server(CREDS, "h"), CramMD5Server(CREDS, "h")
    assert a.start(None) != b.start(None)


def test_cram_md5_refuses_initial_response_and_missing_secret() -> None:
    assert not CramMD5Server.initial_response_allowed
    assert isinstance(make_server("CRAM-MD5").start(b"alice"), Failure)
    result = run(CramMD5Client("carol", PASSWORDS["carol"]), make_server("CRAM-MD5"))
    assert isinstance(result, Failure) and not result.temporary


@pytest.mark.parametrize(
    "response", [b"", b"alice", b" " + b"0" * 32, b"alice " + b"g" * 32, b"alice 1234"]
)
def test_cram_md5_malformed(response: bytes) -> None:
    server = make_server("CRAM-MD5")
    server.start(None)
    assert isinstance(server.step(response), Failure)


@pytest.mark.parametrize(
    "challenge", [b"", b"hello", b"<no-at-sign>", b"<a b@c>", b"<1.2@h>\r\n", b"<\xff@h>"]
)
def test_cram_md5_client_rejects_bad_challenge(challenge: bytes) -> None:
    with pytest.raises(SASLClientError):
        CramMD5Client("tim", "x").respond(challenge)


# --- SCRAM-SHA-256 -----------------------------------------------------------------------

# RFC 7677 §3
R7677_CNONCE = "rOprNGfwEbeRWgbNEkqO"
R7677_SNONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
R7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
R7677 = [
    b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
]


def _rfc7677_creds() -> Creds:
    user = Account("user", make_scram_secret("pencil", salt=R7677_SALT), None)
    return Creds({"user": user})


def test_scram_rfc7677_vector_server() -> None:
    server = ScramSha256Server(_rfc7677_creds(), server_nonce=R7677_SNONCE)
    assert server.start(R7677[0]) == Challenge(R7677[1])
    assert server.step(R7677[2]) == Success("user", R7677[3])


def test_scram_rfc7677_vector_client() -> None:
    client = ScramSha256Client("user", "pencil", client_nonce=R7677_CNONCE)
    assert client.initial_response() == R7677[0]
    assert client.respond(R7677[1]) == R7677[2]
    client.verify_final(R7677[3])  # 235 with additional data form
    client.verify_final(None)


def test_scram_client_rejects_tampered_server_signature() -> None:
    client = ScramSha256Client("user", "pencil", client_nonce=R7677_CNONCE)
    client.initial_response()
    client.respond(R7677[1])
    with pytest.raises(SASLClientError):
        client.respond(b"v=" + base64.b64encode(b"\0" * 32))


def test_scram_client_requires_server_final() -> None:
    client = ScramSha256Client("user", "pencil", client_nonce=R7677_CNONCE)
    client.initial_response()
    client.respond(R7677[1])
    with pytest.raises(SASLClientError):
        client.verify_final(None)


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someoneelsesnonce,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # does not extend ours
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # does not extend it
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1024",  # too few rounds
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999",  # DoS
        b"e=other-error",
        b"garbage",
        b"\xff\xfe",
    ],
)
def test_scram_client_rejects_bad_server_first(server_first: bytes) -> None:
    client = ScramSha256Client("user", "pencil", client_nonce=R7677_CNONCE)
    client.initial_response()
    with pytest.raises(SASLClientError):
        client.respond(server_first)


def test_scram_server_rejects_tampered_proof() -> None:
    server = ScramSha256Server(_rfc7677_creds(), server_nonce=R7677_SNONCE)
    server.start(R7677[0])
    bad = R7677[2].replace(b"p=dHzb", b"p=eHzb")
    assert isinstance(server.step(bad), Failure)


@pytest.mark.parametrize(
    "first",
    [
        b"p=tls-server-end-point,,n=user,r=abc",
        b"p=tls-exporter,,n=user,r=abc",
        b"n,a=user,n=user,r=abc",
        b"x,,n=user,r=abc",
        b"n,,n=,r=abc",
        b"n,,r=abc",
    ],
)
def test_scram_server_rejects_bad_client_first(first: bytes) -> None:
    assert isinstance(ScramSha256Server(CREDS).start(first), Failure)


def test_scram_y_flag_accepted() -> None:
    server = ScramSha256Server(_rfc7677_creds(), server_nonce=R7677_SNONCE)
    result = server.start(b"y" + R7677[0][1:])
    assert isinstance(result, Challenge)
    # the client proof covers c=base64("y,,"), so the RFC proof no longer matches
    assert isinstance(server.step(R7677[2]), Failure)


def test_scram_unknown_user_same_flow_and_stable_salt() -> None:
    def first_challenge(user: str) -> bytes:
        server = ScramSha256Server(CREDS, server_nonce="s" * 24)
        result = server.start(f"n,,n={user},r=abcdef".encode())
        assert isinstance(result, Challenge)
        return result.data

    fake = first_challenge("mallory")
    assert fake.startswith(b"r=abcdef" + b"s" * 24 + b",s=") and fake.endswith(b",i=4096")
    assert fake == first_challenge("mallory")  # the fake salt does not vary between tries
    assert fake != first_challenge("trudy")
    client = ScramSha256Client("mallory", "x")
    result = run(client, make_server("SCRAM-SHA-256"))
    assert isinstance(result, Failure) and not result.temporary


def test_scram_account_without_verifier() -> None:
    creds = Creds({"alice": replace(ACCOUNTS["alice"], scram=None)})
    client = ScramSha256Client("alice", PASSWORDS["alice"])
    assert isinstance(run(client, make_server("SCRAM-SHA-256", creds)), Failure)
    client2 = PlainClient("alice", PASSWORDS["alice"])
    assert isinstance(run(client2, make_server("PLAIN", creds)), Failure)


# --- EXTERNAL ----------------------------------------------------------------------------


def test_external() -> None:
    assert run(ExternalClient(), make_server("EXTERNAL")) == Success("alice")
    assert run(ExternalClient(), make_server("EXTERNAL"), use_initial=False) == Success("alice")
    assert run(ExternalClient("alice"), make_server("EXTERNAL")) == Success("alice")
    assert isinstance(run(ExternalClient("bob"), make_server("EXTERNAL")), Failure)
    assert isinstance(run(ExternalClient(), make_server("EXTERNAL", fp=None)), Failure)
    other = certificate_fingerprint(b"unknown")
    assert isinstance(run(ExternalClient(), make_server("EXTERNAL", fp=other)), Failure)
    upper = ExternalServer(CREDS, ALICE_FP.upper())
    assert upper.start(b"") == Success("alice")
    broken = run(ExternalClient(), make_server("EXTERNAL", Creds(broken=True)))
    assert isinstance(broken, Failure) and broken.temporary


def test_external_by_subject() -> None:
    other_fp = certificate_fingerprint(b"renewed dave certificate")
    by_subject = make_server("EXTERNAL", fp=other_fp, subject=DAVE_SUBJECT)
    assert run(ExternalClient(), by_subject) == Success("dave")
    as_dave = make_server("EXTERNAL", fp=other_fp, subject=DAVE_SUBJECT)
    assert run(ExternalClient("dave"), as_dave) == Success("dave")
    as_alice = make_server("EXTERNAL", fp=other_fp, subject=DAVE_SUBJECT)
    assert isinstance(run(ExternalClient("alice"), as_alice), Failure)
    # A fingerprint binding wins over a subject binding.
    both = make_server("EXTERNAL", fp=ALICE_FP, subject=DAVE_SUBJECT)
    assert run(ExternalClient(), both) == Success("alice")
    # Another subject, a subject differing only in case of a value, no subject.
    for subject in ("CN=mallory@example.org,O=Example Ltd,C=IT", DAVE_SUBJECT.upper(), "", None):
        result = run(ExternalClient(), make_server("EXTERNAL", fp=other_fp, subject=subject))
        assert isinstance(result, Failure) and not result.temporary
        assert other_fp in result.reason
    # No verified certificate: a subject alone is not enough.
    no_cert = make_server("EXTERNAL", fp=None, subject=DAVE_SUBJECT)
    assert isinstance(run(ExternalClient(), no_cert), Failure)
    broken = make_server("EXTERNAL", Creds(broken=True), fp=other_fp, subject=DAVE_SUBJECT)
    result = run(ExternalClient(), broken)
    assert isinstance(result, Failure) and result.temporary
    assert ExternalServer(CREDS, other_fp.upper(), DAVE_SUBJECT).start(b"") == Success("dave")


def test_store_credentials_fingerprint_then_subject(tmp_path: Path) -> None:
    """The provider's CredentialSource on a real store: fingerprint first, then subject."""
    with SQLiteStore(tmp_path / "store.sqlite3") as store:
        store.add_account(Account("alice", None, None, (ALICE_FP,)))
        store.add_account(Account("dave", None, None, cert_subjects=(DAVE_SUBJECT,)))
        creds = StoreCredentials(store)
        other_fp = certificate_fingerprint(b"renewed")

        def who(fp: str, subject: str | None) -> str | None:
            account = creds.account_for_certificate(fp, subject)
            return None if account is None else account.name

        assert who(ALICE_FP, DAVE_SUBJECT) == "alice"
        assert who(ALICE_FP, None) == "alice"
        assert who(other_fp, DAVE_SUBJECT) == "dave"
        assert who(other_fp, "CN=someone else") is None
        assert who(other_fp, None) is None
        assert who(other_fp, "") is None
        server = ExternalServer(creds, other_fp, DAVE_SUBJECT)
        assert run(ExternalClient(), server) == Success("dave")


def test_certificate_fingerprint() -> None:
    assert certificate_fingerprint(b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


# --- client odds and ends ----------------------------------------------------------------


def test_one_shot_clients_reject_extra_challenges() -> None:
    for client in (PlainClient("a", "b"), ExternalClient()):
        client.initial_response()
        with pytest.raises(SASLClientError):
            client.respond(b"")
    with pytest.raises(SASLClientError):
        PlainClient("a", "b").respond(b"surprise")
    login = client_mechanism("LOGIN", username="a", password="b")
    assert login.initial_response() is None
    assert login.respond(b"Username:") == b"a"
    assert login.respond(b"Password:") == b"b"
    with pytest.raises(SASLClientError):
        login.respond(b"Again:")


# --- fuzzing -----------------------------------------------------------------------------

ALL_SERVERS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "EXTERNAL")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ALL_SERVERS),
    initial=st.none() | st.binary(max_size=200),
    steps=st.lists(st.binary(max_size=200), max_size=4),
    with_fp=st.booleans(),
)
def test_servers_never_raise(
    name: str, initial: bytes | None, steps: list[bytes], with_fp: bool
) -> None:
    server = make_server(name, fp=ALICE_FP if with_fp else None)
    result = server.start(initial)
    for data in steps:
        assert isinstance(result, Challenge | Failure | Success)
        if name != "EXTERNAL":
            assert not isinstance(result, Success)
        result = server.step(data)
    assert isinstance(result, Challenge | Failure | Success)


@settings(max_examples=40, deadline=None)
@given(
    prefix=st.sampled_from([b"n,,", b"y,,", b"n,,n=alice,r=", b"p=", b""]),
    tail=st.binary(max_size=120),
    final=st.binary(max_size=200),
)
def test_scram_server_fuzz_structured(prefix: bytes, tail: bytes, final: bytes) -> None:
    server = ScramSha256Server(CREDS)
    result = server.start(prefix + tail)
    assert isinstance(result, Challenge | Failure)
    result = server.step(final)
    assert isinstance(result, Failure)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=200))
def test_scram_client_fuzz(challenge: bytes) -> None:
    client = ScramSha256Client("user", "pencil", client_nonce=R7677_CNONCE)
    client.initial_response()
    with contextlib.suppress(SASLClientError):
        client.respond(challenge)
