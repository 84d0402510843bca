"""`fermoposta customer run`: pull every `[[pull]]` block on its schedule; run the outbox.

Contract:
- One task per pull block: pull at start, then after `next_delay()` (its
  interval or window interval, exponential backoff after consecutive
  failures, jitter).  Pulls of one block never overlap (the pull lock);
  blocks run independently.  Each pull pushes the outbox first (see
  `fermoposta.customer.pull`); only the pull's own outcome counts as a
  failure for its backoff.
- ``every = "push"`` (issue 12): the next pull starts at once after one
  that worked (mail or 453), so one ATRN always waits at the provider; after
  a failure the backoff applies as for any block.  A 453 that came at once
  (within `PUSH_PROMPT` seconds of the dial: the account does not wait, or
  the provider has no room) makes the next pull wait `PUSH_IDLE_RETRY`
  seconds, with a warning, so a provider that does not wait is not dialled
  in a loop.
- With ``[outbox] listen`` the daemon also runs the outbox listener, and with
  ``push = "continuous"`` the `ContinuousPusher` (`OutboxService`); the
  listener takes ``<data_dir>/outbox-serve.lock``, so it never runs twice
  (``fermoposta customer outbox serve`` runs the same service alone).
- SIGUSR1 triggers every block (and a continuous push) now (the on-demand
  trigger); SIGTERM and SIGINT stop the daemon: the listener stops accepting
  (its sessions get up to 10 s to end; a session cut before its 250 leaves
  nothing in the spool, the client keeps the message), then the sessions in
  progress end (a session is never cut in the middle by us: mail already
  acknowledged is committed, the rest stays held at the provider or in the
  outbox); an ATRN still waiting for its reply (push) is ended at once.
- A second daemon on the same `data_dir` exits 73 (its lock is taken); an
  outbox address that cannot be bound exits 71, an unreadable users file 78,
  an outbox spool that cannot be opened 75.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import AsyncIterator
from datetime import datetime

from fermoposta.customer.config import CustomerConfig, PullConfig
from fermoposta.customer.errors import ConfigFailure, CustomerError, TemporaryFailure
from fermoposta.customer.outbox import OutboxServer, open_outbox
from fermoposta.customer.outbox_push import ContinuousPusher
from fermoposta.customer.pull import new_summary, pull_lock, pull_once
from fermoposta.customer.schedule import PUSH, interval_at, next_delay
from fermoposta.ops import metrics
from fermoposta.store import StoreError

log = logging.getLogger("fermoposta.customer")

OUTBOX_SERVE_LOCK = "outbox-serve.lock"
PUSH_PROMPT = 5.0  # seconds: "no mail" sooner than this after the dial did not wait
PUSH_IDLE_RETRY = 60.0  # seconds before the next dial after such a 453
OUTBOX_GRACE = 10.0


class OutboxService:
    """The outbox listener, and the continuous pusher when configured."""

    def __init__(self, config: CustomerConfig, stop: asyncio.Event,
                 rng: random.Random | None = None) -> None:
        if not config.outbox.enabled:
            raise ConfigFailure(f"{config.path}: [outbox] listen: not configured "
                                "(no outbox to serve)")
        self.config = config
        self.stop = stop
        self.rng = rng
        self.server: OutboxServer | None = None
        self.pusher: ContinuousPusher | None = None

    def wake(self) -> None:
        if self.pusher is not None:
            self.pusher.wake()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[OutboxService]:
        async with pull_lock(self.config.data_dir / OUTBOX_SERVE_LOCK, wait=False,
                             busy="the outbox listener of this data_dir is already running"):
            try:
                store = await asyncio.to_thread(open_outbox, self.config)
            except StoreError as exc:
                raise TemporaryFailure(f"cannot open the outbox spool: {exc}") from exc
            try:
                if self.config.outbox.continuous:
                    self.pusher = ContinuousPusher(self.config, store, self.stop, self.rng)
                self.server = OutboxServer(self.config, store, on_queued=self.wake)
                await self.server.start()
                task = asyncio.create_task(self.pusher.run()) if self.pusher else None
                try:
                    yield self
                finally:
                    await self.server.stop(OUTBOX_GRACE)
                    if task is not None:
                        await _finish(task, self.config.provider.command_timeout + 60)
            finally:
                store.close()


async def _finish(task: asyncio.Task[None], timeout: float) -> None:
    """Wait for `task` (its stop event is set) up to `timeout`, then cancel it."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


