"""Certificate validity dates (issue 11): what `config check`, the running
provider and `customer check` say about a certificate's lifetime.

Contract:
- `validity_of_file(path)` reads the first certificate of a PEM file (the
  leaf: `[tls] cert` is "leaf first, full chain") and `validity_of_der(der)`
  one DER certificate (what a TLS peer presented); both return a `Validity`
  (notBefore, notAfter, timezone-aware UTC) or raise `ValueError` when the
  data holds no parseable certificate.
- `Validity.problem(now)` is the reason a certificate must not be used (not
  yet valid, expired) or None; `Validity.expiry_warning(now)` is the warning
  text when it expires within `WARNING_DAYS`, or None.  `now` is Unix time,
  so callers (and tests) choose their clock.
- The dates are parsed with `cryptography` (the stdlib's `ssl` parses only a
  peer's certificate after verification, or a file with a private function).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = ["WARNING_DAYS", "Validity", "format_date", "validity_of_der", "validity_of_file"]

#: Warn this many days (or fewer) before notAfter: three weekly looks at a
#: dashboard, and time to get a certificate through a slow CA.
WARNING_DAYS = 21

_DAY = 86400.0


def format_date(when: datetime.datetime) -> str:
    """The form every message uses: ``2027-01-31 12:00:00 UTC``."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True, slots=True)
class Validity:
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def not_after_timestamp(self) -> float:
        """notAfter as Unix time (the metric's value)."""
        return self.not_after.timestamp()

    def days_left(self, now: float) -> int:
        """Days until notAfter, rounded up (1 on the last day; 0 or less once
        expired): a certificate issued for 10 days shows 10, not 9."""
        return math.ceil((self.not_after_timestamp - now) / _DAY)

    def problem(self, now: float) -> str | None:
        """Why the certificate must not be used now, or None."""
        if now >= self.not_after_timestamp:
            return f"the certificate expired on {format_date(self.not_after)} (notAfter)"
        if now < self.not_before.timestamp():
            return (f"the certificate is not valid before {format_date(self.not_before)} "
                    "(notBefore)")
        return None

    def expiry_warning(self, now: float, days: int = WARNING_DAYS) -> str | None:
        """``expires on DATE, in N days`` when notAfter is within `days`, else None
        (None too once expired: that is a `problem`, not a warning)."""
        remaining = self.not_after_timestamp - now
        if remaining <= 0 or remaining >= days * _DAY:
            return None
        left = self.days_left(now)
        return f"expires on {format_date(self.not_after)}, in {left} day{'s' * (left != 1)}"


def _validity(cert: x509.Certificate) -> Validity:
    return Validity(cert.not_valid_before_utc, cert.not_valid_after_utc)


def validity_of_file(path: Path) -> Validity:
    """The leaf's dates from a PEM file.  ValueError if it holds no certificate;
    OSError if it cannot be read."""
    data = path.read_bytes()
    certs = x509.load_pem_x509_certificates(data)  # ValueError when none
    return _validity(certs[0])


def validity_of_der(der: bytes) -> Validity:
    """The dates of one DER certificate (a TLS peer's).  ValueError if malformed."""
    return _validity(x509.load_der_x509_certificate(der))
