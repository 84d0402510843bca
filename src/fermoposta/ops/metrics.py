"""Prometheus metrics (issue 5): names, labels and the HTTP endpoint.

Contract:
- Metric names follow the Prometheus conventions (`fermoposta_` prefix,
  `_total` counters, `_seconds` and `_bytes` units) and carry bounded labels
  only: listener, reason, result, mechanism, state, pull block, failure kind.
  Never an address; a domain or an account name only behind the switches
  below.
- Instrumented code calls the module-level metrics; they live in the default
  registry beside the process collector (memory, CPU, file descriptors).
- `serve(host, port)` starts the scrape endpoint in a thread (`/metrics`)
  and returns the bound address; off unless `[metrics] listen` is set.
- `QueueCollector` reads the queue's shape from the store at scrape time
  (with several nodes on one store, every node reports the same shared
  queue: aggregate those gauges with max(), not sum()).
- `set_node(node, engine)` names the node in `fermoposta_node_info`; a
  node's name is a label there only (bounded: one per process).
- `set_certificate_expiry(timestamp)` exports the provider's `[tls] cert`
  notAfter as `fermoposta_tls_certificate_expiry_timestamp_seconds` (no
  labels: one certificate per process); None removes the series, so a
  process without TLS (or a customer) never shows a certificate that
  "expired in 1970".
- `reject(listener, reason)` counts one refusal in
  `fermoposta_smtp_rejects_total{listener, reason}`: one count per reject
  log line (and per failed AUTH); `reason` is one of `REJECT_REASONS`, any
  other value counts as `other`, so the label stays bounded.  The listener
  comes from `listener_name(component, implicit_tls)`.
- The only labels naming a domain or an account are those of
  `QueueCollector`'s optional per-domain and per-account families, off
  unless `[metrics] per_domain` / `per_account` turn them on: their
  cardinality is bounded by the store (hosted domains with held mail times
  3; accounts that made an ATRN), never by what a peer sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fermoposta import __version__

BUILD_INFO = Gauge("fermoposta_build_info", "fermoposta build information", ["version"])
BUILD_INFO.labels(version=__version__).set(1)

# Which node this is (`[store] node`) and on which store engine: one series
# per process, so the scrapes of several nodes on one store tell them apart.
NODE_INFO = Gauge("fermoposta_node_info", "This node's name and store engine",
                  ["node", "engine"])


def set_node(node: str, engine: str) -> None:
    """Name this process's node in `fermoposta_node_info` (one series only)."""
    NODE_INFO.clear()
    NODE_INFO.labels(node=node, engine=engine).set(1)


# Registered only while set: a label-less gauge would otherwise export 0.
CERT_EXPIRY = Gauge("fermoposta_tls_certificate_expiry_timestamp_seconds",
                    "When the provider's TLS certificate ([tls] cert) expires: notAfter, "
                    "Unix time", registry=None)
_cert_expiry_registered = False


def set_certificate_expiry(timestamp: float | None) -> None:
    """Export the certificate's notAfter, or (None) no series at all."""
    global _cert_expiry_registered
    if timestamp is None:
        if _cert_expiry_registered:
            REGISTRY.unregister(CERT_EXPIRY)
            _cert_expiry_registered = False
        return
    CERT_EXPIRY.set(timestamp)
    if not _cert_expiry_registered:
        REGISTRY.register(CERT_EXPIRY)
        _cert_expiry_registered = True


CONNECTIONS = Counter("fermoposta_connections_total", "Connections accepted, by listener",
                      ["listener"])
CONNECTIONS_REFUSED = Counter("fermoposta_connections_refused_total",
                              "Connections refused by the connection limits", ["listener"])
SESSION_SECONDS = Histogram("fermoposta_session_duration_seconds",
                            "Duration of server sessions, by listener", ["listener"],
                            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800))
MESSAGES_RECEIVED = Counter("fermoposta_messages_received_total",
                            "Messages accepted and stored (250 sent), by listener", ["listener"])
MESSAGE_BYTES = Counter("fermoposta_received_bytes_total",
                        "Bytes of messages accepted, by listener", ["listener"])
