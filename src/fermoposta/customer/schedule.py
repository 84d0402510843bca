"""When the customer pulls next: interval, weekday/hour windows, backoff, jitter.  Pure.

Contract:
- Nothing here reads a clock or sleeps: the caller passes the current local
  time (`datetime`, naive local time or aware in the local zone; only its
  weekday, hour and wall-clock arithmetic are used) and a `random.Random`.
- Push (issue 12): an `every` of `PUSH` (0, written ``"push"``) means "dial
  again at once": the provider holds the ATRN open until mail comes (its
  ``--atrn-wait``), so one session is always waiting.
- `Window(days, start_hour, end_hour, every)`: on the weekdays in `days`
  (0 = Monday ... 6 = Sunday), from ``start_hour:00`` (inclusive) to
  ``end_hour:00`` (exclusive; 24 = midnight at the end of that day), pull
  every `every` seconds.  A window never crosses midnight: write two windows.
- `Schedule(every, jitter, backoff_max, windows)`: the base interval, the
  jitter, the longest wait after failures, the windows.  Windows may overlap;
  the first one listed that contains a time wins.  The constructor checks
  its invariants (ValueError): intervals finite and > 0 (or `PUSH`),
  ``backoff_max >= every`` and ``>=`` every window's `every`.
- `interval_at(schedule, when)`: the `every` of the first window containing
  `when`, else `schedule.every`.
- `next_delay(schedule, when, failures, rng)`: seconds until the next pull.
    1. base = `interval_at(when)`.
    With no failures and a base of `PUSH`: 0 (at once; steps 3 and 4 do not
       apply).
    2. With ``failures > 0`` consecutive failures: ``min(base * 2**failures,
       backoff_max)`` (exponential backoff, capped; for `PUSH` the base is
       `PUSH_RETRY`).  With no failures, if a
       window with a *shorter* interval starts (at a whole hour) before
       ``when + base``, the delay is cut to reach that start, so a pull does
       not sleep through the beginning of busy hours.
    3. Jitter: a uniform offset in ±(fraction of the delay) or ±(fixed
       seconds), drawn from `rng`.
    4. Never below 1 second.
  So the result (push aside) is always within ``[1, backoff_max + spread]`` where spread
  is ``backoff_max * fraction`` or the fixed jitter seconds.
- Parsers for the config file, raising ValueError with an ``expected ...,
  got ...`` text: `parse_days` (``"mon-fri"``, ``"sat,sun"``,
  ``"mon,wed,fri"``, ``"fri-mon"`` wraps, ``"daily"``), `parse_hours`
  (``"08-18"``: 0 <= start < end <= 24), `parse_jitter` (``"10%"`` (0-100 %)
  or a duration like ``"30s"``; ``0`` = none).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from fermoposta.config_common import parse_duration, show_value

__all__ = [
    "DAY_NAMES",
    "MIN_DELAY",
    "PUSH",
    "PUSH_RETRY",
    "JitterSpec",
    "Schedule",
    "Window",
    "interval_at",
    "next_delay",
    "parse_days",
    "parse_every",
    "parse_hours",
    "parse_jitter",
]

#: Weekday names as `parse_days` accepts them; the index is `datetime.weekday()`.
DAY_NAMES: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

#: The shortest delay `next_delay` ever returns, in seconds (push aside).
MIN_DELAY = 1.0

#: `every = "push"`: dial again at once (the provider's ATRN waits for mail).
PUSH = 0.0

#: The base of the backoff of a push block after failures: 10 s, 20 s, 40 s ...
PUSH_RETRY = 5.0

_ALL_DAYS = frozenset(range(7))
_MAX_BACKOFF_EXPONENT = 1000  # 2.0**1024 overflows; the cap is reached long before


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def _interval(name: str, value: float) -> None:
    if value != PUSH:
        _positive(name, value)


def parse_every(value: object) -> float:
    """``"push"`` -> `PUSH`; else a duration of at least 1 second."""
    if isinstance(value, str) and value.strip().lower() == "push":
        return PUSH
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError("expected a duration like 10m, 30s, 2h, 5d or a number of seconds, "
                         f'or "push", got {show_value(value)}') from None
    if seconds < MIN_DELAY:
        raise ValueError(f'expected a duration of at least 1s or "push", got {show_value(value)}')
    return seconds


@dataclass(frozen=True, slots=True)
class JitterSpec:
    """Random spread added to each delay: ±`fraction` of it, or ±`seconds`.

    At most one of the two is non-zero; ``JitterSpec()`` is no jitter.
    """

    fraction: float = 0.0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0.0 <= self.fraction <= 1.0):
            raise ValueError(f"jitter fraction must be from 0 to 1, got {self.fraction!r}")
        if not (math.isfinite(self.seconds) and self.seconds >= 0.0):
            raise ValueError(f"jitter seconds must be >= 0, got {self.seconds!r}")
        if self.fraction and self.seconds:
            raise ValueError("jitter is a fraction or a number of seconds, not both")

    def spread(self, delay: float) -> float:
        """The half-width of the jitter interval around `delay`."""
        return self.fraction * delay if self.fraction else self.seconds


@dataclass(frozen=True, slots=True)
class Window:
    """On `days` (0 = Monday), from `start_hour` to `end_hour` (exclusive), every `every` s."""

    days: frozenset[int]
    start_hour: int
    end_hour: int
    every: float

    def __post_init__(self) -> None:
        if not self.days or not self.days <= _ALL_DAYS:
            raise ValueError(f"days must be a non-empty set of 0-6, got {sorted(self.days)}")
        if not 0 <= self.start_hour < self.end_hour <= 24:
            raise ValueError(
                f"hours must satisfy 0 <= start < end <= 24, got {self.start_hour}-{self.end_hour}"
            )
        _interval("every", self.every)

    def contains(self, when: datetime) -> bool:
        """True if `when` (local time) falls in this window."""
        return when.weekday() in self.days and self.start_hour <= when.hour < self.end_hour


@dataclass(frozen=True, slots=True)
class Schedule:
    """A pull block's timing; see the module docstring."""

    every: float
    jitter: JitterSpec = JitterSpec()
    backoff_max: float = 3600.0
    windows: tuple[Window, ...] = ()

    def __post_init__(self) -> None:
        _interval("every", self.every)
        _positive("backoff_max", self.backoff_max)
        if self.backoff_max < self.every:
            raise ValueError(
                f"backoff_max ({self.backoff_max:g}s) must not be shorter than every "
                f"({self.every:g}s)"
            )
        for window in self.windows:
            if self.backoff_max < window.every:
                raise ValueError(
                    f"backoff_max ({self.backoff_max:g}s) must not be shorter than a "
                    f"window's every ({window.every:g}s)"
                )


