"""SASL for SMTP AUTH (RFC 4954), sans-I/O: one import point for both sides.

Contract: see `sasl_server` (mechanisms the provider runs, results
`Challenge`/`Success`/`Failure`, `CredentialSource`, `verify_password`,
`make_scram_secret`, `certificate_fingerprint`, `certificate_subject`,
`normalize_subject`) and `sasl_client` (mechanisms the customer and the tests
run, `SASLClientError`).  Both work on raw, already base64-decoded bytes;
neither does I/O.
"""

from __future__ import annotations

from fermoposta.smtp.sasl_client import (
    ClientMechanism,
    CramMD5Client,
    ExternalClient,
    LoginClient,
    PlainClient,
    SASLClientError,
    ScramSha256Client,
    client_mechanism,
)
from fermoposta.smtp.sasl_server import (
    DEFAULT_ITERATIONS,
    PLAINTEXT_MECHANISMS,
    SERVER_MECHANISMS,
    Challenge,
    CramMD5Server,
    CredentialSource,
    ExternalServer,
    Failure,
    LoginServer,
    PlainServer,
    Result,
    ScramSha256Server,
    ServerMechanism,
    Success,
    certificate_fingerprint,
    certificate_subject,
    make_scram_secret,
    normalize_subject,
    server_mechanism,
    verify_password,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "PLAINTEXT_MECHANISMS",
    "SERVER_MECHANISMS",
    "Challenge",
    "ClientMechanism",
    "CramMD5Client",
    "CramMD5Server",
    "CredentialSource",
    "ExternalClient",
    "ExternalServer",
    "Failure",
    "LoginClient",
    "LoginServer",
    "PlainClient",
    "PlainServer",
    "Result",
    "SASLClientError",
    "ScramSha256Client",
    "ScramSha256Server",
    "ServerMechanism",
    "Success",
    "certificate_fingerprint",
    "certificate_subject",
    "client_mechanism",
    "make_scram_secret",
    "normalize_subject",
    "server_mechanism",
    "verify_password",
]
