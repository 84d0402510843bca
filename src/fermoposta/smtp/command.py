"""SMTP command lines, paths and ESMTP parameters (sans-I/O).

Contract:
- `parse_command(line)` turns one received line (CRLF or bare-LF terminated) into a
  `Command(verb, arg)`; anything that is not a well-formed command line raises
  `SMTPError(SYNTAX_ERROR)` (500 5.5.2, RFC 5321 §4.2.4).  Bare LF is accepted here; the
  session decides whether to reject it (RFC 5321 §2.3.8).
- `parse_mail_from` / `parse_rcpt_to` parse the argument of MAIL / RCPT into a `Path`
  (RFC 5321 §4.1.2 grammar, §4.5.3.1 size limits, RFC 6531 for UTF-8).  Bad sender:
  501 5.1.7; bad recipient: 501 5.1.3; bad ESMTP parameters: 501 5.5.4.
  UTF-8 policy: a non-ASCII address when `allow_utf8` is false raises 553 5.6.7
  (RFC 6531 §3.2 / RFC 6533 "non-ASCII addresses not permitted").  The caller must also
  require the SMTPUTF8 parameter on MAIL when `Path.is_utf8` (RFC 6531 §3.4).
- The domain of a parsed path is canonical (`canonical_address`): lowercase A-labels by
  IDNA 2008 / UTS 46, for MAIL and RCPT alike, so invisible or look-alike code points
  (U+200B, U+00AD, fullwidth letters, U+3002) never reach a decision, the store, a log
  or a next hop in their raw form; a domain IDNA refuses (a disallowed code point, a
  bad A-label such as `xn--` with invalid Punycode or `00--0`) is 501 5.1.7 / 501 5.1.3.
- `split_address`, `canonical_address`, `normalize_domain`, `xtext_encode`/`xtext_decode`
  (RFC 3461 §4) and `parse_ehlo_arg` are pure helpers; they raise `ValueError` /
  `SMTPError` as documented.
No I/O.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass

import idna

from fermoposta.smtp.reply import SYNTAX_ERROR, Reply, SMTPError

MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 §4.5.3.1.2
MAX_PATH = 256  # RFC 5321 §4.5.3.1.3 (including "<", ">" and a source route)
MAX_DNS_NAME = 253  # RFC 1035 §2.3.4 (255 on the wire = 253 in text)
MAX_LABEL = 63  # RFC 1035 §2.3.4

BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAMETERS = Reply(501, "5.5.4", "Bad ESMTP parameter syntax")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
EHLO_NEEDS_DOMAIN = Reply(501, "5.5.4", "EHLO requires a domain or address literal")

# A command line: its verb (1-20 letters), then after the first SP or HTAB
# (if any) its argument, then the line's end (CRLF, LF or none); a NUL, CR
# or LF anywhere else, or another verb, does not match.
_COMMAND = re.compile(rb"([A-Za-z]{1,20})(?:[ \t]([^\0\r\n]*))?(?:\r\n|\n)?")
# RFC 5321 §4.1.2: atext (RFC 5322 §3.2.3); UTF8-non-ascii added by RFC 6531 §3.3.
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", re.ASCII)
# RFC 5321 §4.1.2 esmtp-keyword / esmtp-value.
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?", re.ASCII)
_HEX = frozenset("0123456789ABCDEFabcdef")


@dataclass(frozen=True)
class Command:
    """A command line: `verb` uppercased, `arg` stripped of SP/HTAB, original case."""

    verb: str
    arg: str


@dataclass(frozen=True)
class Path:
    """A reverse- or forward-path. `address` "" is the null path `<>`."""

    address: str
    params: dict[str, str | None]

    @property
    def is_utf8(self) -> bool:
        """True when the address needs SMTPUTF8 (RFC 6531)."""
        return not self.address.isascii()


def parse_command(line: bytes, *, utf8: bool = False) -> Command:
    """Parse one command line (terminator included) into verb and argument."""
    match = _COMMAND.fullmatch(line)
    if match is None:
        raise SMTPError(SYNTAX_ERROR, "bad verb, empty line, or NUL/CR/LF in command")
    verb, arg = match.group(1, 2)
    if arg is None:
        return Command(verb.decode("ascii").upper(), "")
    try:
        text = arg.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        raise SMTPError(SYNTAX_ERROR, "8-bit bytes in command") from None
    return Command(verb.decode("ascii").upper(), text.strip(" \t"))


# --- paths (RFC 5321 §4.1.2) -------------------------------------------------------------


class _Bad(Exception):
    """Internal: path syntax error."""


def _check_chars(text: str, allow_utf8: bool) -> None:
    if not text.isascii() and not allow_utf8:
        raise SMTPError(NEEDS_SMTPUTF8, "non-ASCII address without SMTPUTF8")


def _domain_end(s: str, i: int, *, literal: bool) -> int:
    """Scan a Domain (or address literal when `literal`) at s[i:]; return its end."""
    if literal and s.startswith("[", i):
        end = s.find("]", i)
        if end < 0:
            raise _Bad("unterminated address literal")
        body = s[i + 1 : end]
        try:
            if body[:5].lower() == "ipv6:":  # RFC 5321 §4.1.3 IPv6-address-literal
                ipaddress.IPv6Address(body[5:])
            else:
                ipaddress.IPv4Address(body)
        except ValueError:
            raise _Bad("bad address literal") from None
        return end + 1
    j = i
    while j < len(s) and (s[j].isalnum() or s[j] in "-." or not s[j].isascii()):
        j += 1
    name = s[i:j]
    if not name or len(name.encode()) > MAX_DOMAIN:
        raise _Bad("bad domain length")
    for label in name.split("."):
        if label.isascii():
            if not _LDH_LABEL.fullmatch(label) or len(label) > MAX_LABEL:
                raise _Bad("bad domain label")
        else:  # U-label, RFC 6531 §3.3 sub-domain =/ U-label
            try:
                normalize_domain(label + ".x")
            except ValueError:
                raise _Bad("bad U-label") from None
    return j


def _utf8_char(char: str) -> bool:
    return not char.isascii() and char.isprintable()


def _local_end(s: str, i: int) -> int:
    """Scan a Local-part (dot-string or quoted-string) at s[i:]; return its end."""
    if s.startswith('"', i):
        j = i + 1
        while j < len(s):
            c = s[j]
            if c == '"':
                return j + 1
            if c == "\\":  # quoted-pairSMTP = %d92 %d32-126
                if j + 1 >= len(s) or not " " <= s[j + 1] <= "~":
                    raise _Bad("bad quoted pair")
                j += 2
                continue
            # qtextSMTP = %d32-33 / %d35-91 / %d93-126 (+ UTF8-non-ascii, RFC 6531 §3.3)
            if not (" " <= c <= "~" or (not c.isascii() and c.isprintable())):
                raise _Bad("bad quoted-string character")
            j += 1
        raise _Bad("unterminated quoted-string")
    j = i
    while j < len(s) and (s[j] in _ATEXT or s[j] == "." or _utf8_char(s[j])):
        j += 1
    atoms = s[i:j].split(".")
    if any(not atom for atom in atoms):
        raise _Bad("bad dot-string")
    return j


def _parse_path(s: str, *, null_ok: bool, postmaster_ok: bool) -> tuple[str, int]:
    """Parse "<...>" at the start of s; return (address, index after ">")."""
    if not s.startswith("<"):
        raise _Bad("missing angle brackets")
    if null_ok and s.startswith("<>"):
        return "", 2
    if postmaster_ok and s[:12].lower() == "<postmaster>":
        return "postmaster", 12
    i = 1
    if s.startswith("@", i):  # RFC 5321 §4.1.1.3 source route: accepted and ignored
        while True:
            i = _domain_end(s, i + 1, literal=False)
            if s.startswith(",@", i):
                i += 1
                continue
            if not s.startswith(":", i):
                raise _Bad("bad source route")
            i += 1
            break
    local_start = i
    i = _local_end(s, i)
    local = s[local_start:i]
    if len(local.encode()) > MAX_LOCAL_PART:
        raise _Bad("local part too long")
    if not s.startswith("@", i):
        raise _Bad("missing domain")
    domain_start = i + 1
    i = _domain_end(s, domain_start, literal=True)
    if not s.startswith(">", i):
        raise _Bad("missing closing bracket")
    i += 1
    if len(s[:i].encode()) > MAX_PATH:
        raise _Bad("path too long")
    return f"{local}@{s[domain_start : i - 1]}", i


def _parse_params(rest: str) -> dict[str, str | None]:
    """RFC 5321 §4.1.2 Mail-parameters / Rcpt-parameters: esmtp-param *(SP esmtp-param)."""
    params: dict[str, str | None] = {}
    if not rest:
        return params
    if not rest.startswith(" "):
        raise SMTPError(BAD_PARAMETERS, "no space after path")
    for token in rest.split(" "):
        if not token:
            continue  # tolerate repeated spaces
        match = _PARAM.fullmatch(token)
        if match is None:
            raise SMTPError(BAD_PARAMETERS, f"bad parameter {token[:40]!r}")
        key = match.group(1).upper()
        if key in params:
            raise SMTPError(BAD_PARAMETERS, f"duplicate parameter {key}")
        params[key] = match.group(2)
    return params


# The usual path in one match: `<` Dot-string `@` Domain `>` (RFC 5321 §4.1.2), all
# ASCII, each label of 1-63 LDH characters (RFC 1035 §2.3.4).  What it matches, within
# the length limits and without an A-label, `_full_path` would return unchanged but
# for the domain's case; everything else (quoted local parts, literals, source routes,
# UTF-8, IDNs, errors) goes to `_full_path`.  A test holds the two to agreement.
_PLAIN_PATH = re.compile(
    r"<((?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\.)*[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)>", re.ASCII)


def _plain_path(s: str) -> tuple[str, int] | None:
    """(canonical address, index after ">") for a plain path at the start of s, else None."""
    match = _PLAIN_PATH.match(s)
    if match is None:
        return None
    local, domain = match.groups()
    end = match.end()
    domain = domain.lower()
    if (len(local) > MAX_LOCAL_PART or len(domain) > MAX_DNS_NAME or end > MAX_PATH
            or "xn--" in domain):
        return None
    return f"{local}@{domain}", end


def _full_path(s: str, keyword: str, allow_utf8: bool, bad: Reply) -> tuple[str, int]:
    """(canonical address, index after ">") for any path at the start of s."""
    try:
        address, end = _parse_path(s, null_ok=keyword == "FROM:", postmaster_ok=keyword == "TO:")
    except _Bad as exc:
        raise SMTPError(bad, str(exc)) from None
    _check_chars(address, allow_utf8)
    try:
        return canonical_address(address), end
    except ValueError as exc:
        raise SMTPError(bad, str(exc)) from None


def _parse(arg: str, keyword: str, allow_utf8: bool, bad: Reply, syntax: Reply) -> Path:
    if arg[: len(keyword)].upper() != keyword:
        raise SMTPError(syntax, f"missing {keyword}")
    s = arg[len(keyword) :].lstrip(" ")  # RFC 2645 §6 example sends "MAIL FROM: <x>"
    address, end = _plain_path(s) or _full_path(s, keyword, allow_utf8, bad)
    return Path(address, _parse_params(s[end:].rstrip(" \t")))


def parse_mail_from(arg: str, *, allow_utf8: bool) -> Path:
    """Parse `FROM:<reverse-path> [params]` (RFC 5321 §4.1.1.2)."""
    return _parse(arg, "FROM:", allow_utf8, BAD_SENDER, MAIL_SYNTAX)


def parse_rcpt_to(arg: str, *, allow_utf8: bool) -> Path:
    """Parse `TO:<forward-path> [params]` (RFC 5321 §4.1.1.3); `<postmaster>` allowed."""
    return _parse(arg, "TO:", allow_utf8, BAD_RECIPIENT, RCPT_SYNTAX)


# --- helpers ---------------------------------------------------------------------------------


def split_address(address: str) -> tuple[str, str]:
    """Split at the last "@" outside a quoted local part; ("postmaster", "") if none."""
    at = -1
    quoted = escaped = False
    for index, char in enumerate(address):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "@" and not quoted:
            at = index
    if at < 0:
        return address, ""
    return address[:at], address[at + 1 :]


def canonical_address(address: str) -> str:
    """`address` with its domain in the one form every decision, log line and
    next hop sees: lowercase A-labels (IDNA 2008 with UTS 46 mapping, so a
    zero-width space or soft hyphen is removed, fullwidth letters and U+3002
    become ASCII, and a disallowed code point or a bad A-label raises
    ValueError).  The local part is kept as sent (RFC 5321 §2.4)."""
    local, domain = split_address(address)
    if not domain or domain.startswith("["):
        return address  # no domain, or an address literal (checked by the grammar)
    return f"{local}@{normalize_domain(domain)}"


def normalize_domain(domain: str) -> str:
    """Lowercase, strip ONE trailing dot, U-labels to A-labels (IDNA 2008, UTS 46).

    Address literals ("[...]") are only lowercased.  Raises ValueError if invalid."""
    name = domain.lower()
    if name.startswith("["):
        if not name.endswith("]"):
            raise ValueError("unterminated address literal")
        return name
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii() or any(label.startswith("xn--") for label in name.split(".")):
        try:  # RFC 5891 §4 (IDNA 2008) with UTS 46 mapping
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise ValueError(f"invalid IDN {domain!r}: {exc}") from None
    if not name or len(name) > MAX_DNS_NAME:
        raise ValueError(f"bad domain length {domain!r}")
    for label in name.split("."):
        if len(label) > MAX_LABEL or not _LDH_LABEL.fullmatch(label):
            raise ValueError(f"bad domain label in {domain!r}")
    return name


def xtext_encode(s: str) -> str:
    """RFC 3461 §4 xtext: "+" "=" and chars outside "!".."~" become "+XX" (UTF-8 bytes)."""
    out: list[str] = []
    for byte in s.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(s: str) -> str:
    """Inverse of `xtext_encode` (hex accepted in either case); ValueError if malformed."""
    out = bytearray()
    i = 0
    while i < len(s):
        char = s[i]
        if char == "+":
            pair = s[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise ValueError("bad xtext hexchar")
            out.append(int(pair, 16))
            i += 3
        elif "!" <= char <= "~" and char != "=":
            out.append(ord(char))
            i += 1
        else:
            raise ValueError("bad xtext character")
    return out.decode("utf-8")  # UnicodeDecodeError is a ValueError


def parse_ehlo_arg(arg: str) -> str:
    """First whitespace-separated token of the EHLO/HELO argument (lenient, like Postfix)."""
    tokens = arg.split()
    if not tokens:
        raise SMTPError(EHLO_NEEDS_DOMAIN)
    return tokens[0]