def interval_at(schedule: Schedule, when: datetime) -> float:
    """The pull interval in force at `when`: the first matching window's, else the base."""
    for window in schedule.windows:
        if window.contains(when):
            return window.every
    return schedule.every


def _until_shorter_window(schedule: Schedule, when: datetime, base: float) -> float | None:
    """Seconds from `when` to the next whole hour within `base` whose interval is < `base`."""
    if not schedule.windows:
        return None
    hour = when.replace(minute=0, second=0, microsecond=0)
    # The pattern repeats every week: no need to look further than 7 days.
    steps = min(math.ceil(base / 3600.0), 7 * 24)
    for step in range(1, steps + 1):
        boundary = hour + timedelta(hours=step)
        ahead = (boundary - when).total_seconds()
        if ahead >= base:
            return None
        if interval_at(schedule, boundary) < base:
            return ahead
    return None


def next_delay(schedule: Schedule, when: datetime, failures: int, rng: random.Random) -> float:
    """Seconds to wait before the next pull; see the module docstring."""
    if failures < 0:
        raise ValueError(f"failures must be >= 0, got {failures}")
    base = interval_at(schedule, when)
    if failures:
        exponent = min(failures, _MAX_BACKOFF_EXPONENT)
        delay = min((base or PUSH_RETRY) * 2.0**exponent, schedule.backoff_max)
    elif base == PUSH:
        return 0.0
    else:
        delay = base
        ahead = _until_shorter_window(schedule, when, base)
        if ahead is not None:
            delay = ahead
    spread = schedule.jitter.spread(delay)
    if spread:
        delay += rng.uniform(-spread, spread)
    return max(MIN_DELAY, delay)


# ---------------------------------------------------------------------------
# Parsers for the config file.
# ---------------------------------------------------------------------------

_DAYS_EXPECTED = 'expected days like "mon-fri", "sat,sun", "mon,wed,fri" or "daily"'


def _day(name: str, value: object) -> int:
    try:
        return DAY_NAMES.index(name.strip().lower())
    except ValueError:
        raise ValueError(
            f"{_DAYS_EXPECTED}, got {show_value(value)} (unknown day {show_value(name.strip())}; "
            f"days are {', '.join(DAY_NAMES)})"
        ) from None


def parse_days(value: object) -> frozenset[int]:
    """``"mon-fri"`` -> {0, ..., 4}; comma lists, ranges (``"fri-mon"`` wraps), ``"daily"``."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{_DAYS_EXPECTED}, got {show_value(value)}")
    if value.strip().lower() == "daily":
        return _ALL_DAYS
    days: set[int] = set()
    for part in value.split(","):
        first, sep, last = part.partition("-")
        if not sep:
            days.add(_day(first, value))
            continue
        start, end = _day(first, value), _day(last, value)
        days.update((start + i) % 7 for i in range((end - start) % 7 + 1))
    return frozenset(days)


_HOURS_RE = re.compile(r"(\d{1,2})\s*-\s*(\d{1,2})")


def parse_hours(value: object) -> tuple[int, int]:
    """``"08-18"`` -> (8, 18): whole hours, end exclusive, 0 <= start < end <= 24."""
    expected = 'expected hours "start-end" like "08-18" (whole hours 00-24, end exclusive)'
    if not isinstance(value, str):
        raise ValueError(f"{expected}, got {show_value(value)}")
    m = _HOURS_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError(f"{expected}, got {show_value(value)}")
    start, end = int(m.group(1)), int(m.group(2))
    if start > 23 or end > 24:
        raise ValueError(f"{expected}, got {show_value(value)} (hours go from 00 to 24)")
    if start >= end:
        raise ValueError(
            f"{expected}, got {show_value(value)} (the start must be before the end; "
            "split a window that crosses midnight into two)"
        )
    return start, end


_PERCENT_RE = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def parse_jitter(value: object) -> JitterSpec:
    """``"10%"`` (of each delay, 0-100 %) or a duration (``"30s"``, ``45``): ± that much."""
    expected = 'expected a jitter like "10%" (0-100 %) or a duration like "30s"'
    if isinstance(value, str) and "%" in value:
        m = _PERCENT_RE.fullmatch(value.strip())
        if m is None or float(m.group(1)) > 100:
            raise ValueError(f"{expected}, got {show_value(value)}")
        return JitterSpec(fraction=float(m.group(1)) / 100.0)
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(f"{expected}, got {show_value(value)}") from None
    return JitterSpec(seconds=seconds)
