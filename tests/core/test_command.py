"""Command lines, MAIL/RCPT paths, ESMTP parameters, domains, xtext, EHLO argument."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fermoposta.smtp.command import (
    BAD_RECIPIENT,
    Command,
    Path,
    _full_path,
    _plain_path,
    normalize_domain,
    parse_command,
    parse_ehlo_arg,
    parse_mail_from,
    parse_rcpt_to,
    split_address,
    xtext_decode,
    xtext_encode,
)
from fermoposta.smtp.reply import SYNTAX_ERROR, SMTPError


def code_of(exc: pytest.ExceptionInfo[SMTPError]) -> tuple[int, str | None]:
    return exc.value.reply.code, exc.value.reply.enhanced


# --- parse_command ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "verb", "arg"),
    [
        (b"EHLO client.example\r\n", "EHLO", "client.example"),
        (b"ehlo client.example\n", "EHLO", "client.example"),
        (b"MaIl FROM:<A@B>  \r\n", "MAIL", "FROM:<A@B>"),
        (b"QUIT\r\n", "QUIT", ""),
        (b"ATRN\ta.org\r\n", "ATRN", "a.org"),
        (b"ATRN  a.org\r\n", "ATRN", "a.org"),
        (b"NOOP \t \r\n", "NOOP", ""),
        (b"RSET", "RSET", ""),
        (b"A" * 20 + b"\r\n", "A" * 20, ""),
    ],
)
def test_parse_command_ok(line: bytes, verb: str, arg: str) -> None:
    assert parse_command(line) == Command(verb, arg)


@pytest.mark.parametrize(
    "line",
    [
        b"\r\n",
        b"\n",
        b"",
        b" NOOP\r\n",
        b"NO\x00OP\r\n",
        b"MAIL FROM:<a\x00@b>\r\n",
        b"NO\rOP\r\n",
        b"NOOP\r\r\n",
        b"MAIL FROM:<\xc3\xa4@b>\r\n",
        b"\xff\r\n",
        b"A" * 21 + b"\r\n",
        b"EHL0 x\r\n",
        b"E-HLO x\r\n",
        "ÉHLO x\r\n".encode(),
    ],
)
def test_parse_command_syntax_errors(line: bytes) -> None:
    with pytest.raises(SMTPError) as exc:
        parse_command(line)
    assert exc.value.reply == SYNTAX_ERROR


def test_parse_command_utf8() -> None:
    line = "MAIL FROM:<ä@b> SMTPUTF8\r\n".encode()
    assert parse_command(line, utf8=True) == Command("MAIL", "FROM:<ä@b> SMTPUTF8")
    with pytest.raises(SMTPError):
        parse_command(b"MAIL FROM:<\xc3@b>\r\n", utf8=True)  # invalid UTF-8
    with pytest.raises(SMTPError):
        parse_command("ÉHLO x\r\n".encode(), utf8=True)  # verb stays ASCII


@settings(max_examples=500)
@given(st.binary(max_size=80), st.booleans())
def test_parse_command_arbitrary_bytes(line: bytes, utf8: bool) -> None:
    try:
        cmd = parse_command(line, utf8=utf8)
    except SMTPError as exc:
        assert exc.reply == SYNTAX_ERROR
        return
    assert cmd.verb.isascii() and cmd.verb.isalpha() and cmd.verb.isupper()
    assert 1 <= len(cmd.verb) <= 20
    assert cmd.arg == cmd.arg.strip(" \t") and "\r" not in cmd.arg and "\0" not in cmd.arg


def _reference_parse(line: bytes, utf8: bool) -> tuple[str, str] | None:
    """RFC 5321 §4.1.1's command line as a plain loop reads it: one CRLF or
    LF ends it; no NUL, CR or LF elsewhere; the verb up to the first SP or
    HTAB, 1-20 ASCII letters; the rest, less blanks, its argument."""
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    if not line or any(c in line for c in (b"\0", b"\r", b"\n")):
        return None
    try:
        text = line.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        return None
    for index, char in enumerate(text):
        if char in " \t":
            verb, arg = text[:index], text[index + 1 :]
            break
    else:
        verb, arg = text, ""
    if not (1 <= len(verb) <= 20 and verb.isascii() and verb.isalpha()):
        return None
    return verb.upper(), arg.strip(" \t")


@settings(max_examples=1000)
@given(st.lists(st.sampled_from(["a", "Q", "z", " ", "\t", ":", "<", "@", ".", "\u00e9", "1",
                                 "-", "\r", "\n", "\0", "\r\n"]), max_size=30),
       st.sampled_from([b"", b"\r\n", b"\n", b"\r"]), st.booleans())
def test_parse_command_matches_a_plain_reading(parts: list[str], ending: bytes,
                                                utf8: bool) -> None:
    line = "".join(parts).encode() + ending
    expected = _reference_parse(line, utf8)
    try:
        command = parse_command(line, utf8=utf8)
    except SMTPError as exc:
        assert exc.reply == SYNTAX_ERROR
        assert expected is None
        return
    assert (command.verb, command.arg) == expected


# --- MAIL / RCPT ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "address", "params"),
    [
        ("FROM:<a@b.org>", "a@b.org", {}),
        ("from:<a@b.org>", "a@b.org", {}),
        ("FROM: <a@b.org>", "a@b.org", {}),  # RFC 2645 §6 example style
        ("FROM:   <a@b.org>", "a@b.org", {}),
        ("FROM:<>", "", {}),
        ("FROM:<> BODY=8BITMIME", "", {"BODY": "8BITMIME"}),
        # The domain is canonical (lowercase A-labels); the local part is kept.
        ("FROM:<First.Last@Example.ORG>", "First.Last@example.org", {}),
        ("FROM:<@relay.a,@relay.b:user@c.org>", "user@c.org", {}),
        ("FROM:<@relay.a:user@c.org>", "user@c.org", {}),
        ('FROM:<"john doe"@c.org>', '"john doe"@c.org', {}),
        ('FROM:<"a\\"b@c"@c.org>', '"a\\"b@c"@c.org', {}),
        ("FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", {}),
        ("FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", {}),
        ("FROM:<a@b.org> SIZE=100 body=7bit", "a@b.org", {"SIZE": "100", "BODY": "7bit"}),
        ("FROM:<a@b.org>  SMTPUTF8", "a@b.org", {"SMTPUTF8": None}),
        ("FROM:<a@b.org> ENVID=QQ+2Bx RET=HDRS", "a@b.org", {"ENVID": "QQ+2Bx", "RET": "HDRS"}),
        ("FROM:<a+tag@b-c.org>", "a+tag@b-c.org", {}),
        ("FROM:<a@localhost>", "a@localhost", {}),
    ],
)
def test_mail_from_ok(arg: str, address: str, params: dict[str, str | None]) -> None:
    assert parse_mail_from(arg, allow_utf8=False) == Path(address, params)


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:a@b.org",  # no angle brackets
        "FROM:<a@b.org",
        "FROM:<a>",  # no domain
        "FROM:<@x:a@b.org",
        "FROM:<@x a@b.org>",
        "FROM:<@:a@b.org>",
        "FROM:<a..b@c.org>",
        "FROM:<.a@c.org>",
        "FROM:<a.@c.org>",
        "FROM:<a@-b.org>",
        "FROM:<a@b-.org>",
        "FROM:<a@b_c.org>",
        "FROM:<a@b.org.>",
        "FROM:<a@b..org>",
        "FROM:<a@>",
        "FROM:<@b.org>",
        'FROM:<"unterminated@b.org>',
        'FROM:<"a\x01b"@b.org>',
        "FROM:<a b@c.org>",
        "FROM:<a@[300.1.1.1]>",
        "FROM:<a@[IPv6:zz::1]>",
        "FROM:<a@[1.2.3.4>",
        "FROM: ",
        "FROM:",
        "FROM:<postmaster>",
    ],
)
def test_mail_from_bad_sender(arg: str) -> None:
    with pytest.raises(SMTPError) as exc:
        parse_mail_from(arg, allow_utf8=False)
    assert code_of(exc) == (501, "5.1.7")


@pytest.mark.parametrize("arg", ["", "FROM<a@b.org>", "FRM:<a@b.org>", "TO:<a@b.org>"])
def test_mail_missing_keyword(arg: str) -> None:
    with pytest.raises(SMTPError) as exc:
        parse_mail_from(arg, allow_utf8=False)
    assert code_of(exc) == (501, "5.5.4")


@pytest.mark.parametrize(
    "params",
    [
        " SIZE=1 SIZE=2",
        " size=1 SIZE=1",
        " =x",
        " -X=1",
        " SIZE=",
        " SIZE==1",
        " SIZE=a=b",
        " K_Y=1",
        " SIZE=\x7f",
        "SIZE=1",  # glued to ">"
        ">",
        " BODY=\u00e9",
    ],
)
def test_bad_parameters(params: str) -> None:
    with pytest.raises(SMTPError) as exc:
        parse_mail_from("FROM:<a@b.org>" + params, allow_utf8=False)
    assert code_of(exc) == (501, "5.5.4")


def test_rcpt_to() -> None:
    assert parse_rcpt_to("TO:<u@c.org>", allow_utf8=False) == Path("u@c.org", {})
    assert parse_rcpt_to("to: <Postmaster>", allow_utf8=False) == Path("postmaster", {})
    assert parse_rcpt_to("TO:<postmaster> NOTIFY=NEVER", allow_utf8=False) == Path(
        "postmaster", {"NOTIFY": "NEVER"}
    )
    assert parse_rcpt_to("TO:<@a.org:u@c.org>", allow_utf8=False).address == "u@c.org"
    for bad in ["TO:<>", "TO:<u>", "TO:u@c.org", "TO:<u@c.org"]:
        with pytest.raises(SMTPError) as exc:
            parse_rcpt_to(bad, allow_utf8=False)
        assert code_of(exc) == (501, "5.1.3")
    with pytest.raises(SMTPError) as exc:
        parse_rcpt_to("FROM:<u@c.org>", allow_utf8=False)
    assert code_of(exc) == (501, "5.5.4")


def test_local_part_limits() -> None:
    ok = "a" * 64
    assert parse_rcpt_to(f"TO:<{ok}@c.org>", allow_utf8=False).address == f"{ok}@c.org"
    with pytest.raises(SMTPError) as exc:
        parse_rcpt_to(f"TO:<{'a' * 65}@c.org>", allow_utf8=False)
    assert code_of(exc) == (501, "5.1.3")
    quoted = '"' + "b" * 62 + '"'  # 64 octets with the quotes
    assert parse_mail_from(f"FROM:<{quoted}@c.org>", allow_utf8=False).address.startswith('"')
    with pytest.raises(SMTPError):
        parse_mail_from(f'FROM:<"{"b" * 63}"@c.org>', allow_utf8=False)
    with pytest.raises(SMTPError):  # 33 two-octet characters = 66 octets
        parse_mail_from(f"FROM:<{'é' * 33}@c.org>", allow_utf8=True)


def test_path_length_limits() -> None:
    # "<" + local + "@" + domain + ">" = 256 octets exactly
    domain = ".".join(["d" * 63] * 3 + ["d" * 56])  # 63*3 + 56 + 3 = 248
    local = "a" * (256 - 3 - len(domain))
    assert len(local) == 5
    assert parse_rcpt_to(f"TO:<{local}@{domain}>", allow_utf8=False).address == (
        f"{local}@{domain}"
    )
    with pytest.raises(SMTPError) as exc:
        parse_rcpt_to(f"TO:<{local}a@{domain}>", allow_utf8=False)
    assert code_of(exc) == (501, "5.1.3")
    with pytest.raises(SMTPError):  # label of 64
        parse_rcpt_to(f"TO:<a@{'d' * 64}.org>", allow_utf8=False)


def test_utf8_policy() -> None:
    path = parse_mail_from("FROM:<用户@例子.广告> SMTPUTF8", allow_utf8=True)
    # The local part is kept; the domain is its A-label (one canonical form).
    assert path.address == "用户@xn--fsqu00a.xn--4rr70v" and path.is_utf8
    assert not parse_mail_from("FROM:<a@b.org>", allow_utf8=True).is_utf8
    for arg in ["FROM:<ä@b.org>", "FROM:<a@bücher.de>", 'FROM:<"ä"@b.org>']:
        with pytest.raises(SMTPError) as exc:
            parse_mail_from(arg, allow_utf8=False)
        assert code_of(exc) == (553, "5.6.7")
    with pytest.raises(SMTPError) as exc:
        parse_rcpt_to("TO:<a@b\u00a0c.org>", allow_utf8=True)  # not a valid U-label
    assert code_of(exc) == (501, "5.1.3")


@settings(max_examples=500)
@given(st.text(max_size=60), st.booleans(), st.booleans())
def test_paths_arbitrary_text(tail: str, rcpt: bool, utf8: bool) -> None:
    for arg in (tail, ("TO:" if rcpt else "FROM:") + tail, ("TO:<" if rcpt else "FROM:<") + tail):
        try:
            path = (parse_rcpt_to if rcpt else parse_mail_from)(arg, allow_utf8=utf8)
        except SMTPError as exc:
            assert exc.reply.code in (501, 553)
            continue
        assert utf8 or path.address.isascii()
        assert all(k == k.upper() for k in path.params)


local_atom = st.text(alphabet="abcXYZ019!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=8)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200)
@given(st.lists(local_atom, min_size=1, max_size=3), st.lists(label, min_size=1, max_size=4))
def test_generated_valid_paths_round_trip(atoms: list[str], labels: list[str]) -> None:
    address = ".".join(atoms) + "@" + ".".join(labels)
    assert parse_mail_from(f"FROM:<{address}>", allow_utf8=False).address == address
    assert split_address(address) == (".".join(atoms), ".".join(labels))


# --- the plain-path fast path agrees with the full grammar -------------------------------

path_part = st.text(alphabet="aZ09-._+=\"\\@[]:<>,xn é\u200b", max_size=12)


@settings(max_examples=2000)
@given(st.lists(path_part, min_size=1, max_size=4), st.lists(path_part, min_size=1, max_size=5),
       st.sampled_from(["", ">", "> SIZE=1", ">x", "@"]))
def test_plain_path_agrees_with_the_full_grammar(local: list[str], labels: list[str],
                                                 tail: str) -> None:
    s = "<" + ".".join(local) + "@" + ".".join(labels) + tail
    plain = _plain_path(s)
    if plain is None:
        return
    for keyword in ("FROM:", "TO:"):
        for utf8 in (False, True):
            assert _full_path(s, keyword, utf8, BAD_RECIPIENT) == plain, s


@settings(max_examples=300)
@given(st.lists(local_atom, min_size=1, max_size=3), st.lists(label, min_size=1, max_size=4),
       st.booleans())
def test_plain_paths_take_the_fast_path(atoms: list[str], labels: list[str], upper: bool) -> None:
    domain = ".".join(labels)
    s = "<" + ".".join(atoms) + "@" + (domain.upper() if upper else domain) + "> SIZE=9"
    if "xn--" in domain:
        assert _plain_path(s) is None
        return
    assert _plain_path(s) == (".".join(atoms) + "@" + domain, s.index(">") + 1)
    assert _plain_path(s) == _full_path(s, "TO:", False, BAD_RECIPIENT)


def test_plain_path_leaves_the_limits_and_the_rest_to_the_full_grammar() -> None:
    assert _plain_path("<" + "a" * 64 + "@c.org>") == ("a" * 64 + "@c.org", 72)
    assert _plain_path("<" + "d" * 63 + "@" + "d" * 63 + ".org>") is not None
    long_domain = ".".join(["d" * 63] * 3 + ["d" * 59])  # 251 octets
    assert _plain_path(f"<ab@{long_domain}>") == (f"ab@{long_domain}", 256)
    for s in ("<" + "a" * 65 + "@c.org>",  # local part over 64
              f"<a@{'d' * 64}.org>",  # label over 63
              f"<abc@{long_domain}>",  # path over 256
              "<a@xn--bcher-kva.de>", "<a@B.XN--bcher-kva.DE>",  # A-labels: IDNA checks them
              '<"a b"@c.org>', "<a@[127.0.0.1]>", "<@r.org:a@c.org>", "<>", "<postmaster>",
              "<a..b@c.org>", "<a@c..org>", "<a@c.org.>", "<a@-c.org>", "<ä@c.org>", "a@c.org"):
        assert _plain_path(s) is None, s
    assert parse_rcpt_to("TO:<a@B.XN--BCHER-KVA.DE>", allow_utf8=False).address == (
        "a@b.xn--bcher-kva.de")


# --- helpers ------------------------------------------------------------------------------


def test_split_address() -> None:
    assert split_address("a@b.org") == ("a", "b.org")
    assert split_address('"x@y"@b.org') == ('"x@y"', "b.org")
    assert split_address('"x\\"@y"@b.org') == ('"x\\"@y"', "b.org")
    assert split_address("postmaster") == ("postmaster", "")
    assert split_address("") == ("", "")


def test_normalize_domain() -> None:
    assert normalize_domain("Example.ORG.") == "example.org"
    assert normalize_domain("bücher.de") == "xn--bcher-kva.de"
    assert normalize_domain("XN--BCHER-KVA.DE") == "xn--bcher-kva.de"
    assert normalize_domain("[IPv6:2001:DB8::1]") == "[ipv6:2001:db8::1]"
    assert normalize_domain("localhost") == "localhost"
    for bad in ["", ".", "a..b", "a.org..", "-a.org", "a-.org", "a_b.org", "xn--zz.de",
                "d" * 64 + ".org", "[1.2.3.4", "a b.org"]:
        with pytest.raises(ValueError):
            normalize_domain(bad)


def test_xtext_examples() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    assert xtext_decode("+2b") == "+"
    assert xtext_encode("é") == "+C3+A9"
    for bad in ["+", "+2", "+ZZ", "a=b", "a b", "\x7f", "+FF", "é"]:
        with pytest.raises(ValueError):
            xtext_decode(bad)


@given(st.text())
def test_xtext_round_trip(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return
    encoded = xtext_encode(text)
    assert all("!" <= c <= "~" and c != "=" for c in encoded)
    assert xtext_decode(encoded) == text


@given(st.text(max_size=30))
def test_xtext_decode_arbitrary(text: str) -> None:
    try:
        decoded = xtext_decode(text)
    except ValueError:
        return
    assert xtext_decode(xtext_encode(decoded)) == decoded


def test_parse_ehlo_arg() -> None:
    assert parse_ehlo_arg("client.example extra junk") == "client.example"
    assert parse_ehlo_arg("[192.0.2.1]") == "[192.0.2.1]"
    for empty in ["", "   ", "\t"]:
        with pytest.raises(SMTPError) as exc:
            parse_ehlo_arg(empty)
        assert code_of(exc) == (501, "5.5.4")


# --- IDNA 2008 / UTS 46: one canonical domain for MAIL and RCPT (issue 8, defect 9) ------


@pytest.mark.parametrize(
    ("domain", "canonical"),
    [
        ("customer\u200b.test", "customer.test"),  # zero-width space: removed
        ("cust\u00adomer.test", "customer.test"),  # soft hyphen: removed
        ("\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.org", "example.org"),  # fullwidth
        ("example\u3002org", "example.org"),  # ideographic full stop
        ("B\u00fccher.DE", "xn--bcher-kva.de"),
        ("XN--BCHER-KVA.de", "xn--bcher-kva.de"),
    ],
)
@pytest.mark.parametrize("verb", ["MAIL", "RCPT"])
def test_domains_are_canonical_a_labels(verb: str, domain: str, canonical: str) -> None:
    parse = parse_mail_from if verb == "MAIL" else parse_rcpt_to
    keyword = "FROM:" if verb == "MAIL" else "TO:"
    path = parse(f"{keyword}<User@{domain}>", allow_utf8=True)
    assert path.address == f"User@{canonical}"
    assert not path.is_utf8


@pytest.mark.parametrize(
    "domain",
    [
        "00--0.xn--bcher-kva",  # hyphens in positions 3-4 of a non-xn label
        "xn--zz-zzz.test",  # not valid Punycode
        "bad\u2028.test",  # a line separator: disallowed
        "\u0378x.test",  # unassigned code point
        "a\u200d.test",  # ZWJ in a context CONTEXTJ forbids
    ],
)
@pytest.mark.parametrize(("verb", "expected"), [("MAIL", (501, "5.1.7")), ("RCPT", (501, "5.1.3"))])
def test_domains_idna_refuses_are_501_for_mail_and_rcpt(verb: str, expected: tuple[int, str],
                                                        domain: str) -> None:
    parse = parse_mail_from if verb == "MAIL" else parse_rcpt_to
    keyword = "FROM:" if verb == "MAIL" else "TO:"
    with pytest.raises(SMTPError) as exc:
        parse(f"{keyword}<user@{domain}>", allow_utf8=True)
    assert code_of(exc) == expected


def test_a_non_ascii_domain_without_smtputf8_is_still_553() -> None:
    with pytest.raises(SMTPError) as exc:
        parse_rcpt_to("TO:<user@customer\u200b.test>", allow_utf8=False)
    assert code_of(exc) == (553, "5.6.7")
