"""Certificate subjects as RFC 4514 strings (certificate_subject, normalize_subject).

`cryptography` (a dependency of trustme, test-only) builds the certificates
and gives an independent RFC 4514 rendering to compare with; `openssl`
(when installed) gives the string an operator would copy.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st

from fermoposta.smtp.sasl import certificate_subject, normalize_subject
from fermoposta.smtp.x509name import der_subject, format_subject, parse_subject

_KEY = ec.generate_private_key(ec.SECP256R1())
# Our keywords for the types outside RFC 4514's table (cryptography prints OIDs).
_OVERRIDES = {
    NameOID.EMAIL_ADDRESS: "EMAILADDRESS",
    NameOID.SERIAL_NUMBER: "SERIALNUMBER",
    NameOID.SURNAME: "SN",
    NameOID.GIVEN_NAME: "GN",
    NameOID.TITLE: "TITLE",
}


def make_cert(name: x509.Name) -> bytes:
    """A self-signed DER certificate with subject `name`."""
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def name(*pairs: tuple[ObjectIdentifier, str]) -> x509.Name:
    """RDNs given most general first (the DER order), one attribute each."""
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def test_order_and_plain_values() -> None:
    der = make_cert(
        name(
            (NameOID.COUNTRY_NAME, "IT"),
            (NameOID.ORGANIZATION_NAME, "Example Ltd"),
            (NameOID.COMMON_NAME, "customer@example.org"),
        )
    )
    assert certificate_subject(der) == "CN=customer@example.org,O=Example Ltd,C=IT"


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("a,b", "a\\,b"),
        ("a+b", "a\\+b"),
        ('say "hi"', 'say \\"hi\\"'),
        ("back\\slash", "back\\\\slash"),
        ("semi;colon", "semi\\;colon"),
        ("<angle>", "\\<angle\\>"),
        ("#hash", "\\#hash"),
        ("mid#hash", "mid#hash"),
        (" lead", "\\ lead"),
        ("trail ", "trail\\ "),
        ("in side", "in side"),
        ("eq=ual", "eq=ual"),
        ("città", "città"),
        ("nul\x00byte", "nul\\00byte"),
        ("line\nbreak", "line\\0Abreak"),
        ("nb\u00a0sp", "nb\\C2\\A0sp"),
    ],
)
def test_escaping(value: str, escaped: str) -> None:
    der = make_cert(name((NameOID.ORGANIZATION_NAME, value), (NameOID.COMMON_NAME, "x")))
    subject = certificate_subject(der)
    assert subject == f"CN=x,O={escaped}"
    assert normalize_subject(subject) == subject  # what we print reads back the same
    if value.isprintable():  # cryptography escapes only RFC 4514's specials
        rendered = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        assert subject == rendered


def test_same_as_cryptography_for_many_types() -> None:
    subject = name(
        (NameOID.DOMAIN_COMPONENT, "org"),
        (NameOID.DOMAIN_COMPONENT, "example"),
        (NameOID.COUNTRY_NAME, "IT"),
        (NameOID.STATE_OR_PROVINCE_NAME, "Lazio"),
        (NameOID.LOCALITY_NAME, "Roma"),
        (NameOID.STREET_ADDRESS, "Via Appia, 1"),
        (NameOID.ORGANIZATION_NAME, "Example+Co <Ltd>"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Mail; Relay"),
        (NameOID.USER_ID, "cust01"),
        (NameOID.SERIAL_NUMBER, "0042"),
        (NameOID.SURNAME, "Rossi"),
        (NameOID.GIVEN_NAME, "Anna"),
        (NameOID.TITLE, "Admin"),
        (NameOID.EMAIL_ADDRESS, "anna@example.org"),
        (NameOID.COMMON_NAME, "Anna Rossi"),
    )
    der = make_cert(subject)
    expected = x509.load_der_x509_certificate(der).subject.rfc4514_string(_OVERRIDES)
    assert certificate_subject(der) == expected
    assert expected.startswith("CN=Anna Rossi,EMAILADDRESS=anna@example.org,")
    assert expected.endswith(",DC=example,DC=org")


def test_string_types_do_not_matter() -> None:
    """A renewal may re-encode a value (PrintableString -> UTF8String -> BMPString)."""
    rendered = set()
    for kind in (_ASN1Type.PrintableString, _ASN1Type.UTF8String, _ASN1Type.BMPString,
                 _ASN1Type.IA5String, _ASN1Type.UniversalString):
        attr = x509.NameAttribute(NameOID.COMMON_NAME, "customer", _type=kind)
        rendered.add(certificate_subject(make_cert(x509.Name([attr]))))
    assert rendered == {"CN=customer"}
    bmp = x509.NameAttribute(NameOID.COMMON_NAME, "città ☃", _type=_ASN1Type.BMPString)
    assert certificate_subject(make_cert(x509.Name([bmp]))) == "CN=città ☃"


def test_unknown_type_is_hex_and_multivalued_rdn_is_sorted() -> None:
    unknown = ObjectIdentifier("1.3.6.1.4.1.99999.1")
    rdn = x509.RelativeDistinguishedName(
        [
            x509.NameAttribute(NameOID.USER_ID, "cust01"),
            x509.NameAttribute(NameOID.COMMON_NAME, "customer"),
        ]
    )
    subject = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(unknown, "ab")]),
            rdn,
        ]
    )
    # 0C 02 61 62: a UTF8String "ab".
    expected = "CN=customer+UID=cust01,1.3.6.1.4.1.99999.1=#0C026162"
    assert certificate_subject(make_cert(subject)) == expected
    typed = "uid=cust01 + cn=customer, OID.1.3.6.1.4.1.99999.1 = #0c026162"
    assert normalize_subject(typed) == expected


def test_empty_subject() -> None:
    assert certificate_subject(make_cert(x509.Name([]))) == ""


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("CN=customer,O=Example Ltd,C=IT", "CN=customer,O=Example Ltd,C=IT"),
        (" cn = customer ,  o =Example Ltd , c= IT ", "CN=customer,O=Example Ltd,C=IT"),
        ("commonName=Customer;organizationName=Example", "CN=Customer,O=Example"),
        ("emailAddress=a@x.org,E=b@x.org", "EMAILADDRESS=a@x.org,EMAILADDRESS=b@x.org"),
        ("2.5.4.3=customer,oid.2.5.4.10=Example", "CN=customer,O=Example"),
        ('CN="Rossi, Anna",O="Say \\"hi\\""', 'CN=Rossi\\, Anna,O=Say \\"hi\\"'),
        ("CN=\\C3\\A9t\\C3\\A9,O=\\#1\\ ", "CN=été,O=\\#1\\ "),
        ("CN=#0C03666F6F", "CN=foo"),  # a string value given as BER hex
        ("CN=#020101", "CN=#020101"),  # not a string: stays hex
        ("CN=a\\=b,O=x<y>z", "CN=a=b,O=x\\<y\\>z"),
        ("CN=", "CN="),
        ("CN=  spaced   inside  ", "CN=spaced   inside"),
    ],
)
def test_normalize_subject(typed: str, canonical: str) -> None:
    assert normalize_subject(typed) == canonical
    assert normalize_subject(canonical) == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "customer",
        "CN=a,",
        "CN=a,,O=b",
        "CN=a+b",
        "XYZZY=a",
        "/C=IT/CN=x",
        "subject=CN=x",
        "1.2.3.4=text",  # a type without a known string form needs #hex
        "CN=#ABC",
        "CN=#",
        "CN=#0C0361",  # truncated BER
        "CN=bad\\q",
        "CN=\\FF",  # not UTF-8
        'CN="open',
        'CN="a"b',
    ],
)
def test_normalize_subject_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_subject(bad)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_openssl_rfc2253_output_matches(tmp_path: Path) -> None:
    """What `openssl x509 -noout -subject -nameopt RFC2253` prints normalizes to ours."""
    der = make_cert(
        name(
            (NameOID.COUNTRY_NAME, "IT"),
            (NameOID.ORGANIZATION_NAME, "Example, Ltd + Co"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "#relay "),
            (NameOID.EMAIL_ADDRESS, "customer@example.org"),
            (NameOID.COMMON_NAME, "Città \"Nuova\""),
        )
    )
    path = tmp_path / "cert.der"
    path.write_bytes(der)
    out = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(path), "-noout", "-subject",
         "-nameopt", "RFC2253"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert out.startswith("subject=")
    assert normalize_subject(out.removeprefix("subject=")) == certificate_subject(der)


def test_malformed_der() -> None:
    der = make_cert(name((NameOID.COMMON_NAME, "x")))
    for bad in (b"", b"\x30", b"\x02\x01\x00", der[:40], der[:-1], b"\x30\x80" + der[2:]):
        with pytest.raises(ValueError):
            certificate_subject(bad)


_SAMPLE = make_cert(name((NameOID.ORGANIZATION_NAME, "Ex"), (NameOID.COMMON_NAME, "x")))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(0, 400), flip=st.integers(0, 255))
def test_der_parser_only_raises_value_error(data: bytes, cut: int, flip: int) -> None:
    base = bytearray(_SAMPLE[: max(cut, 1)] + data)
    base[cut % len(base)] ^= flip
    for der in (data, bytes(base)):
        with contextlib.suppress(ValueError):
            assert isinstance(certificate_subject(der), str)

_VALUES = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12
)
_TYPES = st.sampled_from(["CN", "O", "OU", "C", "L", "ST", "DC", "UID", "EMAILADDRESS"])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.tuples(_TYPES, _VALUES), min_size=1, max_size=3), min_size=1,
                max_size=4))
def test_format_then_parse_round_trips(rdns: list[list[tuple[str, str]]]) -> None:
    structure = tuple(tuple(rdn) for rdn in rdns)
    text = format_subject(structure)
    assert normalize_subject(text) == text
    assert format_subject(parse_subject(text)) == text


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME,
                                           NameOID.ORGANIZATIONAL_UNIT_NAME]),
                          st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                                  max_size=10)),
                min_size=1, max_size=4))
def test_certificate_subject_reads_back(pairs: list[tuple[ObjectIdentifier, str]]) -> None:
    der = make_cert(name(*pairs))
    subject = certificate_subject(der)
    assert normalize_subject(subject) == subject
    assert len(der_subject(der)) == len(pairs)