class Daemon:
    def __init__(self, config: CustomerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.stop = asyncio.Event()
        self.triggers = {pull.name: asyncio.Event() for pull in config.pulls}
        self.runs = {pull.name: 0 for pull in config.pulls}
        self.outbox: OutboxService | None = None

    def trigger_all(self) -> None:
        log.info("on-demand trigger: pulling every block now")
        for event in self.triggers.values():
            event.set()
        if self.outbox is not None:
            self.outbox.wake()

    async def loop(self, pull: PullConfig) -> None:
        failures = 0
        trigger = self.triggers[pull.name]
        while not self.stop.is_set():
            trigger.clear()
            summary = new_summary(pull)
            task = asyncio.ensure_future(pull_once(self.config, pull, wait=True,
                                                   summary=summary))
            stopping = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            while not task.done():
                # Stopping.  An ATRN still waiting for its reply has received
                # nothing: end it now (a push block's waits up to 9 minutes);
                # anything else is never cut in the middle.
                if summary.awaiting_atrn:
                    log.info("%s: stopping: ending the ATRN that waits for mail", pull.name)
                    task.cancel()
                await asyncio.wait({task}, timeout=0.2)
            stopping.cancel()
            if task.cancelled():
                return
            summary = task.result()
            self.runs[pull.name] += 1
            for line in summary.lines():
                log.info("%s", line)
            # The pull's own outcome drives its backoff: a push that failed
            # (its mail waits in the outbox) must not slow down collecting mail.
            failures = 0 if summary.pull_exit_code == 0 else failures + 1
            now = datetime.now()
            delay = next_delay(pull.schedule, now, failures, self.rng)
            # Nothing came: a 453, or a 250 then QUIT (RFC 2645 §5.2.1 allows
            # either for "no mail"), or a session cut short.
            received_nothing = (summary.messages == 0 and not summary.refused
                                and not summary.deferred)
            if (interval_at(pull.schedule, now) == PUSH and not failures
                    and received_nothing
                    and summary.finished - summary.started < PUSH_PROMPT):
                log.warning("%s: every = \"push\" but the provider answered ATRN at once "
                            "with no mail (does the account have --atrn-wait?); next pull "
                            "in %gs", pull.name, PUSH_IDLE_RETRY)
                delay = PUSH_IDLE_RETRY
            elif delay == 0:
                log.debug("%s: push: dialling again now", pull.name)
            if delay:
                log.info("%s: next pull in %.0fs", pull.name, delay)
            waiters = [asyncio.ensure_future(trigger.wait()),
                       asyncio.ensure_future(self.stop.wait())]
            if delay:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def run(self) -> int:
        try:
            async with pull_lock(self.config.data_dir / "run.lock", wait=False,
                                 busy="another customer daemon is running with this data_dir"
                                 ), contextlib.AsyncExitStack() as stack:
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGUSR1, self.trigger_all)
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(signum, self.stop.set)
                if self.config.metrics_listen is not None:
                    try:
                        address, stop_metrics = metrics.serve(*self.config.metrics_listen)
                    except OSError as exc:
                        log.error("cannot listen for metrics on %s:%d: %s",
                                  *self.config.metrics_listen, exc)
                        return 71  # EX_OSERR, like the provider and the outbox
                    stack.callback(stop_metrics)
                    log.info("metrics on http://%s:%d/metrics", *address)
                if self.config.outbox.enabled:
                    self.outbox = await stack.enter_async_context(
                        OutboxService(self.config, self.stop, self.rng).running())
                log.info("customer daemon started with %d pull block(s)%s",
                         len(self.config.pulls),
                         f" and the outbox (push: {self.config.outbox.push})"
                         if self.outbox is not None else "")
                tasks = [asyncio.create_task(self.loop(pull)) for pull in self.config.pulls]
                await self.stop.wait()
                log.info("stopping: waiting for sessions in progress")
                done, pending = await asyncio.wait(tasks, timeout=self.config.provider.atrn_timeout
                                                   + 60)
                for task in pending:
                    task.cancel()
                for task in done:
                    with contextlib.suppress(asyncio.CancelledError):
                        task.result()
                return 0
        except CustomerError as exc:
            log.error("%s", exc)
            return exc.exit_code


async def serve_outbox(config: CustomerConfig) -> int:
    """`fermoposta customer outbox serve`: the outbox service alone, until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    try:
        service = OutboxService(config, stop)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, service.wake)
        async with service.running():
            log.info("outbox service started (push: %s)", config.outbox.push)
            await stop.wait()
            log.info("stopping the outbox service")
        return 0
    except CustomerError as exc:
        log.error("%s", exc)
        return exc.exit_code
