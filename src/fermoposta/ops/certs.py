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
- The dates are parsed with `asn1crypto` (the stdlib's `ssl` parses only a
  peer's certificate after verification, or a file with a private function).
  It is pure Python and already loaded for SCRAM (scramp needs it), where
  `cryptography` cost each provider and customer process 10 MiB of memory
  and 24 ms of start-up for two dates.  Only the certificate's outer
  structure and its validity are parsed: a certificate damaged elsewhere
  still gives its dates (the TLS layer, which loads it, refuses it).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import pem, x509

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


# PEM labels of an X.509 certificate (RFC 7468 §5.1; the second is the legacy one).
_CERTIFICATE_LABELS = ("CERTIFICATE", "X509 CERTIFICATE")


def validity_of_file(path: Path) -> Validity:
    """The leaf's dates from a PEM file: its first certificate block.
    ValueError if it holds none (a key alone, DER, text) or a broken one;
    OSError if it cannot be read."""
    data = path.read_bytes()
    try:
        for label, _headers, der in pem.unarmor(data, multiple=True):
            if label in _CERTIFICATE_LABELS:
                return validity_of_der(der)
    except ValueError as exc:
        raise ValueError(f"no readable PEM certificate: {exc}") from None
    raise ValueError("no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")


def validity_of_der(der: bytes) -> Validity:
    """The dates of one DER certificate (a TLS peer's).  ValueError if malformed."""
    try:
        validity = x509.Certificate.load(der, strict=True)["tbs_certificate"]["validity"]
        not_before, not_after = validity["not_before"].native, validity["not_after"].native
    except ValueError as exc:  # asn1crypto's error for every malformed structure
        raise ValueError(f"not a DER certificate: {exc}") from None
    # Year 0, which `datetime` cannot hold, comes back as asn1crypto's own type.
    if not (isinstance(not_before, datetime.datetime)
            and isinstance(not_after, datetime.datetime)):
        raise ValueError("a certificate date is out of range")
    return Validity(not_before.astimezone(datetime.UTC), not_after.astimezone(datetime.UTC))
