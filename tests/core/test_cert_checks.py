"""Certificate dates (issue 11, item 7): `config check` and `provider run`
refuse an expired or not yet valid `[tls] cert` (exit 78) and warn, exit 0,
when it expires within 21 days; `ops.certs` counts the days."""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

import pytest

from conftest import Certs, write_config
from fermoposta.cli import EX_CONFIG, main
from fermoposta.config import ConfigError, load_provider_config
from fermoposta.ops import certs as certdates

UTC = datetime.UTC


def issue(certs: Certs, directory: Path, *, not_before: datetime.datetime | None = None,
          not_after: datetime.datetime | None = None) -> Path:
    """A provider config whose [tls] cert has the given dates (signed by the test CA)."""
    now = datetime.datetime.now(UTC)
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1",
                               not_before=not_before or now - datetime.timedelta(days=1),
                               not_after=not_after or now + datetime.timedelta(days=365))
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    path = write_config(directory, None)
    path.write_text(path.read_text() + f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    return path


def days(n: float) -> datetime.datetime:
    return datetime.datetime.now(UTC) + datetime.timedelta(days=n)


def test_config_check_fails_on_an_expired_certificate(
        certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = issue(certs, tmp_path, not_before=days(-30), not_after=days(-2))
    assert main(["-c", str(path), "config", "check"]) == EX_CONFIG == 78
    err = capsys.readouterr().err
    assert "provider.toml: [tls] cert: the certificate expired on " in err
    assert "(notAfter)" in err
    expired = days(-2).strftime("%Y-%m-%d")
    assert expired in err


def test_config_check_fails_on_a_certificate_not_yet_valid(
        certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = issue(certs, tmp_path, not_before=days(3), not_after=days(300))
    assert main(["-c", str(path), "config", "check"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "[tls] cert: the certificate is not valid before " in err
    assert days(3).strftime("%Y-%m-%d") in err


def test_config_check_warns_when_it_expires_within_21_days(
        certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = issue(certs, tmp_path, not_after=days(10))
    assert main(["-c", str(path), "config", "check"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: ")
    assert err.startswith(f"fermoposta: warning: {path}: [tls] cert: expires on "
                          f"{days(10).strftime('%Y-%m-%d')}")
    assert err.rstrip().endswith("in 10 days")


def test_config_check_is_quiet_about_a_certificate_with_time_left(
        certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = issue(certs, tmp_path, not_after=days(22))
    assert main(["-c", str(path), "config", "check"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: ") and err == ""


def test_provider_run_refuses_an_expired_certificate(
        certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = issue(certs, tmp_path, not_before=days(-30), not_after=days(-1))
    assert main(["-c", str(path), "provider", "run"]) == EX_CONFIG
    assert "[tls] cert: the certificate expired on " in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_load_passes_the_warning_to_the_caller_or_keeps_it(certs: Certs, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    path = issue(certs, tmp_path, not_after=days(5))
    seen: list[str] = []
    load_provider_config(path, warn=seen.append)
    assert len(seen) == 1 and "[tls] cert: expires on " in seen[0] and "in 5 days" in seen[0]
    load_provider_config(path, warn=None)
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match=r"\[tls\] cert: the certificate expired"):
        load_provider_config(issue(certs, tmp_path / "old", not_after=days(-1),
                                   not_before=days(-9)), warn=None)


def test_a_cert_file_without_a_certificate_is_an_error(certs: Certs, tmp_path: Path) -> None:
    path = issue(certs, tmp_path)
    # The key alone in the cert file: the key check or the date check refuses it.
    (tmp_path / "cert.pem").write_bytes((tmp_path / "key.pem").read_bytes())
    with pytest.raises(ConfigError, match=r"\[tls\] (cert|key): "):
        load_provider_config(path, warn=None)


def test_validity_arithmetic() -> None:
    start = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    end = datetime.datetime(2030, 3, 1, 12, tzinfo=UTC)
    v = certdates.Validity(start, end)
    t = end.timestamp()
    assert v.not_after_timestamp == t
    assert v.problem(start.timestamp() - 1) == \
        "the certificate is not valid before 2030-01-01 00:00:00 UTC (notBefore)"
    assert v.problem(start.timestamp()) is None
    assert v.problem(t - 1) is None
    assert v.problem(t) == "the certificate expired on 2030-03-01 12:00:00 UTC (notAfter)"
    day = 86400
    assert v.expiry_warning(t - 21 * day) is None  # 21 days left: not yet
    assert v.expiry_warning(t - 21 * day + 1) == \
        "expires on 2030-03-01 12:00:00 UTC, in 21 days"
    assert v.expiry_warning(t - 9.5 * day) == "expires on 2030-03-01 12:00:00 UTC, in 10 days"
    assert v.expiry_warning(t - 60) == "expires on 2030-03-01 12:00:00 UTC, in 1 day"
    assert v.expiry_warning(t) is None  # expired: a problem, not a warning
    assert v.days_left(t - 9.5 * day) == 10


def test_validity_of_der_matches_the_file(certs: Certs) -> None:
    import ssl

    der = ssl.PEM_cert_to_DER_cert(certs.cert_file.read_text())
    assert certdates.validity_of_der(der) == certdates.validity_of_file(certs.cert_file)
    with pytest.raises(ValueError):
        certdates.validity_of_der(b"not a certificate")


# --- the parser: asn1crypto, checked against cryptography (test-only, via trustme) ---------

def _der_of(pem_bytes: bytes) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(pem_bytes.decode())


@pytest.mark.parametrize(("not_before", "not_after"), [
    # UTCTime (RFC 5280 §4.1.2.5.1: through 2049), its last second, then GeneralizedTime.
    (datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
     datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)),
    (datetime.datetime(2026, 2, 28, 12, 30, 5, tzinfo=UTC),
     datetime.datetime(2050, 1, 1, 0, 0, 0, tzinfo=UTC)),
    # "No well-defined expiration date" (RFC 5280 §4.1.2.5).
    (datetime.datetime(2020, 1, 1, tzinfo=UTC),
     datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
])
def test_dates_are_those_cryptography_reads(certs: Certs, tmp_path: Path,
                                            not_before: datetime.datetime,
                                            not_after: datetime.datetime) -> None:
    from cryptography import x509 as oracle

    leaf = certs.ca.issue_cert("localhost", not_before=not_before, not_after=not_after)
    pem_bytes = leaf.cert_chain_pems[0].bytes()
    expected = oracle.load_pem_x509_certificate(pem_bytes)
    path = tmp_path / "cert.pem"
    path.write_bytes(pem_bytes)
    got = certdates.validity_of_file(path)
    assert got == certdates.validity_of_der(_der_of(pem_bytes))
    assert got.not_before == expected.not_valid_before_utc == not_before
    assert got.not_after == expected.not_valid_after_utc == not_after
    assert got.not_after.tzinfo is not None and got.not_after.utcoffset() == datetime.timedelta(0)


def test_the_file_gives_its_first_certificate(certs: Certs, tmp_path: Path) -> None:
    """The leaf of "leaf first, full chain", past text, a key and other blocks."""
    leaf = certs.ca.issue_cert("localhost", not_after=days(40))
    path = tmp_path / "chain.pem"
    path.write_bytes(b"Bag Attributes: text that openssl writes\n"
                     + leaf.private_key_pem.bytes()
                     + leaf.cert_chain_pems[0].bytes()
                     + certs.ca.cert_pem.bytes())
    got = certdates.validity_of_file(path)
    assert got.not_after == certdates.validity_of_der(_der_of(leaf.cert_chain_pems[0].bytes())
                                                      ).not_after
    assert abs(got.not_after.timestamp() - days(40).timestamp()) < 5
    assert got.not_after != certdates.validity_of_der(_der_of(certs.ca.cert_pem.bytes())
                                                      ).not_after
    # A file edited on Windows: CRLF line ends.
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert certdates.validity_of_file(path) == got


def _unreadable(certs: Certs, kind: str) -> bytes:
    der = _der_of(certs.cert_file.read_bytes())
    pem_text = certs.cert_file.read_bytes()
    first_block = pem_text[: pem_text.index(b"-----END CERTIFICATE-----") + 25] + b"\n"
    begin, end = b"-----BEGIN CERTIFICATE-----\n", b"\n-----END CERTIFICATE-----\n"
    return {
        "empty": b"",
        "key alone": certs.key_file.read_bytes(),
        "DER, not PEM": der,
        "text": b"hello\n",
        "no END line": first_block.replace(b"-----END CERTIFICATE-----", b""),
        "not base64": begin + b"!!!!" + end,
        "a cut certificate": begin + base64.encodebytes(der[:200]) + end,
        "a certificate with bytes after it": begin + base64.encodebytes(der + b"\0") + end,
    }[kind]


@pytest.mark.parametrize("kind", ["empty", "key alone", "DER, not PEM", "text", "no END line",
                                  "not base64", "a cut certificate",
                                  "a certificate with bytes after it"])
def test_a_file_with_no_readable_certificate_is_a_value_error(certs: Certs, tmp_path: Path,
                                                              kind: str) -> None:
    path = tmp_path / "cert.pem"
    path.write_bytes(_unreadable(certs, kind))
    with pytest.raises(ValueError):
        certdates.validity_of_file(path)


def test_an_unreadable_cert_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        certdates.validity_of_file(tmp_path / "missing.pem")


def test_a_date_datetime_cannot_hold_is_a_value_error(certs: Certs) -> None:
    """GeneralizedTime year 0000: asn1crypto gives its own type, not a datetime."""
    from asn1crypto import util, x509

    cert = x509.Certificate.load(_der_of(certs.cert_file.read_bytes()))
    tbs = cert["tbs_certificate"]
    tbs["validity"] = x509.Validity({
        "not_before": x509.Time(name="general_time",
                                value=util.extended_datetime(0, 1, 1, tzinfo=UTC)),
        "not_after": tbs["validity"]["not_after"],
    })
    with pytest.raises(ValueError, match="out of range"):
        certdates.validity_of_der(cert.dump(force=True))


def test_damaged_der_gives_its_dates_or_a_value_error(certs: Certs) -> None:
    """Whatever bytes of a certificate are changed or cut, the parser answers
    with dates or ValueError, never another exception (hypothesis)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    der = _der_of(certs.cert_file.read_bytes())

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, len(der) - 1), st.integers(0, 255)), max_size=4),
           st.integers(0, len(der)))
    def check(changes: list[tuple[int, int]], length: int) -> None:
        damaged = bytearray(der)
        for at, value in changes:
            damaged[at] = value
        try:
            validity = certdates.validity_of_der(bytes(damaged[:length]))
        except ValueError:
            return
        assert isinstance(validity.not_before, datetime.datetime)
        assert isinstance(validity.not_after, datetime.datetime)

    check()
