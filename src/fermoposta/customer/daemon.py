"""`fermoposta customer run`: pull every `[[pull]]` block on its schedule.

Contract:
- One task per pull block: pull at start, then after `next_delay()` (its
  interval or window interval, exponential backoff after consecutive
  failures, jitter).  Pulls of one block never overlap (the pull lock);
  blocks run independently.
- SIGUSR1 triggers every block now (the on-demand trigger); SIGTERM and
  SIGINT stop the daemon after the sessions in progress end (a session is
  never cut in the middle by us: mail already acknowledged is committed, the
  rest stays held at the provider).
- A second daemon on the same `data_dir` exits 73 (its lock is taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from datetime import datetime

from fermoposta.customer.config import CustomerConfig, PullConfig
from fermoposta.customer.errors import CustomerError
from fermoposta.customer.pull import pull_lock, pull_once
from fermoposta.customer.schedule import next_delay

log = logging.getLogger("fermoposta.customer")


class Daemon:
    def __init__(self, config: CustomerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.stop = asyncio.Event()
        self.triggers = {pull.name: asyncio.Event() for pull in config.pulls}
        self.runs = {pull.name: 0 for pull in config.pulls}

    def trigger_all(self) -> None:
        log.info("on-demand trigger: pulling every block now")
        for event in self.triggers.values():
            event.set()

    async def loop(self, pull: PullConfig) -> None:
        failures = 0
        trigger = self.triggers[pull.name]
        while not self.stop.is_set():
            trigger.clear()
            summary = await pull_once(self.config, pull, wait=True)
            self.runs[pull.name] += 1
            for line in summary.lines():
                log.info("%s", line)
            failures = 0 if summary.exit_code == 0 else failures + 1
            delay = next_delay(pull.schedule, datetime.now(), failures, self.rng)
            log.info("%s: next pull in %.0fs", pull.name, delay)
            waiters = [asyncio.ensure_future(trigger.wait()),
                       asyncio.ensure_future(self.stop.wait())]
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def run(self) -> int:
        try:
            async with pull_lock(self.config.data_dir / "run.lock", wait=False,
                                 busy="another customer daemon is running with this data_dir"):
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGUSR1, self.trigger_all)
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(signum, self.stop.set)
                log.info("customer daemon started with %d pull block(s)", len(self.config.pulls))
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
