"""Customer failures and their exit codes (sysexits style, cron-friendly).

Contract: every way a customer session can fail is one `CustomerError`
subclass with a fixed `exit_code`; `fermoposta customer pull/check` exit with
it.  0 means the session worked, whether or not there was mail.

| code | class | when |
|---|---|---|
| 67 | ATRNRefused | 450: a domain is not ours, or ATRN too frequent |
| 68 | (`check` only, `pull.py`) | a local LMTP/SMTP delivery target is down or refuses LHLO/EHLO |
| 69 | ConnectFailure | provider unreachable, connection refused or dropped, 421/554 greeting |
| 73 | AlreadyRunning | another pull holds this pull's lock (`check`: a Maildir root |
|    |                | that cannot be written or created; `check` takes no lock) |
| 74 | TLSFailure | STARTTLS not offered, handshake or certificate (name, CA, pin) failure |
| 75 | TemporaryFailure | 451 and other 4xx (domain busy, store down), 454 AUTH |
| 76 | ProtocolFailure | no ATRN in EHLO, malformed replies, 501/502/5xx to ATRN |
| 77 | AuthFailure | credentials refused (535/534/538/530), no usable mechanism, |
|    |             | forged SCRAM server signature |
| 78 | ConfigFailure | the configuration cannot be used (file, password, certificate) |
"""

from __future__ import annotations


class CustomerError(Exception):
    exit_code = 70  # EX_SOFTWARE: should not be raised as such
    kind = "error"


class ATRNRefused(CustomerError):
    exit_code = 67
    kind = "refused"


class ConnectFailure(CustomerError):
    exit_code = 69
    kind = "connection"


class AlreadyRunning(CustomerError):
    exit_code = 73
    kind = "busy"


class TLSFailure(CustomerError):
    exit_code = 74
    kind = "tls"


class TemporaryFailure(CustomerError):
    exit_code = 75
    kind = "temporary"


class ProtocolFailure(CustomerError):
    exit_code = 76
    kind = "protocol"


class AuthFailure(CustomerError):
    exit_code = 77
    kind = "authentication"


class ConfigFailure(CustomerError):
    exit_code = 78
    kind = "configuration"
