"""ETRN (RFC 1985) on the MX: a customer with a fixed address asks for its
held mail, which the outbound engine then delivers to the domain's own server.

Contract:
- `EtrnService.request(node, client)` answers one well-formed ETRN
  (`smtp.server.EtrnRequest`; the machine refused bad syntax with 501
  already) with the replies of RFC 1985 §5:
  * ``253 2.0.0 OK, <n> pending messages for node <x> started``: n messages
    had recipients made due (HELD ones moved to OUTBOUND, deferred OUTBOUND
    ones due at once) and the outbound runner was woken;
  * ``251 2.0.0 OK, no messages waiting for node <x>``;
  * ``458 4.7.0 Unable to queue messages for node <x>: ...`` when it may work
    later: every domain named had an ETRN less than `interval` seconds ago
    (the rate limit, per domain, shared by every node through the store's
    `RateCounter`; also when the ETRN started nothing and some of its
    domains were limited), an ATRN session is collecting the domain right
    now, or
    the store failed (``458 4.3.0``);
  * ``459 4.7.1 Node <x> not allowed: ...`` for a node that is not an ETRN
    domain here (not hosted, or hosted without an ETRN target: the reply does
    not tell which) and for a ``#queue`` name (we have no named queues).
  250 and 252 are never sent: we always know the count.
- ``ETRN domain`` is that domain; ``ETRN @domain`` the domain and every ETRN
  domain under it.  No AUTH is needed (RFC 1985 does not ask for it): the
  client chooses only *when*, never *where*: the outbound engine delivers an
  ETRN domain's mail only to the target in the domain's configuration or,
  without one, to its MX hosts better than this provider
  (`resolver.Router.etrn_route`); nothing the client sends names a host.
- One log line per ETRN: ``ETRN from helo[ip]: node=<x>, domains=<n>,
  result=<code>, messages=<n>, recipients=<n>`` (with ``reason=`` when
  refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from fermoposta.ops.log import ROOT
from fermoposta.smtp.reply import Reply
from fermoposta.smtp.server import EtrnRequest
from fermoposta.store.base import EtrnStarted, HostedMail, RateCounter, StoreError

__all__ = ["EtrnService", "EtrnStore"]

log = logging.getLogger(f"{ROOT}.etrn")

MAX_DOMAINS = 500  # per start_etrn call


class EtrnStore(HostedMail, RateCounter, Protocol):
    """What ETRN needs of the store."""


def started(node: str, messages: int) -> Reply:
    return Reply(253, "2.0.0", f"OK, {messages} pending messages for node {node} started")


def no_messages(node: str) -> Reply:
    return Reply(251, "2.0.0", f"OK, no messages waiting for node {node}")


def unable(node: str, why: str, enhanced: str = "4.7.0") -> Reply:
    return Reply(458, enhanced, f"Unable to queue messages for node {node}: {why}")


def not_allowed(node: str, why: str) -> Reply:
    return Reply(459, "4.7.1", f"Node {node} not allowed: {why}")


class EtrnService:
    """See the module docstring.  `wake` is called (on the event loop) when
    recipients were made due; `interval` is the rate limit (0 = none)."""

    def __init__(self, store: EtrnStore, *, interval: float,
                 wake: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.interval = interval
        self.wake = wake
        self.clock = clock

    async def request(self, node: EtrnRequest, client: str) -> Reply:
        """`client` names the client in the log (``helo[ip]``)."""
        reply, domains, result, reason = await self._answer(node)
        fields = [f"node={node}", f"domains={domains}", f"result={reply.code}",
                  f"messages={result.messages}", f"recipients={result.recipients}"]
        if reason:
            fields.append(f"reason={reason}")
        log.info("ETRN from %s: %s", client, ", ".join(fields),
                 extra={"component": "etrn",
                        "fields": {"client": client, "node": str(node), "domains": domains,
                                   "result": reply.code, "messages": result.messages,
                                   "recipients": result.recipients, "reason": reason}})
        return reply

    async def _answer(self, node: EtrnRequest) -> tuple[Reply, int, EtrnStarted, str]:
        none = EtrnStarted()
        shown = str(node)
        if node.queue:
            return not_allowed(shown, "named queues are not supported"), 0, none, "queue"
        try:
            domains = await asyncio.to_thread(self.store.etrn_domains, node.name,
                                              subdomains=node.subdomains)
            if not domains:
                return not_allowed(shown, "not an ETRN domain here"), 0, none, "not_etrn"
            allowed = await asyncio.to_thread(self._rate_limit, domains)
            limited = unable(shown, f"one ETRN per {self.interval:g} seconds")
            if not allowed:
                return limited, len(domains), none, "rate_limit"
            result = await asyncio.to_thread(self._start, allowed)
        except StoreError as exc:
            log.warning("ETRN %s: store error: %s", shown, exc)
            return unable(shown, "try again later", "4.3.0"), 0, none, "store"
        if result.messages and self.wake is not None:
            self.wake()
        if result.messages:
            return started(shown, result.messages), len(domains), result, ""
        if result.busy:
            return (unable(shown, "an ATRN session is collecting it now"), len(domains),
                    result, "leased")
        if len(allowed) < len(domains):
            # Not "no messages waiting": the limited domains were not looked at.
            return limited, len(domains), result, "rate_limit"
        return no_messages(shown), len(domains), result, ""

    def _rate_limit(self, domains: list[str]) -> list[str]:
        """The domains without an ETRN in the last `interval` seconds; each
        of them is counted now.  Per domain, whoever asks (a key per client
        would let anyone with many addresses make the provider call the
        customer's server again and again, and fill `rate_events`).
        Connections racing past the first count all record their ETRN and
        count again: only one that then sees its own alone goes on (at worst
        none does; never two)."""
        if self.interval <= 0:
            return domains
        now = self.clock()
        since = now - self.interval
        allowed = []
        for domain in domains:
            key = f"etrn:{domain}"
            if self.store.count_events(key, since) == 0:
                self.store.add_event(key, now, self.interval)
                if self.store.count_events(key, since) == 1:
                    allowed.append(domain)
        return allowed

    def _start(self, domains: list[str]) -> EtrnStarted:
        messages = recipients = 0
        busy: list[str] = []
        now = self.clock()
        for i in range(0, len(domains), MAX_DOMAINS):
            part = self.store.start_etrn(domains[i:i + MAX_DOMAINS], now)
            messages += part.messages
            recipients += part.recipients
            busy += part.busy
        return EtrnStarted(messages, recipients, tuple(busy))
