"""`received_header`: one folded Received: field (RFC 5321 §4.4) whose peer
values cannot inject lines, dated by the second given."""

from __future__ import annotations

import email
import email.policy
from email.utils import parsedate_to_datetime

from fermoposta.smtp.trace import protocol_name, received_header


def test_fields_and_date() -> None:
    header = received_header(helo="client.example", peer_ip="192.0.2.7", by="mx.example",
                             protocol="ESMTPS", queue_id="ABC123DEF456",
                             tls_info="TLSv1.3", for_recipient="bob@example.org",
                             now=1700000000.75)
    assert header.endswith(b"\r\n")
    message = email.message_from_bytes(header + b"\r\nbody", policy=email.policy.default)
    value = " ".join(str(message["Received"]).split())
    assert value.startswith("from client.example ([192.0.2.7]) by mx.example (fermoposta)"
                            " with ESMTPS (TLSv1.3) id ABC123DEF456 for <bob@example.org>;")
    stamp = value.rsplit(";", 1)[1].strip()
    assert parsedate_to_datetime(stamp).timestamp() == 1700000000
    # Another second gets its own date (the formatting is cached per second).
    later = received_header(helo=None, peer_ip="192.0.2.7", by="mx", protocol="SMTP",
                            now=1700000061.0)
    assert b"Tue, 14 Nov 2023 22:14:21 +0000" in later and b"from unknown" in later


def test_peer_values_cannot_inject_lines() -> None:
    header = received_header(helo="evil\r\nBcc: x@y (a)", peer_ip="192.0.2.7", by="mx",
                             protocol="ESMTP", for_recipient="a@b\r\nX: y", now=0)
    assert header.count(b"\r\n") == 4  # from, by, for, date: nothing more
    assert b"(a)" not in header  # parentheses would end the comment early
    assert not any(line.startswith((b"Bcc", b"X:")) for line in header.split(b"\r\n"))


def test_protocol_names() -> None:
    assert protocol_name(esmtp=False, tls=True, authenticated=True) == "SMTP"
    assert protocol_name(esmtp=True, tls=True, authenticated=True) == "ESMTPSA"
    assert protocol_name(esmtp=True, tls=False, authenticated=False) == "ESMTP"
