"""One customer session: lock, dial, AUTH, ATRN, reversed session, summary.

Contract:
- `pull_once()` runs one `[[pull]]` block and returns a `PullSummary`; every
  failure is a `CustomerError` carried in the summary with its exit code (0
  for success, mail or not).
- A per-pull lock file in `data_dir` (flock) makes sure two sessions of the
  same pull never overlap (a second `pull`, or `pull` beside `run`): the
  loser waits (`wait=True`) or fails with `AlreadyRunning` (exit 73).
- Local delivery happens inside the reversed session, before each 250: when
  the session ends, every message counted in the summary is committed
  locally, and every other message is still held at the provider.
- With an outbox (`outbox_push.outbox_active`), each session first pushes
  it to the provider's submission service (`outbox_push.push_outbox`, on its
  own connection, BEFORE the ATRN dial-out) and the summary gains its lines.
  A push that is busy elsewhere is skipped.
- After each session the local retry spool is retried
  (`local_retry.retry_local`: recipients taken from the provider whose local
  delivery failed for now) and the summary gains its line.  The exit code combines both
  (`combined_exit_code`): a failure of the pull other than 75 wins; then a
  push failure that needs a human (TLS 74, protocol 76, authentication 77,
  configuration 78, internal 70); a push that only kept mail for later (4xx,
  submission unreachable or lost: its mail stays in the outbox) gives 75.
- `check()` dials, verifies TLS and authenticates without ATRN, probes each
  block's local delivery (`delivery.probe`: LHLO/EHLO then QUIT, or the
  Maildir root's permissions; nothing is delivered or created) and returns
  the report lines `fermoposta customer check` prints; with an outbox it
  checks the submission service the same way.  A delivery failure has its
  own exit code (68 LMTP/SMTP target unavailable, 73 Maildir root unusable:
  `LocalDeliveryUnavailable`, `MaildirUnusable`, used by `check` only); the
  exit code is the first failed part's, and the report's last line is
  never an OK after a failed part (the first failure's line is repeated).
  After the TLS handshake it shows the provider certificate's notAfter, and
  a warning line (exit code unchanged) when that is within 21 days (`ops.certs.WARNING_DAYS`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fermoposta.customer.config import CustomerConfig, PullConfig
from fermoposta.customer.dialout import Dialer
from fermoposta.customer.errors import (
    AlreadyRunning,
    ConfigFailure,
    ConnectFailure,
    CustomerError,
    TemporaryFailure,
)
from fermoposta.customer.local_retry import (
    RetryResult,
    retry_local,
    spool_failures,
    spool_status,
)
from fermoposta.customer.serve import ReceivedMessage, reversed_session
from fermoposta.customer.site import dial_settings, make_delivery_for, pull_lock
from fermoposta.net.server_session import new_session_id
from fermoposta.ops import certs, metrics
from fermoposta.ops.log import event

if TYPE_CHECKING:
    from fermoposta.customer.outbox_push import PushResult

__all__ = ["LocalDeliveryUnavailable", "MaildirUnusable", "check", "dial_settings",
           "make_delivery_for", "pull_lock", "pull_once"]

log = logging.getLogger("fermoposta.customer")

#: Push exit codes that only mean "kept for later": the mail is safe in the outbox.
_PUSH_LATER = frozenset({0, AlreadyRunning.exit_code, ConnectFailure.exit_code,
                         TemporaryFailure.exit_code})


def combined_exit_code(pull_code: int, push: PushResult | None) -> int:
    """The exit code of a session with its outbox push; see the module docstring."""
    if push is None or pull_code not in (0, TemporaryFailure.exit_code):
        return pull_code
    code = push.exit_code
    if code not in _PUSH_LATER:
        return code
    if code in (ConnectFailure.exit_code, TemporaryFailure.exit_code):
        return TemporaryFailure.exit_code
    return pull_code


@dataclass(slots=True)
class PullSummary:
    name: str
    domains: tuple[str, ...]
    session_id: str
    started: float
    finished: float = 0.0
    had_mail: bool = False
    received: list[ReceivedMessage] = field(default_factory=list)
    refused: int = 0
    deferred: int = 0
    error: CustomerError | None = None
    push: PushResult | None = None  # the outbox push before ATRN, if any
    spooled: int = 0  # recipients taken into the local retry spool
    retry: RetryResult | None = None  # the local retry spool's run after the session
    # True while the ATRN waits for its reply (nothing received yet): the
    # daemon may cancel the pull then, e.g. on SIGTERM in push mode.
    awaiting_atrn: bool = False

    @property
    def pull_exit_code(self) -> int:
        """0 when the session worked, mail or not; 75 when the session worked
        but some local delivery was deferred (that mail is still held at the
        provider), so that cron notices a local target that is down."""
        if self.error is not None:
            return self.error.exit_code
        return TemporaryFailure.exit_code if self.deferred else 0

    @property
    def exit_code(self) -> int:
        """The pull's code combined with the outbox push's (`combined_exit_code`)."""
        return combined_exit_code(self.pull_exit_code, self.push)

    @property
    def messages(self) -> int:
        """Messages received: transactions of one provider message count once."""
        known = {m.provider_queue_id for m in self.received if m.provider_queue_id}
        return len(known) + sum(1 for m in self.received if not m.provider_queue_id)

    def lines(self) -> list[str]:
        push = self.push.lines() if self.push is not None else []
        retry = self.retry.lines() if self.retry is not None else []
        return self._pull_lines() + retry + push

    def _pull_lines(self) -> list[str]:
        what = ",".join(self.domains) or "all domains of the account"
        head = f"{self.name}: {what}: "
        if self.error is not None:
            return [head + f"failed ({self.error.kind}, exit {self.pull_exit_code}): "
                    f"{self.error}"]
        if not self.had_mail:
            return [head + "no mail"]
        out = [head + f"{self.messages} message(s) received"
               + (f", {self.refused} refused" if self.refused else "")
               + (f", {self.deferred} deferred (still held at the provider)"
                  if self.deferred else "")
               + (f", {self.spooled} kept in the local retry spool" if self.spooled else "")
               + f" in {self.finished - self.started:.1f}s"]
        for msg in self.received:
            ident = msg.provider_queue_id or "-"
            out.append(f"  {ident} from <{msg.sender}> to {', '.join(msg.recipients)}"
                       f" -> {msg.where}")
        return out


def new_summary(pull: PullConfig) -> PullSummary:
    return PullSummary(name=pull.name, domains=pull.domains, session_id=new_session_id(),
                       started=time.time())


async def pull_once(config: CustomerConfig, pull: PullConfig, *, wait: bool = False,
                    summary: PullSummary | None = None) -> PullSummary:
    if summary is None:
        summary = new_summary(pull)
    try:
        async with pull_lock(config.data_dir / f"pull-{pull.name}.lock", wait=wait):
            summary.push = await _push(config)
            await _session(config, pull, summary)
            summary.retry = await retry_local(config)
    except CustomerError as exc:
        summary.error = exc
    summary.finished = time.time()
    result = "ok" if summary.exit_code == 0 else (
        summary.error.kind if summary.error is not None else "deferred")
    metrics.CUSTOMER_PULLS.labels(pull.name, result).inc()
    metrics.CUSTOMER_MESSAGES.labels(pull.name).inc(summary.messages)
    if summary.error is None:
        metrics.CUSTOMER_LAST_SUCCESS.labels(pull.name).set(summary.finished)
    event("customer", None, session=summary.session_id, pull=pull.name,
          received=summary.messages, refused=summary.refused, deferred=summary.deferred,
          status="ok" if summary.error is None else summary.error.kind,
          reason=str(summary.error) if summary.error else None)
    return summary


async def _push(config: CustomerConfig) -> PushResult | None:
    """Push the outbox before ATRN (skipped when another push is running)."""
    from fermoposta.customer.outbox_push import outbox_active, push_outbox

    if not outbox_active(config):
        return None
    return await push_outbox(config, wait=False)


async def _session(config: CustomerConfig, pull: PullConfig, summary: PullSummary) -> None:
    dialer = Dialer(dial_settings(config))
    try:
        await dialer.connect()
        await dialer.authenticate()
        summary.awaiting_atrn = True
        try:
            conn = await dialer.atrn(pull.domains)
        finally:
            summary.awaiting_atrn = False
        if conn is None:
            return
        summary.had_mail = True
        delivery = make_delivery_for(config, pull)
        session = reversed_session(
            conn, hostname=config.hostname, accept_domains=frozenset(pull.accept_domains(config)),
            delivery=delivery, session_id=summary.session_id,
            max_message_size=config.max_message_size,
            spool=functools.partial(spool_failures, config),
        )
        try:
            await session.run()
        finally:
            await delivery.close()
        summary.received = session.received
        summary.refused = session.refused
        summary.deferred = session.deferred
        summary.spooled = session.spooled
        if not session.quit_seen:
            log.warning("%s: the provider closed the reversed session without QUIT",
                        summary.session_id)
    finally:
        await dialer.close()


class LocalDeliveryUnavailable(CustomerError):
    """`check` only: an LMTP or SMTP target is down or refuses LHLO/EHLO.
    68 (EX_NOHOST), not 69: `check` gives 69 to the provider unreachable, and
    a script must be able to tell "the link is down" from "our own mail
    server is down"."""

    exit_code = 68
    kind = "delivery"


