"""Failed-AUTH throttling across connections (issue 8), in the spirit of Postfix's anvil.

Contract:
- `AuthThrottle(settings, clock)` is pure logic: no I/O, no logging, no
  sleeping (the `Authenticator` does those).  `clock` (default
  `time.monotonic`) is injectable so that tests run it in memory.
- Two tables of failure counts: per client address (IPv4 as is, IPv6 by
  its /64, the block one subscriber usually gets, so that an attacker cannot
  step through his own prefix) and per **existing** account (a guess at an
  unknown user name counts for the address only, so the account table is
  bounded by the accounts in the store and random names cannot flush it).
  A count is forgotten `window` seconds after its last failure.
- `failure(ip, account)` records one failed AUTH and returns a `Verdict`:
  the `delay` to wait before the failure reply, ``failure_delay`` doubled for
  each earlier failure of the address or the account within the window (the
  larger count), at most ``max_delay``; and whether this failure started a
  lockout of the address (``max_failures_per_ip``) or of the account
  (``max_failures_per_account``).  A lockout lasts ``lockout`` seconds;
  afterwards the count starts again from 0.  0 in either maximum = off.
- `address_locked(ip)` is the remaining lockout of an address (0.0 = none):
  every AUTH from it is refused (421) without looking at the credentials.
- `account_refused(ip, account)`: the account is locked AND this address
  is suspect (it failed within the window, for any account) AND it has not
  authenticated as this account in the last `KNOWN_ADDRESS_TTL`.  A locked
  account is therefore still reachable from a clean address or one its
  owner used before: an attacker guessing from elsewhere cannot lock the
  customer out, while each of his addresses gets at most one guess at a
  locked account per window.  The answer must not depend on whether the
  credentials were right (no oracle), so the caller asks it for every AUTH
  that named the account, successful or not.
- `begin(ip)` / `end(ip)` bracket each credential check: `begin` refuses
  one (False) when the address's failures plus its checks under way
  already reach ``max_failures_per_ip``, so guesses sent in parallel over
  many connections count as if they came one after another.
- `success(ip, account)` remembers the address as known-good for the
  account.  It does not clear the address's failures (else an attacker with
  an account of his own could reset his count between guesses).
- Memory is bounded: each table holds at most `max_entries` keys; when
  full, expired entries go first, then the least recently used ones.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

#: How long a successful AUTH makes its address known-good for the account.
KNOWN_ADDRESS_TTL = 30 * 86400.0
#: Known-good addresses remembered per account (the most recent ones).
KNOWN_ADDRESSES_PER_ACCOUNT = 16
#: Exponent cap for the doubling delay (max_delay caps it anyway).
_MAX_DOUBLINGS = 30


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    failure_delay: float = 1.0
    max_delay: float = 15.0
    max_failures_per_ip: int = 10
    max_failures_per_account: int = 20
    window: float = 900.0
    lockout: float = 900.0
    max_entries: int = 65536


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one failed AUTH."""

    delay: float
    address_locked: bool = False  # this failure locked the address out
    account_locked: bool = False  # this failure locked the account
    address_failures: int = 0  # failures of the address within the window
    account_failures: int = 0  # of the account (0 when none was named)


@dataclass(slots=True)
class _Entry:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class _Table:
    """Failure counts by key, bounded, with expiry."""

    def __init__(self, settings: ThrottleSettings) -> None:
        self.settings = settings
        self.entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    def _expired(self, entry: _Entry, now: float) -> bool:
        if entry.locked_until:
            return now >= entry.locked_until
        return now - entry.last >= self.settings.window

    def get(self, key: str, now: float) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is not None and self._expired(entry, now):
            del self.entries[key]
            return None
        return entry

    def touch(self, key: str, now: float) -> _Entry:
        entry = self.get(key, now)
        if entry is None:
            self._make_room(now)
            entry = self.entries[key] = _Entry()
        self.entries.move_to_end(key)
        return entry

    def _make_room(self, now: float) -> None:
        if len(self.entries) < self.settings.max_entries:
            return
        for key in [k for k, e in self.entries.items() if self._expired(e, now)]:
            del self.entries[key]
        while len(self.entries) >= self.settings.max_entries:
            self.entries.popitem(last=False)  # least recently failed


