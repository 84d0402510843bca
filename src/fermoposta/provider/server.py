"""The provider daemon: MX and ODMR listeners over one store.

Contract:
- `Provider(config, store)` builds the TLS context and session settings from
  the config; `start()` binds every configured listener (port 0 allowed, the
  bound addresses are returned, which the tests use) and `stop()` stops
  accepting, lets sessions finish for a grace period and cancels the rest
  (leases are released by the sessions' `finally`, or expire).
- Connection limits, per listener (issue 8): each listener (mx, odmr,
  odmr_tls, submission, submissions) counts its own sessions; beyond its
  `max_connections` or its `max_connections_per_ip` from one address
  (`[connections]`, defaults from `[limits]`) a new peer gets 421 4.7.0 and
  is closed before any dialog.  A flood on one listener never refuses
  connections on another.
- One `AuthThrottle` (`anvil`) for the ODMR and submission listeners
  together, given to each session's `Authenticator`: failed AUTHs are
  delayed and lock out addresses and accounts across connections.  It keeps
  its counts over a SIGHUP (only its settings change).
- Waiting ATRNs (issue 12): one `HeldMailWatch` (`provider.atrn_wait`) per
  provider, given to every ODMR session; the group commit wakes it for
  held mail this process stored.  A listener's `max_connections` leaves out
  its sessions that wait (they count against `[odmr] max_waiting`); `stop()`
  ends every wait at once (421) before the grace period.
- It also runs the outbound runner (delivery of submissions and DSNs to the
  Internet) and the hold expirer; a stored submission wakes the runner, and
  so does an ETRN that released held mail (`provider.etrn`, on the MX).
- The server certificate's dates (issue 11): `start()` and `reload()` read
  its notAfter into `fermoposta_tls_certificate_expiry_timestamp_seconds`;
  an expired or not yet valid one is refused (`ConfigError`).  While it
  expires within 21 days, the provider logs a warning at start and then once
  a day (`check_certificate`, on the `clock` it is given); an expired one,
  an error, daily too.
- `[web] listen` starts the status page (`provider.web`, issue 12) on the
  same store, AUTH throttle and pull `activity`, over TLS with the ODMR
  listeners' context (client certificates for operator logins).
- A listener (or the metrics endpoint or the status page) that cannot bind raises `ListenError`,
  naming the listener and the address; what had started is stopped again.
- `run(config)` is `fermoposta provider run`: logging, store, listeners,
  SIGTERM/SIGINT for a clean stop, a last line ``stopped``; returns an
  exit code.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from fermoposta.config import ConfigError, ProviderConfig, load_provider_config
from fermoposta.mail.anvil import AuthThrottle, ThrottleSettings
from fermoposta.net.busy_poll import new_event_loop
from fermoposta.net.connection import Connection, start_server
from fermoposta.net.server_session import ServerSession, SessionLimits
from fermoposta.ops import certs, metrics
from fermoposta.ops.log import setup_logging
from fermoposta.provider.activity import Activity
from fermoposta.provider.atrn_wait import HeldMailWatch
from fermoposta.provider.drain import DrainSettings
from fermoposta.provider.etrn import EtrnService
from fermoposta.provider.expiry import HoldExpirer
from fermoposta.provider.mx import MXSession
from fermoposta.provider.odmr import ODMRSession, ODMRSettings
from fermoposta.provider.outbound import OutboundRunner
from fermoposta.provider.storage import open_provider_store, store_description
from fermoposta.provider.submission import RateLimiter, SubmissionSession, SubmissionSettings
from fermoposta.smtp.reply import Reply
from fermoposta.store.base import NewMessage, RecipientState, SchemaTooNew, Store, StoreError
from fermoposta.store.group_commit import GroupCommit

if TYPE_CHECKING:
    from fermoposta.provider.web.app import WebServer

log = logging.getLogger("fermoposta.provider")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")

#: How often the running provider looks at its certificate's dates; it warns
#: at most once a day (`CERT_WARNING_EVERY`), however often it looks, so a
#: process suspended past a check still warns soon after it wakes.
CERT_CHECK_INTERVAL = 3600.0
CERT_WARNING_EVERY = 86400.0


class ListenError(OSError):
    """A listener could not bind: ``cannot listen on mx 127.0.0.1:25: [Errno 98] ...``."""

    def __init__(self, listener: str, address: tuple[str, int], cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.listener, self.address, self.cause = listener, address, cause

    def __str__(self) -> str:
        host, port = self.address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # asyncio's message repeats the address; the errno's text says it all.
        why = (f"[Errno {self.cause.errno}] {os.strerror(self.cause.errno)}"
               if self.cause.errno else str(self.cause))
        return f"cannot listen on {self.listener} {where}: {why}"


def certificate_validity(config: ProviderConfig, now: float) -> certs.Validity | None:
    """The `[tls] cert` dates (None without TLS).  `ConfigError` when the
    certificate cannot be used now: the config check refuses the same one,
    but a file may change (or a date pass) between the check and the start."""
    if config.tls.cert is None:
        return None
    try:
        validity = certs.validity_of_file(config.tls.cert)
    except ValueError as exc:
        raise ConfigError(f"{config.path}: [tls] cert: cannot read the certificate's "
                          f"dates: {exc}") from exc
    problem = validity.problem(now)
    if problem is not None:
        raise ConfigError(f"{config.path}: [tls] cert: {problem}")
    return validity


def server_tls_context(config: ProviderConfig, *, client_certificates: bool
                       ) -> ssl.SSLContext | None:
    """The TLS context of a listener.  Only the ODMR listeners ask for client
    certificates (for AUTH EXTERNAL): the MX must not, or a sender with a
    certificate from another CA would fail the handshake."""
    if config.tls.cert is None or config.tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    if client_certificates and config.tls.client_ca is not None:
        # Client certificates are optional (most peers have none) but, when
        # sent, must verify against the CA: only then is EXTERNAL offered.
        context.load_verify_locations(cafile=str(config.tls.client_ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def throttle_settings(config: ProviderConfig) -> ThrottleSettings:
    t = config.auth_throttle
    return ThrottleSettings(failure_delay=t.failure_delay, max_delay=t.max_delay,
                            max_failures_per_ip=t.max_failures_per_ip,
                            max_failures_per_account=t.max_failures_per_account,
                            window=t.window, lockout=t.lockout)


def session_limits(config: ProviderConfig) -> SessionLimits:
    lim = config.limits
    return SessionLimits(
        command_timeout=lim.command_timeout,
        data_timeout=lim.data_timeout,
        tls_handshake_timeout=lim.tls_handshake_timeout,
        max_errors=lim.max_errors,
        max_message_size=lim.max_message_size,
        max_recipients=lim.max_recipients,
        max_line_length=lim.max_line_length,
        # 0 in the config means no deadline.
        data_deadline=lim.data_deadline or None,
        session_deadline=lim.session_deadline or None,
    )


class Provider:
    def __init__(self, config: ProviderConfig, store: Store, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        # One group commit for the MX and submission: messages their sessions
        # finish at the same moment share one durable commit.
        self.intake = GroupCommit(store, on_stored=self._stored)
        # Fruitless ATRNs of accounts with --atrn-wait wait here (issue 12).
        self.held_watch = HeldMailWatch(store, poll_interval=config.odmr.wait_poll_interval,
                                        max_waiting=config.odmr.max_waiting)
        self.clock = clock
        self.cert_validity = certificate_validity(config, clock())
        self._cert_warned_at: float | None = None  # the clock when we last warned
        self._cert_task: asyncio.Task[None] | None = None
        self.auth_throttle = AuthThrottle(throttle_settings(config))
        self.activity = Activity()  # pulls in progress and done, for the status page
        self.mx_tls_context = server_tls_context(config, client_certificates=False)
        self.tls_context = server_tls_context(config, client_certificates=True)
        self._apply(config)
        self.rate_limiter = RateLimiter(store, config.submission.rate_limit,
                                        config.submission.rate_window)
        # ETRN on the MX (RFC 1985): releases held mail to the outbound runner.
        self.etrn = EtrnService(store, interval=config.mx.etrn_interval, wake=self._queued)
        # Called after each submission; the outbound runner sets it to its wake().
        self.on_queued: Callable[[], None] | None = None
        self.servers: list[asyncio.Server] = []
        self.sessions: set[asyncio.Task[None]] = set()
        # Per listener: its sessions and their count by client address.
        self.listener_sessions: dict[str, set[asyncio.Task[None]]] = \
            collections.defaultdict(set)
        self.per_ip: dict[str, collections.Counter[str]] = \
            collections.defaultdict(collections.Counter)
        self.addresses: dict[str, tuple[str, int]] = {}

    def _stored(self, messages: Sequence[NewMessage]) -> None:
        """The MX or submission committed `messages`: wake waiting ATRNs at once."""
        self.held_watch.notify({r.domain for m in messages for r in m.recipients
                                if r.state is RecipientState.HELD})

    def _apply(self, config: ProviderConfig) -> None:
        """The settings new sessions are made with (at start and on reload)."""
        self.config = config
        if hasattr(self, "held_watch"):
            self.held_watch.max_waiting = config.odmr.max_waiting
            self.held_watch.poll_interval = config.odmr.wait_poll_interval
        self.limits = session_limits(config)
        self.auth_throttle.settings = throttle_settings(config)
        odmr = config.odmr
        self.odmr_settings = ODMRSettings(
            mechanisms=odmr.mechanisms,
            allow_plaintext_auth=odmr.allow_plaintext_auth,
            require_tls=odmr.require_tls,
            max_auth_failures=odmr.max_auth_failures,
            min_atrn_interval=odmr.min_atrn_interval,
            lease_ttl=odmr.lease_ttl,
            no_mail_reply=odmr.no_mail_reply,
        )
        self.drain_settings = DrainSettings(
            greeting_timeout=odmr.greeting_timeout,
            command_timeout=config.limits.command_timeout,
            data_block_timeout=config.limits.data_timeout,
            final_reply_timeout=odmr.final_reply_timeout,
            lease_ttl=odmr.lease_ttl,
            max_messages=odmr.max_messages_per_session,
        )
        self.submission_settings = SubmissionSettings(
            mechanisms=odmr.mechanisms,
            allow_plaintext_auth=odmr.allow_plaintext_auth,
            require_tls=odmr.require_tls,
            max_auth_failures=odmr.max_auth_failures,
            restrict_senders=config.submission.restrict_senders,
        )

    def reload(self, config: ProviderConfig) -> list[str]:
        """SIGHUP: take a re-read config for new sessions and reload the TLS
        certificate and key in place (the listeners, implicit-TLS ones
        included, use them from the next handshake on).  Sessions in progress
        keep their settings.  Accounts and domains live in the store and need
        no reload.  Returns what was NOT applied (needs a restart)."""
        ignored = [name for name in ("hostname", "listen", "data_dir", "outbound", "hold",
                                     "metrics", "log", "store", "web")
                   if getattr(config, name) != getattr(self.config, name)]
        # What needs a restart keeps its running value, so that everything
        # (listeners, outbound delivery, expiry, logging) stays consistent.
        config = dataclasses.replace(config, hostname=self.config.hostname,
                                     listen=self.config.listen, data_dir=self.config.data_dir,
                                     outbound=self.config.outbound, hold=self.config.hold,
                                     metrics=self.config.metrics, log=self.config.log,
                                     store=self.config.store, web=self.config.web)
        if (config.tls.cert is None) != (self.config.tls.cert is None) \
                or config.tls.client_ca != self.config.tls.client_ca:
            ignored.append("tls (turning TLS on or off, or client_ca)")
        elif config.tls.cert is not None and config.tls.key is not None:
            # Before loading: an expired certificate raises and changes nothing.
            validity = certificate_validity(config, self.clock())
            for context in (self.mx_tls_context, self.tls_context):
                if context is not None:
                    context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
            self.cert_validity = validity
            self._cert_warned_at = None  # a new certificate: say at once if it is short-lived
            self._publish_certificate()
            self.check_certificate()
        self.etrn.interval = config.mx.etrn_interval
        if config.submission.rate_limit != self.rate_limiter.limit or \
                config.submission.rate_window != self.rate_limiter.window:
            self.rate_limiter.limit = config.submission.rate_limit
            self.rate_limiter.window = config.submission.rate_window
        self._apply(config)
        return ignored

    # --- session factories -----------------------------------------------------------------
    def mx_session(self, conn: Connection) -> ServerSession:
        return MXSession(conn, hostname=self.config.hostname, limits=self.limits,
                         tls_context=self.mx_tls_context, store=self.store,
                         require_valid_recipient=self.config.mx.require_valid_recipient,
                         intake=self.intake, etrn=self.etrn)

    def odmr_session(self, conn: Connection) -> ServerSession:
        session = ODMRSession(conn, hostname=self.config.hostname, limits=self.limits,
                              store=self.store, settings=self.odmr_settings,
                              drain_settings=self.drain_settings,
                              tls_context=self.tls_context, watch=self.held_watch)
        session.auth.throttle = self.auth_throttle
        session.activity = self.activity
        return session

    def submission_session(self, conn: Connection) -> ServerSession:
        session = SubmissionSession(conn, hostname=self.config.hostname, limits=self.limits,
                                    store=self.store, settings=self.submission_settings,
                                    rate_limiter=self.rate_limiter,
                                    tls_context=self.tls_context, on_queued=self._queued,
                                    intake=self.intake)
        session.auth.throttle = self.auth_throttle
        return session

    def _queued(self) -> None:
        if self.on_queued is not None:
            self.on_queued()

    def _handler(self, listener: str, factory: Callable[[Connection], ServerSession]
                 ) -> Callable[[Connection], Awaitable[None]]:
        connections = metrics.CONNECTIONS.labels(listener)  # looked up once, not per session
        session_seconds = metrics.SESSION_SECONDS.labels(listener)

        async def handle(conn: Connection) -> None:
            task = asyncio.current_task()
            assert task is not None
            ip = conn.peer_ip
            # Counted per listener (issue 8): idle MX connections must never
            # use up the slots of the customers' ODMR and submission.
            sessions, per_ip = self.listener_sessions[listener], self.per_ip[listener]
            total, from_one = self.config.connections.limits_for(listener, self.config.limits)
            # ATRNs waiting for mail have their own limit ([odmr] max_waiting).
            busy = len(sessions) - self.held_watch.waiting_on(listener)
            if busy >= total or per_ip[ip] >= from_one:
                metrics.CONNECTIONS_REFUSED.labels(listener).inc()
                log.warning("too many connections on %s (%s): refusing [%s]", listener,
                            "from this address" if per_ip[ip] >= from_one else "in total", ip)
                with contextlib.suppress(Exception):
                    await conn.write(TOO_MANY_CONNECTIONS.to_bytes(), 5.0)
                await conn.close(1.0)
                return
            self.sessions.add(task)
            sessions.add(task)
            per_ip[ip] += 1
            connections.inc()
            started = time.monotonic()
            try:
                session = factory(conn)
                if isinstance(session, ODMRSession):
                    session.listener = listener
                await session.run()
            finally:
                session_seconds.observe(time.monotonic() - started)
                self.sessions.discard(task)
                sessions.discard(task)
                per_ip[ip] -= 1
                if per_ip[ip] <= 0:
                    del per_ip[ip]

        return handle

    async def start(self) -> dict[str, tuple[str, int]]:
        listen = self.config.listen
        plan: list[tuple[str, tuple[str, int] | None, Callable[[Connection], ServerSession],
                         ssl.SSLContext | None]] = [
            ("mx", listen.mx, self.mx_session, None),
            ("odmr", listen.odmr, self.odmr_session, None),
            ("submission", listen.submission, self.submission_session, None),
        ]
        if listen.odmr_tls is not None:
            if self.tls_context is None:
                raise ValueError("[listen] odmr_tls needs [tls] cert and key")
            plan.append(("odmr_tls", listen.odmr_tls, self.odmr_session, self.tls_context))
        if listen.submissions is not None:
            if self.tls_context is None:
                raise ValueError("[listen] submissions needs [tls] cert and key")
            plan.append(("submissions", listen.submissions, self.submission_session,
                         self.tls_context))
        try:
            await self._start(plan)
        except BaseException:
            # Nothing half-started stays behind (listeners already bound,
            # the outbound runner): the caller only sees the error.
            await self.stop(grace=0.0)
            raise
        return self.addresses

    async def _start(self, plan: list[tuple[str, tuple[str, int] | None,
                                            Callable[[Connection], ServerSession],
                                            ssl.SSLContext | None]]) -> None:
        try:
            # Bodies a killed process was storing while they arrived: that
            # mail never got its 250 (sqlite_stage).
            await asyncio.to_thread(self.store.sweep_stages)
        except StoreError as exc:
            log.warning("could not sweep bodies left by a stopped process: %s", exc)
        for name, address, factory, context in plan:
            if address is None:
                continue
            try:
                server = await start_server(
                    self._handler(name, factory), address[0], address[1], ssl_context=context,
                    tls_handshake_timeout=self.config.limits.tls_handshake_timeout,
                )
            except OSError as exc:
                raise ListenError(name, address, exc) from exc
            self.servers.append(server)
            sockname = server.sockets[0].getsockname()
            self.addresses[name] = (str(sockname[0]), int(sockname[1]))
            log.info("listening for %s on %s:%d", name, sockname[0], sockname[1])
        # Delivery to the Internet (submissions, DSNs) and expiry of held mail.
        self.runner = OutboundRunner(self.config, self.store)
        self.expirer = HoldExpirer(self.config, self.store, on_outbound_dsn=self.runner.wake)
        self.on_queued = self.runner.wake
        await self.runner.start()
        await self.expirer.start()
        await self.held_watch.start()
        self._publish_certificate()
        self.check_certificate()
        if self.cert_validity is not None:
            self._cert_task = asyncio.create_task(self._watch_certificate(),
                                                  name="certificate-dates")
        if self.config.metrics.listen is not None:
            host, port = self.config.metrics.listen
            metrics.set_node(self.store.node, self.config.store.engine)
            try:
                self.addresses["metrics"], stop_server = metrics.serve(host, port)
            except OSError as exc:
                raise ListenError("metrics", (host, port), exc) from exc
            unregister = metrics.register_queue(metrics.QueueCollector(
                self.store.queue_summary,
                shape=self.store.queue_shape if self.config.metrics.per_domain else None,
                accounts=self.store.list_accounts if self.config.metrics.per_account else None))

            def stop_metrics() -> None:
                stop_server()
                unregister()

            self._stop_metrics = stop_metrics
            log.info("metrics on http://%s:%d/metrics", *self.addresses["metrics"])
        if self.config.web.listen is not None:
            await self._start_web(*self.config.web.listen)

    async def _start_web(self, host: str, port: int) -> None:
        """The status page (`provider.web`), on `[web] listen`."""
        from fermoposta.provider.web.app import WebDeps, WebServer
        from fermoposta.provider.web.history import History

        web = self.config.web
        deps = WebDeps(store=self.store, throttle=self.auth_throttle, activity=self.activity,
                       history=History(self.store), hostname=self.config.hostname,
                       node=self.store.node, engine=self.config.store.engine,
                       operators_file=web.operators_file, session_idle=web.session_idle,
                       tls_context=self.tls_context,
                       certificate=lambda: self.cert_validity,
                       listeners=lambda: dict(self.addresses), clock=self.clock)
        server = WebServer(deps)
        try:
            self.addresses["web"] = await server.start(host, port)
        except OSError as exc:
            raise ListenError("web", (host, port), exc) from exc
        self.web = server
        scheme = "https" if deps.secure else "http"
        log.info("status page on %s://%s:%d/", scheme, *self.addresses["web"])

    # --- the certificate's dates ----------------------------------------------------------
    def _publish_certificate(self) -> None:
        metrics.set_certificate_expiry(
            None if self.cert_validity is None else self.cert_validity.not_after_timestamp)

    def check_certificate(self) -> None:
        """Log, at most once a day, that the certificate expires soon (a
        warning) or has expired while we run (an error: every handshake
        fails now).  Called at start, on reload and every hour."""
        validity = self.cert_validity
        if validity is None:
            return
        now = self.clock()
        problem = validity.problem(now)
        soon = validity.expiry_warning(now)
        if problem is None and soon is None:
            return
        if self._cert_warned_at is not None and now - self._cert_warned_at < CERT_WARNING_EVERY:
            return
        self._cert_warned_at = now
        cert = self.config.tls.cert
        if problem is not None:
            log.error("TLS certificate %s: %s; replace it and reload (SIGHUP)", cert, problem)
        else:
            log.warning("TLS certificate %s %s; replace it and reload (SIGHUP)", cert, soon)

    async def _watch_certificate(self) -> None:
        while True:
            await asyncio.sleep(CERT_CHECK_INTERVAL)
            self.check_certificate()

    _stop_metrics: Callable[[], None] | None = None
    web: WebServer | None = None
    runner: OutboundRunner | None = None
    expirer: HoldExpirer | None = None

    async def stop(self, grace: float = 10.0) -> None:
        if self._cert_task is not None:
            self._cert_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cert_task
            self._cert_task = None
        metrics.set_certificate_expiry(None)
        if self.web is not None:
            await self.web.stop()
            self.web = None
        if self._stop_metrics is not None:
            self._stop_metrics()
            self._stop_metrics = None
        for server in self.servers:
            server.close()  # stop accepting; established sessions go on
        # Waiting ATRNs end now (421), not after the grace period.
        await self.held_watch.shutdown()
        if self.sessions:
            _, pending = await asyncio.wait(set(self.sessions), timeout=grace)
            for task in pending:
                task.cancel()  # their `finally` releases leases; kept mail stays queued
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for server in self.servers:
            await server.wait_closed()
        if self.expirer is not None:
            await self.expirer.stop()
        if self.runner is not None:
            await self.runner.stop(grace=grace)


STORE_RETRY_INTERVAL = 5.0  # seconds between attempts to reach a PostgreSQL store


async def _open_store(config: ProviderConfig, stop: asyncio.Event) -> Store | None:
    """The configured store.  A SQLite store that cannot be opened is an error
    now; a PostgreSQL one is waited for (a database restarting must not make
    a crash loop of every node), until `stop` (SIGTERM/SIGINT)."""
    while True:
        try:
            return await asyncio.to_thread(open_provider_store, config, presize_wal=True)
        except (StoreError, OSError) as exc:
            log.error("cannot open the %s: %s", store_description(config), exc)
            if config.store.engine != "postgresql" or isinstance(exc, OSError | SchemaTooNew):
                return None
        log.info("retrying in %g s", STORE_RETRY_INTERVAL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STORE_RETRY_INTERVAL)
        if stop.is_set():
            return None


async def _serve(config: ProviderConfig) -> int:
    # Every store call runs in a worker thread; a PostgreSQL store's calls
    # wait on the network, so more of them than asyncio's default (cores + 4)
    # may be in flight, up to the pool's connections and a few more.  (SQLite
    # serialises its calls on one lock: more threads there only contend.)
    if config.store.engine == "postgresql":
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=max(8, config.store.pool_size + 4), thread_name_prefix="store"))
    # The signal handlers go in first and stay for the whole run: a SIGTERM
    # that comes while the listeners open (a supervisor stopping a provider
    # it just started) is a clean stop once start-up is done, not a kill by
    # the default action; a SIGHUP then is too early to reload anything.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    running: list[Provider] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(running[0]) if running else
                            log.info("SIGHUP before the provider was ready: nothing to reload"))
    store = await _open_store(config, stop)
    if store is None:
        return 75  # EX_TEMPFAIL, like the admin commands
    log.info("%s opened; node %s", store_description(config), store.node)
    try:
        provider = Provider(config, store)
    except ConfigError as exc:
        log.error("%s", exc)
        store.close()
        return 78  # EX_CONFIG
    except (ssl.SSLError, OSError) as exc:
        log.error("cannot load the TLS certificate: %s", exc)
        store.close()
        return 78  # EX_CONFIG
    try:
        await provider.start()
    except ListenError as exc:
        log.error("%s", exc)
        store.close()
        return 71  # EX_OSERR
    except OSError as exc:
        log.error("cannot start: %s", exc)
        store.close()
        return 71  # EX_OSERR
    running.append(provider)
    log.info("fermoposta provider %s ready", config.hostname)
    await stop.wait()
    log.info("stopping: no new connections; waiting for sessions")
    await provider.stop(grace=provider.config.limits.shutdown_grace)
    store.close()
    # The last line: an operator (or a supervisor's log) sees the stop was clean.
    log.info("stopped")
    return 0


def _reload(provider: Provider) -> None:
    """SIGHUP: re-read the config file; a broken one changes nothing."""
    try:
        # Certificate warnings: reload() logs them (check_certificate), not stderr.
        config = load_provider_config(provider.config.path, warn=None)
        ignored = provider.reload(config)
    except (ConfigError, ssl.SSLError, OSError) as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return
    log.info("reloaded %s (certificate, limits, AUTH and ATRN settings)", config.path)
    if ignored:
        log.warning("not applied until a restart: %s", ", ".join(ignored))


def run(config: ProviderConfig) -> int:
    setup_logging(config.log.level, config.log.format,
                  node=config.store.node or socket.gethostname())
    # The loop polls briefly before it sleeps, for peers that answer fast
    # (net/busy_poll.py).
    spin = config.listen.busy_poll_us / 1e6
    with asyncio.Runner(loop_factory=lambda: new_event_loop(spin)) as runner:
        return runner.run(_serve(config))