class MaildirUnusable(CustomerError):
    """`check` only: a Maildir root cannot be written or created (73,
    EX_CANTCREAT; `check` takes no lock, so 73 cannot mean "busy" there)."""

    exit_code = 73
    kind = "maildir"


_PROBE_FAILURES: dict[str, type[CustomerError]] = {
    "unavailable": LocalDeliveryUnavailable, "maildir": MaildirUnusable,
}


async def check(config: CustomerConfig) -> tuple[int, list[str]]:
    """Connect, TLS, AUTH, no ATRN; each block's local delivery (probed, nothing
    delivered); with an outbox, the submission service the same way as the
    ODMR service: (exit code, report lines).

    The exit code is the first failed part's.  "OK: ready to pull" follows
    the ODMR service and the deliveries only when all of them passed, "OK:
    ready to push the outbox" the submission service when it passed; and the
    last line is never an OK after a failed part: then the first failure's
    line is repeated at the end (unless it is the last line already)."""
    from fermoposta.customer.outbox_push import outbox_active, submission_settings

    lines: list[str] = []
    p = config.provider
    try:
        settings = dial_settings(config)
    except CustomerError as exc:
        return exc.exit_code, [f"configuration: {exc}"]
    failures: list[tuple[int, str]] = []  # (exit code, the FAILED line) in report order

    def part(code: int) -> int:
        if code:
            failures.append((code, lines[-1]))
        return code

    pull_code = part(await _check_one(Dialer(settings), f"{p.host}:{p.port}", "", lines))
    for pull in config.pulls:
        pull_code = part(await _check_delivery(config, pull, lines)) or pull_code
    if pull_code == 0:
        lines.append("OK: ready to pull")
    status = spool_status(config)
    if status is not None:
        lines.append(status)
    if outbox_active(config):
        sub = part(await _check_one(Dialer(submission_settings(settings, config)),
                                    p.submission_address, "submission ", lines))
        if sub == 0:
            lines.append("OK: ready to push the outbox")
    if not failures:
        return 0, lines
    code, first = failures[0]
    if lines[-1] != first:
        lines.append(first)
    return code, lines


