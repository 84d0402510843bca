"""What this provider process saw of its customers' pulls, kept in memory (issue 12).

Contract:
- `Activity` records each ATRN session of this process that reversed: it
  is "in progress" from `started(...)` until `finished(...)`, then it joins
  a ring of the last `PULLS_PER_ACCOUNT` pulls of its account (and of the
  last `MAX_PULLS` overall, oldest dropped first) with its result: messages,
  recipients delivered, deferred and failed, and why it ended early.
- Nothing is written to the store: a restart forgets the history, and a
  node sees only its own sessions (with several nodes, each node's page
  shows the pulls made through it).  The status page says so.
- `in_progress()` and `pulls(account)` return copies; no I/O, no clock but
  the one given (Unix time).  Thread-unsafe: call it on the event loop.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PULLS_PER_ACCOUNT = 20
MAX_PULLS = 2000


@dataclass(frozen=True, slots=True)
class Pull:
    """One reversed ATRN session, finished or not."""

    account: str
    domains: tuple[str, ...]
    started_at: float
    ended_at: float | None = None
    messages: int = 0
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    aborted: str | None = None

    @property
    def ok(self) -> bool:
        """Finished without an early end and with nothing deferred."""
        return self.ended_at is not None and self.aborted is None and self.deferred == 0


class Activity:
    """See the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._running: dict[int, Pull] = {}
        self._ids = itertools.count(1)
        self._pulls: collections.deque[Pull] = collections.deque(maxlen=MAX_PULLS)

    def started(self, account: str, domains: Sequence[str]) -> int:
        """A drain begins; returns the handle to give to `finished`."""
        handle = next(self._ids)
        self._running[handle] = Pull(account, tuple(domains), self.clock())
        return handle

    def finished(self, handle: int, *, messages: int, delivered: int, deferred: int,
                 failed: int, aborted: str | None) -> None:
        pull = self._running.pop(handle, None)
        if pull is None:
            return
        self._pulls.append(Pull(pull.account, pull.domains, pull.started_at, self.clock(),
                                messages, delivered, deferred, failed, aborted))

    def in_progress(self, account: str | None = None) -> list[Pull]:
        return [p for p in self._running.values() if account is None or p.account == account]

    def pulls(self, account: str, limit: int = PULLS_PER_ACCOUNT) -> list[Pull]:
        """The account's last finished pulls, newest first."""
        found: list[Pull] = []
        for pull in reversed(self._pulls):
            if pull.account == account:
                found.append(pull)
                if len(found) >= limit:
                    break
        return found

    def last_success(self, account: str) -> Pull | None:
        """The account's newest pull that ended well (`Pull.ok`)."""
        return next((p for p in reversed(self._pulls) if p.account == account and p.ok), None)
