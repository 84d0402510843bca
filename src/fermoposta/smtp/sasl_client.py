"""SASL client mechanisms for SMTP AUTH (RFC 4954), sans-I/O.

Contract:
- A `ClientMechanism` is single-use and works on raw bytes; the SMTP layer
  does the base64 coding.  `initial_response()` returns the bytes to send
  with "AUTH <mech> <b64>" ("=" for b""), or None if the mechanism is
  server-first (LOGIN, CRAM-MD5).  Calling it is optional: a client that
  does not send an initial response answers the server's first (empty)
  challenge with `respond(b"")` instead.
- `respond(challenge)` answers each "334" challenge; a malformed, forged
  or unexpected challenge raises `SASLClientError` (the caller then sends
  "*" to cancel and closes).
- `verify_final(server_final)` is called once after 235, with any
  additional data that came with the success (None if none).  SCRAM insists
  on mutual authentication: it raises `SASLClientError` unless the server
  signature was verified, either in a last "334 <v=...>" challenge (answered
  by `respond` with b"", RFC 4954 §4) or in `server_final`.  Other
  mechanisms do nothing.
- SCRAM-SHA-256 (via scramp) rejects server nonces that do not extend the
  client nonce, iteration counts < 4096 (and > 10,000,000) and bad server
  signatures.  Secrets never appear in exception messages.
This module does no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from typing import ClassVar

import scramp


class SASLClientError(Exception):
    """The server's challenge is malformed, unexpected or forged."""


class ClientMechanism(ABC):
    name: ClassVar[str]

    def initial_response(self) -> bytes | None:
        return None

    @abstractmethod
    def respond(self, challenge: bytes) -> bytes: ...

    def verify_final(self, server_final: bytes | None) -> None:  # noqa: B027
        """Mutual authentication check after 235; no-op unless overridden."""


class _OneShotClient(ClientMechanism):
    """Client-first mechanisms that send one message (PLAIN, EXTERNAL)."""

    def __init__(self) -> None:
        self._sent = False

    @abstractmethod
    def _message(self) -> bytes: ...

    def initial_response(self) -> bytes:
        self._sent = True
        return self._message()

    def respond(self, challenge: bytes) -> bytes:
        if challenge or self._sent:
            raise SASLClientError(f"unexpected {self.name} challenge")
        self._sent = True
        return self._message()


class PlainClient(_OneShotClient):
    name = "PLAIN"

    def __init__(self, user: str, password: str, authzid: str = "") -> None:
        super().__init__()
        self._msg = b"\x00".join(s.encode("utf-8") for s in (authzid, user, password))

    def _message(self) -> bytes:
        return self._msg


class ExternalClient(_OneShotClient):
    name = "EXTERNAL"

    def __init__(self, authzid: str = "") -> None:
        super().__init__()
        self._authzid = authzid.encode("utf-8")

    def _message(self) -> bytes:
        return self._authzid


class LoginClient(ClientMechanism):
    """Answers the first challenge with the user name, the second with the password."""

    name = "LOGIN"

    def __init__(self, user: str, password: str) -> None:
        self._answers = [user.encode("utf-8"), password.encode("utf-8")]

    def respond(self, challenge: bytes) -> bytes:
        if not self._answers:
            raise SASLClientError("unexpected third LOGIN challenge")
        return self._answers.pop(0)


def _valid_cram_challenge(challenge: bytes) -> bool:
    # RFC 2195 / RFC 822 msg-id shape: "<" local "@" domain ">", printable ASCII.
    return (
        len(challenge) >= 5
        and challenge.startswith(b"<")
        and challenge.endswith(b">")
        and b"@" in challenge[1:-1]
        and all(0x21 <= c <= 0x7E for c in challenge)
    )


class CramMD5Client(ClientMechanism):
    name = "CRAM-MD5"

    def __init__(self, user: str, password: str) -> None:
        self._user = user
        self._password = password
        self._answered = False

    def respond(self, challenge: bytes) -> bytes:
        if self._answered:
            raise SASLClientError("unexpected second CRAM-MD5 challenge")
        if not _valid_cram_challenge(challenge):
            raise SASLClientError("malformed CRAM-MD5 challenge")
        self._answered = True
        digest = hmac.new(self._password.encode("utf-8"), challenge, hashlib.md5).hexdigest()
        return f"{self._user} {digest}".encode()


class ScramSha256Client(ClientMechanism):
    """RFC 5802 / RFC 7677 SCRAM-SHA-256 without channel binding (gs2 "n,,")."""

    name = "SCRAM-SHA-256"

    def __init__(self, user: str, password: str, *, client_nonce: str | None = None) -> None:
        try:
            self._client = scramp.ScramClient(
                ["SCRAM-SHA-256"], user, password, c_nonce=client_nonce
            )
        except scramp.ScramException as exc:
            # scramp messages never contain the password
            raise SASLClientError(f"SCRAM setup failed: {exc}") from None
        self._first_sent = False
        self._verified: bytes | None = None

    def initial_response(self) -> bytes:
        if self._first_sent:
            raise SASLClientError("client-first already sent")
        self._first_sent = True
        first: str = self._client.get_client_first()
        return first.encode("utf-8")

    def respond(self, challenge: bytes) -> bytes:
        if not self._first_sent:
            if challenge:
                raise SASLClientError("SCRAM server spoke first with data")
            return self.initial_response()
        if self._verified is not None:
            raise SASLClientError("unexpected SCRAM challenge after server-final")
        try:
            text = challenge.decode("utf-8")
        except UnicodeDecodeError:
            raise SASLClientError("SCRAM challenge is not UTF-8") from None
        if self._client.stage == 1:  # client-first sent: this is server-first
            try:
                self._client.set_server_first(text)
                final: str = self._client.get_client_final()
            except Exception as exc:
                raise SASLClientError(f"bad SCRAM server-first: {exc}") from None
            return final.encode("utf-8")
        self._check_server_final(challenge)
        return b""

    def _check_server_final(self, server_final: bytes) -> None:
        if self._client.stage != 3:
            raise SASLClientError("SCRAM server-final out of sequence")
        try:
            self._client.set_server_final(server_final.decode("utf-8"))
        except Exception as exc:
            raise SASLClientError(f"SCRAM server authentication failed: {exc}") from None
        self._verified = server_final

    def verify_final(self, server_final: bytes | None) -> None:
        if self._verified is not None:
            if server_final is not None and server_final != self._verified:
                raise SASLClientError("conflicting SCRAM server-final")
            return
        if server_final is None:
            raise SASLClientError("server did not prove knowledge of the verifier")
        self._check_server_final(server_final)


def client_mechanism(
    name: str, *, username: str, password: str, authzid: str = ""
) -> ClientMechanism:
    """A fresh client mechanism for `name` (case-insensitive); ValueError if unknown."""
    match name.upper():
        case "PLAIN":
            return PlainClient(username, password, authzid)
        case "LOGIN":
            return LoginClient(username, password)
        case "CRAM-MD5":
            return CramMD5Client(username, password)
        case "SCRAM-SHA-256":
            return ScramSha256Client(username, password)
        case "EXTERNAL":
            return ExternalClient(authzid)
    raise ValueError(f"unsupported SASL mechanism: {name!r}")