async def _check_delivery(config: CustomerConfig, pull: PullConfig, lines: list[str]) -> int:
    """One block's local delivery, probed (delivery/probe.py): connect and
    LHLO/EHLO then QUIT, or the Maildir root's permissions; never a message."""
    from fermoposta.customer.delivery.probe import probe

    label = f"delivery {pull.name}: "
    try:
        delivery = make_delivery_for(config, pull)
    except ValueError as exc:  # the config load checked it: should not happen
        failure: CustomerError = ConfigFailure(str(exc))
    else:
        try:
            result = await probe(delivery)
        finally:
            await delivery.close()
        if result.ok:
            lines.append(label + result.detail)
            return 0
        failure = _PROBE_FAILURES[result.problem](result.detail)
    lines.append(f"{label}FAILED ({failure.kind}, exit {failure.exit_code}): {failure}")
    return failure.exit_code


def certificate_lines(dialer: Dialer, now: float) -> list[str]:
    """The provider certificate's expiry, and a warning when it is near: the
    customer's side of the provider's own warning, since an expired
    certificate stops every pull (exit 74)."""
    der = dialer.conn.peer_certificate() if dialer.conn is not None else None
    if der is None:
        return []
    try:
        validity = certs.validity_of_der(der)
    except ValueError as exc:
        return [f"certificate dates: cannot be read ({exc})"]
    days = validity.days_left(now)
    out = [f"certificate expires on {certs.format_date(validity.not_after)} (notAfter), "
           f"in {days} day{'s' * (days != 1)}"]
    soon = validity.expiry_warning(now)
    if soon is not None:
        out.append(f"warning: the provider's certificate {soon}; pulls fail once it has "
                   "expired (tell the provider)")
    return out


async def _check_one(dialer: Dialer, where: str, label: str, lines: list[str]) -> int:
    username = dialer.settings.username
    try:
        await dialer.connect()
        r = dialer.report
        lines.append(f"{label}connected to {where}: {r.greeting}")
        lines.append(f"{label}TLS: {r.tls}"
                     + (f"; certificate {r.certificate}" if r.certificate else ""))
        lines.extend(label + line for line in certificate_lines(dialer, time.time()))
        caps = r.capabilities
        offered = "ATRN: offered; " if dialer.settings.require_atrn else ""
        lines.append(f"{label}{offered}AUTH: {caps.get('AUTH', '(none)')}")
        mech = await dialer.authenticate()
        lines.append(f"{label}AUTH {mech} as {username or '(certificate)'}: OK"
                     + (" (server signature verified)" if mech.startswith("SCRAM") else ""))
        await dialer.quit()
        return 0
    except CustomerError as exc:
        lines.append(f"{label}FAILED ({exc.kind}, exit {exc.exit_code}): {exc}")
        return exc.exit_code
    finally:
        await dialer.close()
