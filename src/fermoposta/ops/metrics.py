"""Prometheus metrics (issue 5): names, labels and the HTTP endpoint.

Contract:
- Metric names follow the Prometheus conventions (`fermoposta_` prefix,
  `_total` counters, `_seconds` and `_bytes` units) and carry bounded labels
  only: listener, result, mechanism, state, pull block, failure kind.  Never
  an address, a domain or an account name.
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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

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

CUSTOMER_PULLS = Counter("fermoposta_customer_pulls_total",
                         "Customer sessions by pull block and result", ["pull", "result"])
CUSTOMER_MESSAGES = Counter("fermoposta_customer_messages_total",
                            "Messages pulled and delivered locally, by pull block", ["pull"])
CUSTOMER_LAST_SUCCESS = Gauge("fermoposta_customer_last_success_timestamp_seconds",
                              "When a pull block last worked (Unix time)", ["pull"])


class QueueCollector(Collector):
    """Queue size by state at scrape time: messages, bytes, oldest age.

    `summary()` returns rows (state, messages, bytes, oldest received_at)."""

    def __init__(self, summary: Callable[[], Iterable[tuple[str, int, int, float | None]]],
                 clock: Callable[[], float] = time.time) -> None:
        self.summary = summary
        self.clock = clock

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