RECIPIENTS = Counter("fermoposta_recipients_total",
                     "Recipient outcomes by way (odmr, outbound) and status "
                     "(sent, deferred, bounced, expired)", ["way", "status"])
DELIVERY_SECONDS = Histogram("fermoposta_delivery_duration_seconds",
                             "Time to hand one message to the next hop, by way", ["way"],
                             buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600))
ATRN_SESSIONS = Counter("fermoposta_atrn_total",
                        "ATRN commands by result (reversed, no_mail, refused, busy, "
                        "unavailable, syntax, not_authenticated)", ["result"])
ATRN_WAITS = Counter("fermoposta_atrn_waits_total",
                     "Fruitless ATRNs that waited for mail, by how the wait ended (woken, "
                     "timeout, shutdown, client, full: max_waiting reached, no wait)",
                     ["outcome"])
ATRN_WAIT_SECONDS = Histogram("fermoposta_atrn_wait_seconds",
                              "How long waiting ATRNs waited",
                              buckets=(0.1, 0.5, 1, 5, 15, 60, 180, 300, 540, 600))
ATRN_WAITING = Gauge("fermoposta_atrn_waiting", "ATRN sessions waiting for mail now")
AUTH_FAILURES = Counter("fermoposta_auth_failures_total",
                        "Failed AUTH attempts, by mechanism", ["mechanism"])
AUTH_LOCKOUTS = Counter("fermoposta_auth_lockouts_total",
                        "Lockouts started by the AUTH throttle, by kind (address, account)",
                        ["kind"])
AUTH_THROTTLED = Counter("fermoposta_auth_throttled_total",
                         "AUTH commands refused by the throttle, by kind (address: 421, "
                         "account: 454)", ["kind"])
AUTH_DELAY_SECONDS = Counter("fermoposta_auth_delay_seconds_total",
                             "Time failed AUTH replies were held back by the throttle")

# Why a MAIL, RCPT, end of DATA or AUTH was refused, by listener: the
# fixed set below, so that a peer can never grow the label.  postfix_exporter
# counts its NOQUEUE reject lines by code; ours are counted by cause.
REJECT_REASONS = ("relay_denied", "unknown_user", "message_size", "smuggling", "auth_failed",
                  "rate_limit", "quota", "other")
REJECTS = Counter("fermoposta_smtp_rejects_total",
                  "Refused MAIL, RCPT, end of DATA and AUTH, by listener and reason "
                  "(relay_denied, unknown_user, message_size, smuggling, auth_failed, "
                  "rate_limit, quota, other)", ["listener", "reason"])

# The listeners that speak implicit TLS share their session class with the
# plain one: the session tells them apart by TLS being on from the start.
_IMPLICIT_TLS_LISTENERS = {"odmr": "odmr_tls", "submission": "submissions"}


def listener_name(component: str, implicit_tls: bool) -> str:
    """The `listener` label of a session: its component (mx, odmr,
    submission, outbox, customer), or odmr_tls / submissions when TLS was
    on before the first byte."""
    if implicit_tls:
        return _IMPLICIT_TLS_LISTENERS.get(component, component)
    return component


def reject(listener: str, reason: str) -> None:
    """Count one refusal; an unknown reason counts as `other`."""
    REJECTS.labels(listener, reason if reason in REJECT_REASONS else "other").inc()


CUSTOMER_PULLS = Counter("fermoposta_customer_pulls_total",
                         "Customer sessions by pull block and result", ["pull", "result"])
CUSTOMER_MESSAGES = Counter("fermoposta_customer_messages_total",
                            "Messages pulled and delivered locally, by pull block", ["pull"])
CUSTOMER_LAST_SUCCESS = Gauge("fermoposta_customer_last_success_timestamp_seconds",
                              "When a pull block last worked (Unix time)", ["pull"])