def address_key(ip: str) -> str:
    """The table key of a client address: IPv4 itself, IPv6 its /64."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip  # not an address (a unix socket peer, say): itself
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class AuthThrottle:
    """See the module docstring."""

    def __init__(self, settings: ThrottleSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.settings = settings
        self._addresses = _Table(settings)
        self._accounts = _Table(settings)
        self._known: collections.OrderedDict[str, collections.OrderedDict[str, float]] = \
            collections.OrderedDict()
        # Checks under way per address key (begin/end): bounded by the
        # connections open at once.
        self._in_flight: dict[str, int] = {}

    @property
    def settings(self) -> ThrottleSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: ThrottleSettings) -> None:
        """New settings (SIGHUP) keep what was counted so far."""
        self._settings = settings
        for table in (getattr(self, "_addresses", None), getattr(self, "_accounts", None)):
            if table is not None:
                table.settings = settings

    def begin(self, ip: str) -> bool:
        """Reserve one credential check for the address: False when its
        failures within the window plus the checks already under way reach
        ``max_failures_per_ip`` (refuse this one unchecked, with a
        temporary failure).  Else count it as under way until `end`: a
        guess is in flight or counted as a failure, never neither, so
        parallel connections cannot outrun the count."""
        maximum = self.settings.max_failures_per_ip
        key = address_key(ip)
        running = self._in_flight.get(key, 0)
        if maximum > 0:
            entry = self._addresses.get(key, self.clock())
            if (entry.failures if entry is not None else 0) + running >= maximum:
                return False
        self._in_flight[key] = running + 1
        return True

    def end(self, ip: str) -> None:
        """The check `begin` reserved is over (its `failure` or `success`
        already recorded)."""
        key = address_key(ip)
        running = self._in_flight.get(key, 0) - 1
        if running > 0:
            self._in_flight[key] = running
        else:
            self._in_flight.pop(key, None)

    def address_locked(self, ip: str) -> float:
        now = self.clock()
        entry = self._addresses.get(address_key(ip), now)
        if entry is None or not entry.locked_until:
            return 0.0
        return entry.locked_until - now

    def account_refused(self, ip: str, account: str | None) -> bool:
        if account is None:
            return False
        now = self.clock()
        entry = self._accounts.get(account, now)
        if entry is None or not entry.locked_until:
            return False
        key = address_key(ip)
        if self._is_known(account, key, now):
            return False
        suspect = self._addresses.get(key, now)
        return suspect is not None and suspect.failures > 0

    def failure(self, ip: str, account: str | None) -> Verdict:
        s = self.settings
        now = self.clock()
        addr = self._addresses.touch(address_key(ip), now)
        address_locked = self._count(addr, s.max_failures_per_ip, now)
        account_failures, account_locked = 0, False
        if account is not None:
            acct = self._accounts.touch(account, now)
            account_locked = self._count(acct, s.max_failures_per_account, now)
            account_failures = acct.failures
        count = max(addr.failures, account_failures)
        delay = 0.0
        if s.failure_delay > 0:
            delay = min(s.max_delay, s.failure_delay * 2 ** min(count - 1, _MAX_DOUBLINGS))
        return Verdict(delay, address_locked, account_locked, addr.failures, account_failures)

    def _count(self, entry: _Entry, maximum: int, now: float) -> bool:
        """Count a failure; True when it starts a lockout."""
        entry.failures += 1
        entry.last = now
        if maximum > 0 and not entry.locked_until and entry.failures >= maximum:
            entry.locked_until = now + self.settings.lockout
            return True
        return False

    def success(self, ip: str, account: str) -> None:
        now = self.clock()
        known = self._known.get(account)
        if known is None:
            while len(self._known) >= self.settings.max_entries:
                self._known.popitem(last=False)
            known = self._known[account] = collections.OrderedDict()
        self._known.move_to_end(account)
        key = address_key(ip)
        known[key] = now
        known.move_to_end(key)
        while len(known) > KNOWN_ADDRESSES_PER_ACCOUNT:
            known.popitem(last=False)

    def _is_known(self, account: str, key: str, now: float) -> bool:
        known = self._known.get(account)
        seen = known.get(key) if known is not None else None
        return seen is not None and now - seen < KNOWN_ADDRESS_TTL

    def sizes(self) -> tuple[int, int, int]:
        """Entries held (addresses, accounts, accounts with known addresses): for tests."""
        return len(self._addresses.entries), len(self._accounts.entries), len(self._known)
