"""Build a local delivery backend from plain configuration values.

Contract:
- `make_delivery(kind, hostname=..., ...)` returns a `Delivery`:
  * "maildir": `MaildirDelivery(path_template, create=, aliases=, catch_all=,
    hostname=)`; `path_template` is required;
  * "lmtp": `LMTPDelivery(socket_path or hostport)`; exactly one of the two;
  * "smtp": `SMTPRelayDelivery(hostport)`; `hostport` is required.
- Keys that do not belong to `kind` must be left at their defaults; a
  missing key, an extra key or an unknown `kind` raises ValueError with a
  message naming the configuration key (`path`, `create`, `aliases`,
  `catch_all`, `address`), fit to show the user.
- Nothing is opened or checked on disk or on the network here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fermoposta.customer.delivery.base import Delivery
from fermoposta.customer.delivery.lmtp import LMTPDelivery
from fermoposta.customer.delivery.maildir import MaildirDelivery
from fermoposta.customer.delivery.smtp import SMTPRelayDelivery

__all__ = ["KINDS", "make_delivery"]

KINDS = ("maildir", "lmtp", "smtp")


def make_delivery(
    kind: str,
    *,
    hostname: str,
    path_template: str | None = None,
    create: bool = False,
    aliases: Mapping[str, str] | None = None,
    catch_all: str | None = None,
    socket_path: Path | None = None,
    hostport: tuple[str, int] | None = None,
) -> Delivery:
    if kind not in KINDS:
        raise ValueError(f"delivery type {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "maildir":
        if socket_path is not None or hostport is not None:
            raise ValueError("delivery type 'maildir' takes `path`, not `address`")
        if not path_template:
            raise ValueError("delivery type 'maildir' needs `path` "
                             '(e.g. "/var/mail/{domain}/{local}/Maildir")')
        return MaildirDelivery(path_template, create=create, aliases=aliases or {},
                               catch_all=catch_all, hostname=hostname)
    extra = [key for key, value in (("path", path_template), ("aliases", aliases),
                                    ("catch_all", catch_all)) if value]
    if create:
        extra.append("create")
    if extra:
        raise ValueError(f"delivery type {kind!r} does not take {', '.join(extra)} "
                         "(those are Maildir settings)")
    if kind == "lmtp":
        if socket_path is not None and hostport is None:
            return LMTPDelivery(socket_path, hostname=hostname)
        if hostport is not None and socket_path is None:
            return LMTPDelivery(hostport, hostname=hostname)
        raise ValueError("delivery type 'lmtp' needs one `address`: a unix socket path "
                         'or "host:port"')
    if socket_path is not None or hostport is None:
        raise ValueError("delivery type 'smtp' needs `address` as \"host:port\"")
    return SMTPRelayDelivery(hostport, hostname=hostname)
