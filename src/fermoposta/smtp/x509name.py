"""Certificate subjects as RFC 4514 strings, without an X.509 library.

Contract:
- `der_subject(der)` reads the subject `Name` of a DER certificate with a
  small DER walker (no dependency: the `ssl` module only gives the subject of
  a *verified* peer as a dict that loses the string types, and `cryptography`
  is not a dependency).  `parse_subject(text)` reads an RFC 4514 string (as
  typed by an operator).  Both return the same structure and
  `format_subject` renders it, so `normalize_subject(text)` and
  `certificate_subject(der)` agree on one canonical string:
  - RDNs most specific first (RFC 4514 §2.1: the reverse of the DER order),
    separated by "," without spaces; the attributes of a multi-valued RDN
    joined by "+" in sorted order (a DER SET has no meaningful order).
  - Attribute types as uppercase keywords: RFC 4514's table (CN, L, ST, O,
    OU, C, STREET, DC, UID) plus OpenSSL's short names for the other usual
    DN attributes (EMAILADDRESS, SERIALNUMBER, SN, GN, TITLE, ...).  Other
    types are dotted OIDs whose value is "#" and the uppercase hex of its BER
    encoding (RFC 4514 §2.4), as is a known type whose value is not a string.
  - Values keep their case.  "\\", '"', "+", ",", ";", "<", ">" are escaped
    with a backslash, as are a leading "#" or space and a trailing space;
    characters that are not printable (controls, NUL, non-breaking and other
    odd spaces) are escaped as "\\XX" hex pairs of their UTF-8 bytes.
    The string type of a value (PrintableString, UTF8String, ...) is not
    kept: a renewed certificate that re-encodes a value renders the same.
- On input, spaces around "=", ",", "+" are ignored; types are
  case-insensitive and may be given as keywords, common long names
  ("commonName", "emailAddress", ...), "E"/"EMAIL", or dotted OIDs (with or
  without an "OID." prefix); values may be quoted (RFC 2253) or "#hex"; ";"
  is accepted between RDNs (RFC 2253).  So the output of
  `openssl x509 -noout -subject -nameopt RFC2253` is accepted as it is.
- Malformed input (text or DER) raises `ValueError`; nothing else is raised.
"""

from __future__ import annotations

import re

# (type keyword or dotted OID, value): a str when the value has a string form,
# else the BER encoding of the value (rendered "#HEX").
AVA = tuple[str, str | bytes]
RDN = tuple[AVA, ...]

_KEYWORDS: dict[str, str] = {
    "2.5.4.3": "CN",
    "2.5.4.4": "SN",
    "2.5.4.5": "SERIALNUMBER",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "STREET",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "TITLE",
    "2.5.4.17": "POSTALCODE",
    "2.5.4.42": "GN",
    "2.5.4.43": "INITIALS",
    "2.5.4.44": "GENERATIONQUALIFIER",
    "2.5.4.46": "DNQUALIFIER",
    "2.5.4.65": "PSEUDONYM",
    "2.5.4.97": "ORGANIZATIONIDENTIFIER",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.2.840.113549.1.9.1": "EMAILADDRESS",
}
_KNOWN = frozenset(_KEYWORDS.values())
_ALIASES: dict[str, str] = {
    "COMMONNAME": "CN",
    "SURNAME": "SN",
    "COUNTRYNAME": "C",
    "LOCALITYNAME": "L",
    "STATEORPROVINCENAME": "ST",
    "STREETADDRESS": "STREET",
    "ORGANIZATIONNAME": "O",
    "ORGANIZATIONALUNITNAME": "OU",
    "GIVENNAME": "GN",
    "DOMAINCOMPONENT": "DC",
    "USERID": "UID",
    "E": "EMAILADDRESS",
    "EMAIL": "EMAILADDRESS",
}

# Universal string tags and how to decode their contents.
_STRING_CODECS: dict[int, str] = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString, read as Latin-1 like OpenSSL does
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}

