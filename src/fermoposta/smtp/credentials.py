"""What the SASL mechanisms need to know of an account, and nothing more (sans-I/O).

Contract:
- `ScramSecret` is a salted SCRAM-SHA-256 verifier (RFC 5802 §3), never a
  password.  `Credential` is the shape the mechanisms read: an account's
  `name`, its `scram` verifier and its CRAM-MD5 `cram_secret` (each may be
  None).  The store's `Account` has that shape; the mechanisms never see
  the store.
- `CredentialsUnavailable` is what a `CredentialSource` raises when it cannot
  answer now (its backing store is down): the mechanism fails *temporarily*
  (454 4.7.0, RFC 4954 §6), never as a wrong password.  The store's
  `StoreError` is one.
This module imports nothing of the package but itself: `smtp/` is the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Credential", "CredentialsUnavailable", "ScramSecret"]


class CredentialsUnavailable(Exception):
    """The credential source cannot answer now: a temporary failure."""


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """A salted SCRAM-SHA-256 verifier (RFC 5802 §3): never the password."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class Credential(Protocol):
    """An account as the SASL mechanisms see it."""

    @property
    def name(self) -> str: ...

    @property
    def scram(self) -> ScramSecret | None: ...

    @property
    def cram_secret(self) -> str | None: ...
