"""ATRN domain list (RFC 2645 §5.2.1) and its formatting; research doc §5 G item 63."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fermoposta.smtp.atrn import MAX_ATRN_DOMAINS, format_atrn, parse_atrn_domains
from fermoposta.smtp.command import parse_command
from fermoposta.smtp.reply import SMTPError


def atrn_arg(line: bytes) -> str:
    cmd = parse_command(line)
    assert cmd.verb == "ATRN"
    return cmd.arg


@pytest.mark.parametrize(
    ("line", "domains"),
    [
        (b"ATRN\r\n", ()),
        (b"ATRN \r\n", ()),
        (b"ATRN a.org\r\n", ("a.org",)),
        (b"ATRN a.org,b.org\r\n", ("a.org", "b.org")),
        (b"ATRN a.org, b.org\r\n", ("a.org", "b.org")),
        (b"ATRN a.org ,\tb.org\r\n", ("a.org", "b.org")),
        (b"ATRN A.ORG\r\n", ("a.org",)),
        (b"ATRN a.org.\r\n", ("a.org",)),
        (b"ATRN  a.org\r\n", ("a.org",)),
        (b"ATRN\ta.org\r\n", ("a.org",)),
        (b"ATRN a.org,A.org,a.org.\r\n", ("a.org",)),
        (b"ATRN b.org,a.org,b.org\r\n", ("b.org", "a.org")),
        (b"ATRN xn--bcher-kva.de\r\n", ("xn--bcher-kva.de",)),
        (b"ATRN XN--BCHER-KVA.DE\r\n", ("xn--bcher-kva.de",)),
        (b"ATRN 1.2.3.example\r\n", ("1.2.3.example",)),
        (b"ATRN a-b.c-d.org\r\n", ("a-b.c-d.org",)),
        (b"ATRN ab--cd.org\r\n", ("ab--cd.org",)),  # LDH per the ABNF; only xn-- is checked
    ],
)
def test_accepted(line: bytes, domains: tuple[str, ...]) -> None:
    assert parse_atrn_domains(atrn_arg(line)) == domains


def test_idn_u_label_equals_a_label() -> None:
    # The command line itself is ASCII-only unless SMTPUTF8; the parser accepts both forms.
    assert parse_atrn_domains("bücher.de") == parse_atrn_domains("xn--bcher-kva.de")
    assert parse_atrn_domains("Bücher.de,xn--bcher-kva.de") == ("xn--bcher-kva.de",)


@pytest.mark.parametrize(
    "arg",
    [
        "a.org,,b.org",
        ",a.org",
        "a.org,",
        ",",
        "localhost",
        "org.",
        "[10.0.0.1]",
        "[IPv6:::1]",
        "-a.org",
        "a-.org",
        "a.-org",
        "a_b.org",
        "*.a.org",
        "a.*",
        "a .org",
        "a.org b.org",
        "a..org",
        ".a.org",
        "a.org..",
        "xn--zz.de",  # invalid A-label
        "a@b.org",
        "a.org;b.org",
        "a.org\x00",
    ],
)
def test_rejected(arg: str) -> None:
    with pytest.raises(SMTPError) as exc:
        parse_atrn_domains(arg)
    assert (exc.value.reply.code, exc.value.reply.enhanced) == (501, "5.5.4")


def test_label_and_name_lengths() -> None:
    assert parse_atrn_domains("a" * 63 + ".org") == ("a" * 63 + ".org",)
    with pytest.raises(SMTPError):
        parse_atrn_domains("a" * 64 + ".org")
    name_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name_253) == 253
    assert parse_atrn_domains(name_253) == (name_253,)
    assert parse_atrn_domains(name_253 + ".") == (name_253,)
    with pytest.raises(SMTPError):
        parse_atrn_domains(name_253 + "b")
    with pytest.raises(SMTPError):
        parse_atrn_domains(".".join(["a" * 50] * 6))  # 305 octets


def test_domain_count_limit() -> None:
    at_limit = ",".join(f"d{i}.org" for i in range(MAX_ATRN_DOMAINS))
    assert len(parse_atrn_domains(at_limit)) == MAX_ATRN_DOMAINS
    # duplicates do not count towards the limit
    assert len(parse_atrn_domains(at_limit + ",d0.org,D1.ORG")) == MAX_ATRN_DOMAINS
    with pytest.raises(SMTPError):
        parse_atrn_domains(at_limit + ",extra.org")
    with pytest.raises(SMTPError):
        parse_atrn_domains(",".join(f"d{i}.org" for i in range(1000)))
    assert parse_atrn_domains("a.org,b.org", max_domains=2) == ("a.org", "b.org")
    with pytest.raises(SMTPError):
        parse_atrn_domains("a.org,b.org,c.org", max_domains=2)


def test_format_atrn() -> None:
    assert format_atrn([]) == b"ATRN\r\n"
    assert format_atrn(["a.org", "b.org"]) == b"ATRN a.org,b.org\r\n"
    assert format_atrn(["A.org.", "bücher.de", "a.org"]) == b"ATRN a.org,xn--bcher-kva.de\r\n"
    with pytest.raises(ValueError):
        format_atrn(["localhost"])
    with pytest.raises(TypeError):
        format_atrn("a.org")


label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True).filter(
    lambda s: not (len(s) >= 4 and s[2:4] == "--")
)
domain = st.lists(label, min_size=2, max_size=4).map(".".join)


@settings(max_examples=200)
@given(st.lists(domain, max_size=8))
def test_format_parse_round_trip(domains: list[str]) -> None:
    line = format_atrn(domains)
    assert line.endswith(b"\r\n") and b" " not in line[5:]
    parsed = parse_atrn_domains(atrn_arg(line))
    assert parsed == tuple(dict.fromkeys(d.lower() for d in domains))
    spaced = ", ".join(domains)  # the lenient form some clients send
    assert parse_atrn_domains(spaced) == parsed


@settings(max_examples=500)
@given(st.text(max_size=60))
def test_arbitrary_text_only_smtperror(arg: str) -> None:
    try:
        result = parse_atrn_domains(arg)
    except SMTPError as exc:
        assert exc.reply.code == 501
        return
    for name in result:
        assert name.isascii() and name == name.lower() and "." in name
        assert parse_atrn_domains(name) == (name,)