_SEQUENCE, _SET, _OID, _INTEGER = 0x30, 0x31, 0x06, 0x02
_SPECIALS = '\\"+,;<>'
_KEYWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z")
_OID_RE = re.compile(r"(?:[Oo][Ii][Dd]\.)?([0-2](?:\.(?:0|[1-9][0-9]*))+)\Z")
_HEX = frozenset("0123456789abcdefABCDEF")


# --- DER ---------------------------------------------------------------------------------


def _tlv(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `pos`."""
    if pos >= end:
        raise ValueError("truncated DER")
    tag = data[pos]
    pos += 1
    if tag & 0x1F == 0x1F:  # high tag number form: keep the first byte as the tag
        while True:
            if pos >= end:
                raise ValueError("truncated DER tag")
            more = data[pos] & 0x80
            pos += 1
            if not more:
                break
    if pos >= end:
        raise ValueError("truncated DER length")
    first = data[pos]
    pos += 1
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError("unsupported DER length")
        if pos + count > end:
            raise ValueError("truncated DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > end:
        raise ValueError("DER length beyond its container")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, content end) of each element in a range."""
    out = []
    pos = start
    while pos < end:
        tag, cstart, cend = _tlv(data, pos, end)
        out.append((tag, pos, cstart, cend))
        pos = cend
    return out


def _oid(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise ValueError("malformed OID")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in [*head, *arcs[1:]])


def _value(kind: str, tlv: bytes) -> str | bytes:
    """The value of attribute `kind` from its BER encoding: str if it has a string form."""
    if kind not in _KNOWN:
        return tlv
    tag, start, end = _tlv(tlv, 0, len(tlv))
    if end != len(tlv):
        raise ValueError("trailing bytes after an attribute value")
    codec = _STRING_CODECS.get(tag)
    if codec is None:
        return tlv
    try:
        return tlv[start:end].decode(codec)
    except UnicodeDecodeError:
        return tlv


def der_subject(der: bytes) -> tuple[RDN, ...]:
    """The subject RDNs of a DER certificate, most specific first."""
    data = bytes(der)
    tag, start, end = _tlv(data, 0, len(data))
    if tag != _SEQUENCE:
        raise ValueError("not a DER certificate")
    parts = _children(data, start, end)
    if not parts or parts[0][0] != _SEQUENCE:
        raise ValueError("certificate without a TBSCertificate")
    fields = _children(data, parts[0][2], parts[0][3])
    if fields and fields[0][0] == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject
    if len(fields) < 5 or [f[0] for f in fields[:5]] != [_INTEGER, *[_SEQUENCE] * 4]:
        raise ValueError("malformed TBSCertificate")
    _, _, name_start, name_end = fields[4]
    rdns: list[RDN] = []
    for rdn_tag, _, rdn_start, rdn_end in _children(data, name_start, name_end):
        if rdn_tag != _SET:
            raise ValueError("malformed RelativeDistinguishedName")
        avas: list[AVA] = []
        for ava_tag, _, ava_start, ava_end in _children(data, rdn_start, rdn_end):
            items = _children(data, ava_start, ava_end)
            if ava_tag != _SEQUENCE or len(items) != 2 or items[0][0] != _OID:
                raise ValueError("malformed AttributeTypeAndValue")
            oid = _oid(data[items[0][2] : items[0][3]])
            kind = _KEYWORDS.get(oid, oid)
            avas.append((kind, _value(kind, data[items[1][1] : items[1][3]])))
        if not avas:
            raise ValueError("empty RelativeDistinguishedName")
        rdns.append(tuple(avas))
    return tuple(reversed(rdns))


# --- RFC 4514 text -----------------------------------------------------------------------


def _escape(value: str) -> str:
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in _SPECIALS or (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\" + ch)
        elif not ch.isprintable():
            out.append("".join(f"\\{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


def _format_ava(ava: AVA) -> str:
    kind, value = ava
    if isinstance(value, bytes):
        return f"{kind}=#{value.hex().upper()}"
    return f"{kind}={_escape(value)}"


def format_subject(rdns: tuple[RDN, ...]) -> str:
    """The canonical RFC 4514 string of `rdns` (given most specific first)."""
    return ",".join("+".join(sorted(_format_ava(a) for a in rdn)) for rdn in rdns)


def _attribute_type(text: str) -> str:
    name = text.strip()
    match = _OID_RE.match(name)
    if match:
        return _KEYWORDS.get(match.group(1), match.group(1))
    if not _KEYWORD_RE.match(name):
        raise ValueError(f"invalid attribute type {name!r}")
    upper = name.upper()
    upper = _ALIASES.get(upper, upper)
    if upper not in _KNOWN:
        raise ValueError(
            f"unknown attribute type {name!r}: give it as a dotted OID with a #hex value"
        )
    return upper


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_spaces(self) -> None:
        while self.peek() == " ":
            self.pos += 1

    def attribute_type(self) -> str:
        end = self.text.find("=", self.pos)
        if end < 0:
            raise ValueError(f"missing '=' after {self.text[self.pos:]!r}")
        kind = _attribute_type(self.text[self.pos : end])
        self.pos = end + 1
        return kind

    def hex_value(self) -> bytes:
        self.pos += 1  # "#"
        start = self.pos
        while self.peek() and self.peek() in _HEX:
            self.pos += 1
        digits = self.text[start : self.pos]
        if not digits or len(digits) % 2:
            raise ValueError("a #hex value needs an even, non-zero number of hex digits")
        return bytes.fromhex(digits)

    def escape(self, buf: bytearray) -> None:
        self.pos += 1  # "\\"
        pair = self.text[self.pos : self.pos + 2]
        if len(pair) == 2 and all(c in _HEX for c in pair):
            buf.append(int(pair, 16))
            self.pos += 2
        elif pair[:1] and pair[0] in _SPECIALS + "=# ":
            buf += pair[0].encode("utf-8")
            self.pos += 1
        else:
            raise ValueError(f"invalid escape '\\{pair[:1]}'")

    def quoted_value(self) -> bytes:
        self.pos += 1  # opening quote
        buf = bytearray()
        while True:
            ch = self.peek()
            if not ch:
                raise ValueError("unterminated quoted value")
            if ch == '"':
                self.pos += 1
                return bytes(buf)
            if ch == "\\":
                self.escape(buf)
            else:
                buf += ch.encode("utf-8", "surrogatepass")
                self.pos += 1

    def string_value(self) -> bytes:
        buf = bytearray()
        keep = 0  # unescaped trailing spaces are dropped
        while True:
            ch = self.peek()
            if not ch or ch in ",;+":
                return bytes(buf[:keep])
            if ch == "\\":
                self.escape(buf)
                keep = len(buf)
                continue
            buf += ch.encode("utf-8", "surrogatepass")
            self.pos += 1
            if ch != " ":
                keep = len(buf)


def parse_subject(text: str) -> tuple[RDN, ...]:
    """The RDNs of an RFC 4514 (or RFC 2253) string, most specific first."""
    if not text.strip():
        raise ValueError("empty subject")
    reader = _Reader(text)
    rdns: list[RDN] = []
    avas: list[AVA] = []
    while True:
        kind = reader.attribute_type()
        reader.skip_spaces()
        value: str | bytes
        if reader.peek() == "#":
            value = _value(kind, reader.hex_value())
        else:
            if kind not in _KNOWN:
                raise ValueError(f"attribute {kind} has no string form: give its value as #hex")
            raw = reader.quoted_value() if reader.peek() == '"' else reader.string_value()
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("escaped bytes of a value are not UTF-8") from None
        reader.skip_spaces()
        avas.append((kind, value))
        separator = reader.peek()
        if separator == "":
            rdns.append(tuple(avas))
            return tuple(rdns)
        if separator not in ",;+":
            raise ValueError(f"unexpected {separator!r} after the value of {kind}")
        reader.pos += 1
        if separator != "+":
            rdns.append(tuple(avas))
            avas = []


def normalize_subject(text: str) -> str:
    """`text` (an RFC 4514 subject) in the canonical form; ValueError if malformed."""
    return format_subject(parse_subject(text))


def certificate_subject(der: bytes) -> str:
    """The subject of a DER certificate in the canonical form; ValueError if malformed."""
    return format_subject(der_subject(der))
