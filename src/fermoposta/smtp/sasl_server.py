"""SASL server mechanisms for SMTP AUTH (RFC 4954), sans-I/O.

Contract:
- A `ServerMechanism` is a single-use state machine fed raw, already
  base64-decoded bytes.  The SMTP layer does the base64 coding, "*"
  cancellation (501), line limits and the mapping of results to replies:
  `Challenge` -> "334 <b64 data>"; `Success` -> 235 (when `server_final` is
  set it is first sent as a last "334 <b64>" challenge and 235 follows the
  client's empty line, RFC 4954 §4); `Failure` -> 535 5.7.8, or 454 4.7.0
  when `temporary` (the credential source raised `CredentialsUnavailable`).
- `start(initial)` gets the decoded initial response (`None` when absent,
  `b""` for "=").  `step(response)` gets each further client response.
  After a `Success` or `Failure` the exchange is over: any further call
  returns `Failure`.
- No input ever raises: malformed, hostile or truncated data gives `Failure`.
  A wrong user and a wrong password give the same `Failure` shape and the
  same message flow (PLAIN/LOGIN/CRAM-MD5 spend a comparable amount of work
  on unknown users; SCRAM answers an unknown user with a fake verifier and
  fails only at the proof).  `Failure.reason` is for the log; it never
  contains a secret.
- Usernames are SASLprep-ed (as scramp does for SCRAM) before the lookup, so
  every mechanism asks the `CredentialSource` for the same name.  The
  identity returned in `Success` is the `Credential.name` as stored.
- Passwords are verified against the SCRAM-SHA-256 verifier (`ScramSecret`);
  no plaintext password is stored.  CRAM-MD5 needs `Credential.cram_secret`
  (a password equivalent); accounts without one fail CRAM-MD5.
- SCRAM-SHA-256 without channel binding: gs2 headers "n,," and "y,," are
  accepted; "p=..." (we do not offer -PLUS) and a gs2 authzid are refused.
- EXTERNAL needs the SHA-256 fingerprint of a client certificate that the
  TLS layer already verified, and its subject (`certificate_subject`) when
  known; the identity is the account bound to the fingerprint or, failing
  that, to the subject (`CredentialSource.account_for_certificate`).
This module does no I/O beyond calling the `CredentialSource`, and imports
nothing outside `smtp/` (accounts come through `smtp.credentials`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import scramp
from scramp.utils import saslprep

from fermoposta.smtp import x509name
from fermoposta.smtp.credentials import Credential, CredentialsUnavailable, ScramSecret

DEFAULT_ITERATIONS = 4096
SALT_LENGTH = 16

# Names we implement, strongest first (the order to advertise in EHLO).
SERVER_MECHANISMS: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5", "EXTERNAL")
# Mechanisms that send the password in the clear (RFC 4954 §4: TLS only by default).
PLAINTEXT_MECHANISMS: frozenset[str] = frozenset({"PLAIN", "LOGIN"})

# Per-process key deriving fake SCRAM salts for unknown users (stable within a run).
_FAKE_KEY = secrets.token_bytes(32)


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Success:
    identity: str
    server_final: bytes | None = None


@dataclass(frozen=True)
class Failure:
    reason: str
    temporary: bool = False


Result = Challenge | Success | Failure


class CredentialSource(Protocol):
    def account(self, username: str) -> Credential | None: ...

    def account_for_certificate(self, fingerprint: str, subject: str | None) -> Credential | None:
        """The account bound to the certificate's fingerprint, else to its subject.

        `fingerprint` is lowercase hex SHA-256; `subject` is the canonical
        RFC 4514 string of `certificate_subject` (None or "" when unknown).
        A fingerprint binding wins over a subject binding."""
        ...


# --- helpers -------------------------------------------------------------------------------


def _salted_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(StoredKey, ServerKey) for `password`; raises ValueError if SASLprep refuses it."""
    try:
        prepared: str = saslprep(password)
    except scramp.ScramException as exc:
        raise ValueError("password refused by SASLprep") from exc
    salted = hashlib.pbkdf2_hmac("sha256", prepared.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest(), server_key


def make_scram_secret(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> ScramSecret:
    """A SCRAM-SHA-256 verifier for `password` (SASLprep-ed like scramp does).

    Raises ValueError for a password SASLprep refuses or iterations < 4096.
    """
    if iterations < DEFAULT_ITERATIONS:
        raise ValueError(f"iterations must be >= {DEFAULT_ITERATIONS}")
    if salt is None:
        salt = secrets.token_bytes(SALT_LENGTH)
    stored_key, server_key = _salted_keys(password, salt, iterations)
    return ScramSecret(
        salt=salt, iterations=iterations, stored_key=stored_key, server_key=server_key
    )


def verify_password(secret: ScramSecret, password: str) -> bool:
    """True if `password` matches the verifier (constant-time compare)."""
    try:
        stored_key, _ = _salted_keys(password, secret.salt, secret.iterations)
    except ValueError:
        return False
    return hmac.compare_digest(stored_key, secret.stored_key)


def certificate_fingerprint(der: bytes) -> str:
    """Lowercase hex SHA-256 of a DER certificate (the form accounts store)."""
    return hashlib.sha256(der).hexdigest()


def certificate_subject(der: bytes) -> str:
    """The subject of a DER certificate as a canonical RFC 4514 string.

    Most specific RDN first ("CN=customer,O=Example Ltd,C=IT"), values escaped
    per RFC 4514; the same form `normalize_subject` gives to what an operator
    types, so the two compare equal.  Computed from the DER with a small
    parser (see `fermoposta.smtp.x509name`): no X.509 library is needed.
    Raises ValueError if `der` is not a certificate.
    """
    return x509name.certificate_subject(der)


def normalize_subject(text: str) -> str:
    """An operator's RFC 4514 subject in the form `certificate_subject` gives.

    Spaces around "=", "," and "+" are dropped, attribute types uppercased
    (long names and OIDs mapped to keywords), values keep their case and are
    re-escaped.  Raises ValueError if `text` is not a distinguished name.
    """
    return x509name.normalize_subject(text)


def _prep_username(raw: bytes) -> str | None:
    try:
        name: str = saslprep(raw.decode("utf-8"))
    except (UnicodeDecodeError, scramp.ScramException):
        return None
    return name or None


# A verifier nobody can match, so unknown users cost the same PBKDF2 as known ones.
_DUMMY_SECRET = ScramSecret(
    salt=b"\x00" * SALT_LENGTH,
    iterations=DEFAULT_ITERATIONS,
    stored_key=b"\x00" * 32,
    server_key=b"\x00" * 32,
)


# --- mechanisms ----------------------------------------------------------------------------


class ServerMechanism(ABC):
    name: ClassVar[str]
    # False for server-first mechanisms (CRAM-MD5): an initial response is a
    # protocol error the SMTP layer may answer with 501 before calling start.
    initial_response_allowed: ClassVar[bool] = True

    def __init__(self) -> None:
        self._done = False

    def start(self, initial: bytes | None) -> Result:
        if self._done:
            return Failure("exchange already finished")
        return self._finish(self._start(initial))

    def step(self, response: bytes) -> Result:
        if self._done:
            return Failure("exchange already finished")
        return self._finish(self._step(response))

    def _finish(self, result: Result) -> Result:
        if not isinstance(result, Challenge):
            self._done = True
        return result

    @abstractmethod
    def _start(self, initial: bytes | None) -> Result: ...

    @abstractmethod
    def _step(self, response: bytes) -> Result: ...


class _PasswordMechanism(ServerMechanism):
    def __init__(self, credentials: CredentialSource) -> None:
        super().__init__()
        self._credentials = credentials

    def _check(self, raw_user: bytes, raw_password: bytes, authzid: bytes = b"") -> Result:
        username = _prep_username(raw_user)
        try:
            password = raw_password.decode("utf-8")
        except UnicodeDecodeError:
            password = ""
        if username is None or not password:
            verify_password(_DUMMY_SECRET, "x")
            return Failure("malformed username or password")
        try:
            account = self._credentials.account(username)
        except CredentialsUnavailable as exc:
            return Failure(f"credential store error: {type(exc).__name__}", temporary=True)
        if account is None or account.scram is None:
            verify_password(_DUMMY_SECRET, password)
            why = "unknown user" if account is None else "account has no password verifier"
            return Failure(f"{why}: {username!r}")
        if not verify_password(account.scram, password):
            return Failure(f"wrong password for {account.name!r}")
        if authzid:
            wanted = _prep_username(authzid)
            if wanted not in (username, account.name):
                return Failure(f"{account.name!r} may not act as another identity")
        return Success(account.name)


class PlainServer(_PasswordMechanism):
    """RFC 4616: message = [authzid] NUL authcid NUL passwd."""

    name = "PLAIN"

    def _start(self, initial: bytes | None) -> Result:
        if initial is None:
            return Challenge(b"")
        return self._step(initial)

    def _step(self, response: bytes) -> Result:
        parts = response.split(b"\x00")
        if len(parts) != 3:
            verify_password(_DUMMY_SECRET, "x")
            return Failure("malformed PLAIN message")
        authzid, authcid, passwd = parts
        return self._check(authcid, passwd, authzid)


class LoginServer(_PasswordMechanism):
    """The non-standard LOGIN mechanism (draft-murchison-sasl-login)."""

    name = "LOGIN"

    def __init__(self, credentials: CredentialSource) -> None:
        super().__init__(credentials)
        self._user: bytes | None = None

    def _start(self, initial: bytes | None) -> Result:
        if initial is None:
            return Challenge(b"Username:")
        return self._step(initial)

    def _step(self, response: bytes) -> Result:
        if self._user is None:
            self._user = response
            return Challenge(b"Password:")
        return self._check(self._user, response)


class CramMD5Server(ServerMechanism):
    """RFC 2195: challenge "<random.timestamp@hostname>", response "user hexdigest"."""

    name = "CRAM-MD5"
    initial_response_allowed = False

    def __init__(
        self,
        credentials: CredentialSource,
        hostname: str,
        *,
        random: Callable[[], int] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__()
        self._credentials = credentials
        rnd = random() if random is not None else secrets.randbits(63)
        now = clock() if clock is not None else time.time()
        self.challenge = f"<{rnd}.{int(now)}@{hostname}>".encode("ascii", "replace")

    def _start(self, initial: bytes | None) -> Result:
        if initial is not None:
            return Failure("CRAM-MD5 does not take an initial response")
        return Challenge(self.challenge)

    def _step(self, response: bytes) -> Result:
        user_raw, sep, digest_raw = response.rpartition(b" ")
        username = _prep_username(user_raw) if sep else None
        digest = digest_raw.lower()
        if (
            username is None
            or len(digest) != 32
            or not all(c in b"0123456789abcdef" for c in digest)
        ):
            return Failure("malformed CRAM-MD5 response")
        try:
            account = self._credentials.account(username)
        except CredentialsUnavailable as exc:
            return Failure(f"credential store error: {type(exc).__name__}", temporary=True)
        key = b"\x00" * 16
        if account is not None and account.cram_secret is not None:
            key = account.cram_secret.encode("utf-8")
        expected = hmac.new(key, self.challenge, hashlib.md5).hexdigest().encode("ascii")
        matches = hmac.compare_digest(expected, digest)
        if account is None:
            return Failure(f"unknown user: {username!r}")
        if account.cram_secret is None:
            return Failure(f"no CRAM-MD5 secret for {account.name!r}")
        if not matches:
            return Failure(f"wrong CRAM-MD5 digest for {account.name!r}")
        return Success(account.name)


class ScramSha256Server(ServerMechanism):
    """RFC 5802 / RFC 7677 SCRAM-SHA-256 (no channel binding), via scramp."""

    name = "SCRAM-SHA-256"

    def __init__(self, credentials: CredentialSource, *, server_nonce: str | None = None) -> None:
        super().__init__()
        self._credentials = credentials
        self._account: Credential | None = None
        self._why_fake: str | None = None
        self._username: str | None = None  # as the client-first named it, for the log
        self._store_failed = False
        self._server = scramp.ScramMechanism("SCRAM-SHA-256").make_server(
            auth_fn=self._auth_fn, s_nonce=server_nonce
        )

    def _auth_fn(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        self._username = username
        try:
            account = self._credentials.account(username)
        except CredentialsUnavailable:
            self._store_failed = True
            raise
        if account is None or account.scram is None:
            self._why_fake = "unknown user" if account is None else "account has no verifier"
            self._why_fake += f": {username!r}"
            salt = hmac.new(_FAKE_KEY, username.encode("utf-8"), hashlib.sha256).digest()
            return (
                salt[:SALT_LENGTH],
                secrets.token_bytes(32),
                secrets.token_bytes(32),
                DEFAULT_ITERATIONS,
            )
        self._account = account
        s = account.scram
        return s.salt, s.stored_key, s.server_key, s.iterations

    def _start(self, initial: bytes | None) -> Result:
        if initial is None:
            return Challenge(b"")  # client-first comes in the response
        if not initial:
            return Failure("empty SCRAM client-first message")
        return self._step(initial)

    def _step(self, response: bytes) -> Result:
        stage = self._server.stage
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return Failure("SCRAM message is not UTF-8")
        if stage is None:
            return self._client_first(text)
        return self._client_final(text)

    def _client_first(self, text: str) -> Result:
        if text.startswith("p"):
            return Failure("SCRAM channel binding requested but not offered")
        if not (text.startswith("n,,") or text.startswith("y,,")):
            return Failure("SCRAM gs2 header not supported (authzid or malformed)")
        try:
            self._server.set_client_first(text)
            server_first: str = self._server.get_server_first()
        except Exception as exc:
            if self._store_failed:
                return Failure("credential store error", temporary=True)
            who = f" for {self._username!r}" if self._username is not None else ""
            return Failure(f"SCRAM client-first refused{who}: {_scram_reason(exc)}")
        return Challenge(server_first.encode("utf-8"))

    def _client_final(self, text: str) -> Result:
        try:
            self._server.set_client_final(text)
            server_final: str = self._server.get_server_final()
        except Exception as exc:
            if self._why_fake is not None:
                return Failure(self._why_fake)
            # Named like CRAM-MD5's "wrong CRAM-MD5 digest for 'acme'": the
            # operator greps the log for the account.
            reason = _scram_reason(exc)
            name = self._account.name if self._account is not None else self._username
            if reason == "invalid-proof" and name is not None:
                return Failure(f"wrong SCRAM-SHA-256 proof for {name!r}")
            who = f" for {name!r}" if name is not None else ""
            return Failure(f"SCRAM client-final refused{who}: {reason}")
        if self._account is None or self._why_fake is not None:
            return Failure(self._why_fake or "unknown user")
        return Success(self._account.name, server_final.encode("utf-8"))


def _scram_reason(exc: Exception) -> str:
    err = getattr(exc, "server_error", None)
    if err is not None:
        return str(err.value)
    return type(exc).__name__


class ExternalServer(ServerMechanism):
    """RFC 4422 Appendix A: identity from the verified TLS client certificate.

    `fingerprint` (SHA-256 hex) and `subject` (canonical RFC 4514) describe
    the certificate; the account is looked up by fingerprint, then subject."""

    name = "EXTERNAL"

    def __init__(
        self, credentials: CredentialSource, fingerprint: str | None, subject: str | None = None
    ) -> None:
        super().__init__()
        self._credentials = credentials
        self._fingerprint = fingerprint.lower() if fingerprint else None
        self._subject = subject or None

    def _start(self, initial: bytes | None) -> Result:
        if self._fingerprint is None:
            return Failure("EXTERNAL without a verified client certificate")
        if initial is None:
            return Challenge(b"")
        return self._step(initial)

    def _step(self, response: bytes) -> Result:
        if self._fingerprint is None:
            return Failure("EXTERNAL without a verified client certificate")
        wanted: str | None = None
        if response:
            wanted = _prep_username(response)
            if wanted is None:
                return Failure("malformed EXTERNAL authzid")
        try:
            account = self._credentials.account_for_certificate(self._fingerprint, self._subject)
        except CredentialsUnavailable as exc:
            return Failure(f"credential store error: {type(exc).__name__}", temporary=True)
        if account is None:
            return Failure(
                f"no account for certificate {self._fingerprint} (subject {self._subject!r})"
            )
        if wanted is not None and wanted != account.name:
            return Failure(f"certificate of {account.name!r} may not act as {wanted!r}")
        return Success(account.name)


def server_mechanism(
    name: str,
    *,
    credentials: CredentialSource,
    hostname: str,
    client_cert_fingerprint: str | None,
    client_cert_subject: str | None = None,
) -> ServerMechanism | None:
    """A fresh mechanism for `name` (case-insensitive); None if we do not implement it.

    `client_cert_fingerprint` and `client_cert_subject` describe the verified
    TLS client certificate (None without one); only EXTERNAL uses them."""
    match name.upper():
        case "PLAIN":
            return PlainServer(credentials)
        case "LOGIN":
            return LoginServer(credentials)
        case "CRAM-MD5":
            return CramMD5Server(credentials, hostname)
        case "SCRAM-SHA-256":
            return ScramSha256Server(credentials)
        case "EXTERNAL":
            return ExternalServer(credentials, client_cert_fingerprint, client_cert_subject)
    return None
