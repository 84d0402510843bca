"""What the status page remembers over time, in memory: held mail and rejects.

Contract:
- `History(store)` samples, on the event loop, every `held_every` seconds
  (10 min) the held messages of each domain (`queue_shape`, in a worker
  thread) and every `rejects_every` seconds (1 min) the totals of
  `fermoposta_smtp_rejects_total` by reason.  It keeps one day of the first
  and a bit more than an hour of the second: rings, never the store, so a
  restart starts them again (the page says since when it knows).
- `held_series(domain)` is the [(time, messages)] of a domain over the day;
  `domains()` those seen in it.  `rejects_last_hour(now)` is the refusals
  per reason since the oldest sample at most an hour old (and that
  sample's time): the counters now minus the counters then.
- A store error during a sample skips that sample (logged at debug).
- `start()` takes the first samples at once and starts the task; `stop()`
  cancels it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable

from fermoposta.ops import metrics
from fermoposta.store.base import QueueTools, StoreError

log = logging.getLogger("fermoposta.web")

DAY, HOUR = 86400.0, 3600.0


def reject_totals() -> dict[str, float]:
    """`fermoposta_smtp_rejects_total` now, summed over listeners, by reason."""
    totals: dict[str, float] = dict.fromkeys(metrics.REJECT_REASONS, 0.0)
    for family in metrics.REJECTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels.get("reason", "other")
                totals[reason] = totals.get(reason, 0.0) + sample.value
    return totals


class History:
    def __init__(self, store: QueueTools, *, held_every: float = 600.0,
                 rejects_every: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.held_every, self.rejects_every, self.clock = held_every, rejects_every, clock
        self.held: collections.deque[tuple[float, dict[str, int]]] = collections.deque(
            maxlen=math.ceil(DAY / held_every) + 1)
        self.rejects: collections.deque[tuple[float, dict[str, float]]] = collections.deque(
            maxlen=math.ceil(HOUR / rejects_every) + 2)
        self._task: asyncio.Task[None] | None = None

    async def sample_held(self) -> None:
        now = self.clock()
        try:
            shape = await asyncio.to_thread(self.store.queue_shape, now, ())
        except StoreError as exc:
            log.debug("status page: held mail not sampled: %s", exc)
            return
        self.held.append((now, {d.domain: d.messages for d in shape.domains if d.held}))

    def sample_rejects(self) -> None:
        self.rejects.append((self.clock(), reject_totals()))

    def domains(self) -> list[str]:
        return sorted({d for _, sample in self.held for d in sample})

    def held_series(self, domain: str) -> list[tuple[float, int]]:
        return [(at, sample.get(domain, 0)) for at, sample in self.held]

    def rejects_last_hour(self, now: float) -> tuple[dict[str, int], float | None]:
        base = next(((at, t) for at, t in self.rejects if at >= now - HOUR), None)
        current = reject_totals()
        if base is None:
            return {r: 0 for r in current}, None
        since, then = base
        return {r: int(v - then.get(r, 0.0)) for r, v in current.items()}, since

    async def start(self) -> None:
        self.sample_rejects()
        await self.sample_held()
        self._task = asyncio.create_task(self._run(), name="web-history")

    async def _run(self) -> None:
        next_held = self.clock() + self.held_every
        while True:
            await asyncio.sleep(min(self.rejects_every, self.held_every))
            self.sample_rejects()
            if self.clock() >= next_held:
                next_held += self.held_every
                await self.sample_held()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
