"""An event loop that polls for a few microseconds before it sleeps.

Contract:
- `BusyPollSelector(max_spin)` is a `selectors.DefaultSelector` (epoll on
  Linux) whose `select(timeout)` returns what the plain selector returns,
  within the same timeout: before it blocks, it asks without blocking,
  again and again, for up to its current window (never past `timeout`).
  Each of those asks releases the GIL, as a blocking `select` does.
- The window adapts, as Linux KVM's halt polling does (`halt_poll_ns`):
  a wait that a sleep ended within `max_spin` of its start (a peer that
  answers fast, just too late for the window) doubles it, from `MIN_SPIN`
  up to `max_spin`; a wait longer than `max_spin` halves it, and below
  `MIN_SPIN` it is 0.  So a process whose peers answer within
  microseconds (a sender on the same machine, a local MTA or content
  filter) polls, and one that is idle or whose peers are far away stops
  after a few long waits and sleeps at once, costing nothing.
- `max_spin` 0 turns it off: every `select` is the plain selector's.
- `new_event_loop(max_spin)` is an asyncio event loop on it (for
  `asyncio.Runner(loop_factory=...)`).

Why: a process that sleeps in epoll_wait lets its CPU idle; on a virtual
machine the CPU halts, and the wake-up when the peer's bytes arrive (an
interrupt, the hypervisor's entry and exit, the scheduler) costs tens of
microseconds, as much as the whole loopback round trip of an SMTP command.
Measured at `smtp-source -s 1 -d` (one session, each command waiting for
its reply): +18% msgs/s, with less CPU a message, not more
(bench/README.md, seventeenth session).
"""

from __future__ import annotations

import asyncio
import selectors
import time

__all__ = ["MIN_SPIN", "BusyPollSelector", "new_event_loop"]

MIN_SPIN = 0.00001  # seconds: the shortest window worth polling (a few asks)

_Ready = list[tuple[selectors.SelectorKey, int]]


class BusyPollSelector(selectors.DefaultSelector):
    def __init__(self, max_spin: float) -> None:
        super().__init__()
        self.max_spin = max(0.0, max_spin)
        self.window = self.max_spin  # seconds polled before the next sleep

    def select(self, timeout: float | None = None) -> _Ready:
        poll = super().select
        if not self.max_spin or (timeout is not None and timeout <= 0):
            return poll(timeout)
        ready: _Ready = poll(0)
        if ready:
            return ready
        started = time.monotonic()
        window = self.window if timeout is None else min(self.window, timeout)
        if window > 0:
            end = started + window
            while time.monotonic() < end:
                ready = poll(0)
                if ready:
                    return ready
        left = None if timeout is None else max(0.0, started + timeout - time.monotonic())
        ready = poll(left)
        self._adapt(time.monotonic() - started)
        return ready

    def _adapt(self, waited: float) -> None:
        """After a sleep: grow the window when the wait was short enough
        that a longer one would have caught it, shrink it when it was not."""
        if waited <= self.max_spin:
            self.window = min(self.max_spin, max(MIN_SPIN, self.window * 2))
        else:
            window = self.window / 2
            self.window = window if window >= MIN_SPIN else 0.0


def new_event_loop(max_spin: float) -> asyncio.AbstractEventLoop:
    """An asyncio event loop whose selector polls for up to `max_spin`
    seconds before it sleeps (0: the plain loop)."""
    if max_spin <= 0:
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(BusyPollSelector(max_spin))