class DomainFigures(Protocol):
    """What the per-domain gauges read of one domain (`store.DomainShape`)."""

    @property
    def domain(self) -> str: ...
    @property
    def messages(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def oldest(self) -> float | None: ...
    @property
    def held(self) -> int: ...


class QueueFigures(Protocol):
    """`store.QueueShape`: its per-domain rows."""

    @property
    def domains(self) -> Sequence[DomainFigures]: ...


class AccountFigures(Protocol):
    """What the per-account gauge reads of one account (`store.Account`)."""

    @property
    def name(self) -> str: ...
    @property
    def last_atrn_at(self) -> float | None: ...


class QueueCollector(Collector):
    """Queue size by state at scrape time: messages, bytes, oldest age.

    `summary()` returns rows (state, messages, bytes, oldest received_at).
    With `shape` (`store.queue_shape`, `[metrics] per_domain`) the held mail
    of each domain with held recipients too; with `accounts`
    (`store.list_accounts`, `[metrics] per_account`) each account's last
    accepted ATRN (accounts that never made one have no series)."""

    def __init__(self, summary: Callable[[], Iterable[tuple[str, int, int, float | None]]],
                 clock: Callable[[], float] = time.time, *,
                 shape: Callable[[float, Sequence[float]], QueueFigures] | None = None,
                 accounts: Callable[[], Iterable[AccountFigures]] | None = None) -> None:
        self.summary = summary
        self.clock = clock
        self.shape = shape
        self.accounts = accounts

    def collect(self) -> Iterable[Any]:
        messages = GaugeMetricFamily("fermoposta_queue_messages",
                                     "Messages in the queue, by recipient state", labels=["state"])
        size = GaugeMetricFamily("fermoposta_queue_bytes", "Bytes in the queue, by state",
                                 labels=["state"])
        oldest = GaugeMetricFamily("fermoposta_queue_oldest_age_seconds",
                                   "Age of the oldest message, by state", labels=["state"])
        now = self.clock()
        try:
            rows = list(self.summary())
        except Exception:  # a scrape must not fail because the store is busy
            rows = []
        for state, count, total, first in rows:
            messages.add_metric([state], count)
            size.add_metric([state], total)
            oldest.add_metric([state], max(0.0, now - first) if first else 0.0)
        yield messages
        yield size
        yield oldest
        if self.shape is not None:
            yield from self._per_domain(now)
        if self.accounts is not None:
            yield self._per_account()

    def _per_domain(self, now: float) -> Iterable[Any]:
        messages = GaugeMetricFamily(
            "fermoposta_domain_held_messages",
            "Messages in the queue for a hosted domain with held mail", labels=["domain"])
        size = GaugeMetricFamily("fermoposta_domain_held_bytes",
                                 "Bytes of those messages, by domain", labels=["domain"])
        oldest = GaugeMetricFamily("fermoposta_domain_held_oldest_age_seconds",
                                   "Age of the oldest of them, by domain", labels=["domain"])
        assert self.shape is not None
        try:
            # No age buckets: one, unused; the per-domain rows are what we need.
            domains = [d for d in self.shape(now, ()).domains if d.held > 0]
        except Exception:  # a scrape must not fail because the store is busy
            domains = []
        for d in domains:
            messages.add_metric([d.domain], d.messages)
            size.add_metric([d.domain], d.bytes)
            oldest.add_metric([d.domain], max(0.0, now - d.oldest) if d.oldest else 0.0)
        yield messages
        yield size
        yield oldest

    def _per_account(self) -> Any:
        last = GaugeMetricFamily("fermoposta_account_last_atrn_timestamp_seconds",
                                 "When an account's last ATRN was accepted (250 or 453 "
                                 "no mail; Unix time)", labels=["account"])
        assert self.accounts is not None
        try:
            accounts = list(self.accounts())
        except Exception:  # as above
            accounts = []
        for account in accounts:
            if account.last_atrn_at is not None:
                last.add_metric([account.name], account.last_atrn_at)
        return last


def register_queue(collector: QueueCollector) -> Callable[[], None]:
    """Register the collector; returns a function that unregisters it."""
    REGISTRY.register(collector)

    def unregister() -> None:
        REGISTRY.unregister(collector)

    return unregister


def serve(host: str, port: int) -> tuple[tuple[str, int], Callable[[], None]]:
    """Start the scrape endpoint; returns the bound address and a stop function."""
    server, thread = start_http_server(port, addr=host)
    address = server.server_address

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return (str(address[0]), int(address[1])), stop
