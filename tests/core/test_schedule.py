"""The pull schedule: windows, backoff, jitter, parsers.  Pure functions, fixed times."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fermoposta.customer.schedule import (
    MIN_DELAY,
    JitterSpec,
    Schedule,
    Window,
    interval_at,
    next_delay,
    parse_days,
    parse_hours,
    parse_jitter,
)

WEEKDAYS = frozenset(range(5))
# 2024-01-01 is a Monday.
MONDAY = datetime(2024, 1, 1)


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """Day 0 = Monday 2024-01-01 ... 6 = Sunday 2024-01-07."""
    return MONDAY + timedelta(days=day, hours=hour, minutes=minute, seconds=second)


# Every 10 minutes on working hours, every 30 minutes on Saturday mornings, hourly otherwise.
OFFICE = Schedule(
    every=3600.0,
    jitter=JitterSpec(),
    backoff_max=4 * 3600.0,
    windows=(
        Window(days=WEEKDAYS, start_hour=8, end_hour=18, every=600.0),
        Window(days=frozenset({5}), start_hour=9, end_hour=12, every=1800.0),
    ),
)


def no_rng() -> random.Random:
    return random.Random(0)


# -- windows ---------------------------------------------------------------


def test_calendar_anchor() -> None:
    assert MONDAY.weekday() == 0 and at(6, 0).weekday() == 6


def test_interval_over_a_week() -> None:
    expected: dict[tuple[int, int], float] = {}
    for day in range(7):
        for hour in range(24):
            if day < 5 and 8 <= hour < 18:
                expected[day, hour] = 600.0
            elif day == 5 and 9 <= hour < 12:
                expected[day, hour] = 1800.0
            else:
                expected[day, hour] = 3600.0
    for (day, hour), every in expected.items():
        for minute in (0, 59):
            assert interval_at(OFFICE, at(day, hour, minute)) == every, (day, hour, minute)


@pytest.mark.parametrize(
    ("when", "every"),
    [
        (at(0, 7, 59, 59), 3600.0),  # just before the start
        (at(0, 8), 600.0),  # the start hour is included
        (at(0, 17, 59, 59), 600.0),
        (at(0, 18), 3600.0),  # the end hour is excluded
        (at(4, 17, 30), 600.0),  # Friday
        (at(5, 8, 30), 3600.0),  # Saturday is not mon-fri
        (at(5, 9), 1800.0),
        (at(5, 12), 3600.0),
        (at(6, 10), 3600.0),  # Sunday
        (at(7, 8), 600.0),  # next Monday
    ],
)
def test_window_boundaries(when: datetime, every: float) -> None:
    assert interval_at(OFFICE, when) == every


def test_window_to_midnight() -> None:
    late = Schedule(every=600.0, windows=(Window(frozenset({6}), 22, 24, 60.0),))
    assert interval_at(late, at(6, 21, 59)) == 600.0
    assert interval_at(late, at(6, 22)) == 60.0
    assert interval_at(late, at(6, 23, 59, 59)) == 60.0
    assert interval_at(late, at(7, 0)) == 600.0  # Monday 00:00 is outside


def test_first_matching_window_wins() -> None:
    lunch = Window(days=frozenset(range(7)), start_hour=12, end_hour=13, every=60.0)
    work = Window(days=WEEKDAYS, start_hour=8, end_hour=18, every=600.0)
    assert interval_at(Schedule(3600.0, windows=(lunch, work)), at(0, 12, 30)) == 60.0
    assert interval_at(Schedule(3600.0, windows=(work, lunch)), at(0, 12, 30)) == 600.0
    assert interval_at(Schedule(3600.0, windows=(lunch, work)), at(0, 13)) == 600.0


def test_no_windows() -> None:
    plain = Schedule(every=300.0)
    assert interval_at(plain, at(2, 3)) == 300.0
    assert next_delay(plain, at(2, 3), 0, no_rng()) == 300.0


def test_aware_datetimes_use_their_local_fields() -> None:
    zone = timezone(timedelta(hours=9))
    when = datetime(2024, 1, 1, 8, 30, tzinfo=zone)  # Monday 08:30 there
    assert interval_at(OFFICE, when) == 600.0


# -- the delay without failures ----------------------------------------------


def test_delay_is_the_interval_in_force() -> None:
    assert next_delay(OFFICE, at(0, 10), 0, no_rng()) == 600.0
    assert next_delay(OFFICE, at(0, 20), 0, no_rng()) == 3600.0
    assert next_delay(OFFICE, at(5, 9, 10), 0, no_rng()) == 1800.0


def test_delay_is_cut_to_reach_a_shorter_window() -> None:
    # Monday 07:30, hourly outside: wake at 08:00 when the 10-minute window starts.
    assert next_delay(OFFICE, at(0, 7, 30), 0, no_rng()) == 1800.0
    assert next_delay(OFFICE, at(0, 7, 59, 59), 0, no_rng()) == MIN_DELAY
    # Saturday 08:15: the 30-minute window starts at 09:00.
    assert next_delay(OFFICE, at(5, 8, 15), 0, no_rng()) == 2700.0
    # Sunday 23:20: Monday 00:00 is still hourly, so no cut.
    assert next_delay(OFFICE, at(6, 23, 20), 0, no_rng()) == 3600.0


def test_no_cut_for_a_longer_window() -> None:
    # Inside working hours the next window (outside, hourly) is longer: keep 10 minutes.
    assert next_delay(OFFICE, at(0, 17, 55), 0, no_rng()) == 600.0
    slow_nights = Schedule(every=600.0, windows=(Window(frozenset(range(7)), 0, 6, 3600.0),))
    assert next_delay(slow_nights, at(0, 23, 55), 0, no_rng()) == 600.0


def test_cut_reaches_a_window_days_ahead() -> None:
    weekly = Schedule(
        every=7 * 86400.0,
        backoff_max=7 * 86400.0,
        windows=(Window(frozenset({2}), 12, 13, 60.0),),  # Wednesday noon
    )
    assert next_delay(weekly, at(0, 12), 0, no_rng()) == 2 * 86400.0


# -- backoff -----------------------------------------------------------------


def test_backoff_doubles_and_is_capped() -> None:
    schedule = Schedule(every=600.0, backoff_max=3600.0)
    delays = [next_delay(schedule, at(0, 20), n, no_rng()) for n in range(6)]
    assert delays == [600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0]


def test_backoff_starts_from_the_window_interval() -> None:
    delays = [next_delay(OFFICE, at(0, 10), n, no_rng()) for n in range(7)]
    assert delays == [600.0, 1200.0, 2400.0, 4800.0, 9600.0, 14400.0, 14400.0]


def test_backoff_ignores_window_starts() -> None:
    # While failing, a starting window does not cut the wait short.
    assert next_delay(OFFICE, at(0, 7, 30), 1, no_rng()) == 7200.0


def test_huge_failure_counts_do_not_overflow() -> None:
    assert next_delay(OFFICE, at(0, 10), 10**9, no_rng()) == 4 * 3600.0


def test_negative_failures_rejected() -> None:
    with pytest.raises(ValueError, match="failures"):
        next_delay(OFFICE, at(0, 10), -1, no_rng())


# -- jitter ------------------------------------------------------------------


def test_fractional_jitter_bounds_and_spread() -> None:
    schedule = Schedule(every=600.0, jitter=JitterSpec(fraction=0.1), backoff_max=3600.0)
    rng = random.Random(1234)
    delays = [next_delay(schedule, at(0, 20), 0, rng) for _ in range(2000)]
    assert all(540.0 <= d <= 660.0 for d in delays)
    assert min(delays) < 550.0 and max(delays) > 650.0  # it does spread both ways
    backoff = [next_delay(schedule, at(0, 20), 10, rng) for _ in range(2000)]
    assert all(3240.0 <= d <= 3960.0 for d in backoff)  # ±10 % of the capped delay


def test_fixed_jitter_bounds() -> None:
    schedule = Schedule(every=600.0, jitter=JitterSpec(seconds=30.0), backoff_max=3600.0)
    rng = random.Random(99)
    delays = [next_delay(schedule, at(0, 20), 0, rng) for _ in range(2000)]
    assert all(570.0 <= d <= 630.0 for d in delays)
    assert min(delays) < 575.0 and max(delays) > 625.0


def test_jitter_is_reproducible_with_a_seed() -> None:
    schedule = Schedule(every=600.0, jitter=JitterSpec(fraction=0.5), backoff_max=600.0)
    first = [next_delay(schedule, at(0, 20), 0, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    assert first[0] != 600.0


def test_delay_never_below_one_second() -> None:
    schedule = Schedule(every=1.0, jitter=JitterSpec(seconds=3600.0), backoff_max=1.0)
    rng = random.Random(5)
    assert all(next_delay(schedule, at(0, 0), 0, rng) >= 1.0 for _ in range(500))
    tiny = Schedule(every=0.01, backoff_max=0.01)
    assert next_delay(tiny, at(0, 0), 0, rng) == 1.0


def test_jitter_spread() -> None:
    assert JitterSpec().spread(600.0) == 0.0
    assert JitterSpec(fraction=0.25).spread(600.0) == 150.0
    assert JitterSpec(seconds=30.0).spread(600.0) == 30.0


# -- the property --------------------------------------------------------------

durations = st.floats(min_value=1.0, max_value=30 * 86400.0, allow_nan=False)
jitters = st.one_of(
    st.builds(JitterSpec, fraction=st.floats(min_value=0.0, max_value=1.0)),
    st.builds(JitterSpec, seconds=st.floats(min_value=0.0, max_value=86400.0)),
)


@st.composite
def windows(draw: st.DrawFn) -> Window:
    start = draw(st.integers(0, 23))
    return Window(
        days=draw(st.frozensets(st.integers(0, 6), min_size=1)),
        start_hour=start,
        end_hour=draw(st.integers(start + 1, 24)),
        every=draw(durations),
    )


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    every = draw(durations)
    wins = tuple(draw(st.lists(windows(), max_size=4)))
    longest = max([every, *(w.every for w in wins)])
    backoff_max = draw(st.floats(min_value=longest, max_value=longest * 100))
    return Schedule(every=every, jitter=draw(jitters), backoff_max=backoff_max, windows=wins)


@given(
    schedule=schedules(),
    when=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
    failures=st.integers(min_value=0, max_value=10_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_next_delay_is_always_bounded(
    schedule: Schedule, when: datetime, failures: int, seed: int
) -> None:
    delay = next_delay(schedule, when, failures, random.Random(seed))
    ceiling = max(schedule.backoff_max, schedule.every)
    jitter = schedule.jitter
    upper = ceiling * (1 + jitter.fraction) + jitter.seconds
    assert 1.0 <= delay <= max(1.0, upper * (1 + 1e-12))
    if not jitter.fraction and not jitter.seconds:
        base = interval_at(schedule, when)
        if failures:
            assert delay == max(1.0, min(base * 2.0 ** min(failures, 1000), schedule.backoff_max))
        else:
            assert delay <= max(1.0, base)


# -- invariants ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": -1.0}, "every must be"),  # 0.0 is PUSH
        ({"every": float("inf")}, "every must be"),
        ({"every": 600.0, "backoff_max": 60.0}, "must not be shorter than every"),
        (
            {"every": 60.0, "backoff_max": 600.0, "windows": (Window(WEEKDAYS, 8, 18, 3600.0),)},
            "shorter than a window's every",
        ),
    ],
)
def test_schedule_invariants(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("days", "start", "end", "every"),
    [
        (frozenset(), 8, 18, 60.0),
        (frozenset({7}), 8, 18, 60.0),
        (WEEKDAYS, 18, 8, 60.0),
        (WEEKDAYS, 8, 8, 60.0),
        (WEEKDAYS, -1, 8, 60.0),
        (WEEKDAYS, 8, 25, 60.0),
        (WEEKDAYS, 8, 18, -1.0),  # 0.0 is PUSH
    ],
)
def test_window_invariants(days: frozenset[int], start: int, end: int, every: float) -> None:
    with pytest.raises(ValueError):
        Window(days, start, end, every)


@pytest.mark.parametrize(
    "kwargs",
    [{"fraction": -0.1}, {"fraction": 1.5}, {"seconds": -1.0}, {"fraction": 0.1, "seconds": 1.0}],
)
def test_jitter_invariants(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        JitterSpec(**kwargs)


# -- parsers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("sat,sun", {5, 6}),
        ("mon,wed,fri", {0, 2, 4}),
        ("daily", set(range(7))),
        ("DAILY", set(range(7))),
        ("Mon-Wed, Sat", {0, 1, 2, 5}),
        ("fri-mon", {4, 5, 6, 0}),
        ("sun", {6}),
        ("wed-wed", {2}),
        ("mon-sun", set(range(7))),
        (" tue , thu ", {1, 3}),
    ],
)
def test_parse_days(text: str, days: set[int]) -> None:
    assert parse_days(text) == frozenset(days)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "expected days like"),
        ("weekdays", 'unknown day "weekdays"'),
        ("monday", 'unknown day "monday"'),
        ("mon-", 'unknown day ""'),
        ("mon,,fri", 'unknown day ""'),
        ("mon-wed-fri", 'unknown day "wed-fri"'),
        (["mon"], "expected days like"),
        (1, "expected days like"),
    ],
)
def test_parse_days_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_days(value)


@pytest.mark.parametrize(
    ("text", "hours"),
    [
        ("08-18", (8, 18)),
        ("8-18", (8, 18)),
        ("00-24", (0, 24)),
        ("23-24", (23, 24)),
        ("0 - 1", (0, 1)),
    ],
)
def test_parse_hours(text: str, hours: tuple[int, int]) -> None:
    assert parse_hours(text) == hours


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("18-08", "crosses midnight"),
        ("08-08", "start must be before the end"),
        ("24-24", "hours go from 00 to 24"),
        ("08-25", "hours go from 00 to 24"),
        ("08:00-18:00", "whole hours"),
        ("8", "expected hours"),
        ("", "expected hours"),
        ("-1-5", "expected hours"),
        (8, "expected hours"),
    ],
)
def test_parse_hours_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hours(value)


@pytest.mark.parametrize(
    ("value", "jitter"),
    [
        ("10%", JitterSpec(fraction=0.1)),
        ("0%", JitterSpec()),
        ("100%", JitterSpec(fraction=1.0)),
        ("12.5 %", JitterSpec(fraction=0.125)),
        ("30s", JitterSpec(seconds=30.0)),
        ("2m", JitterSpec(seconds=120.0)),
        (45, JitterSpec(seconds=45.0)),
        (0, JitterSpec()),
        (1.5, JitterSpec(seconds=1.5)),
    ],
)
def test_parse_jitter(value: object, jitter: JitterSpec) -> None:
    assert parse_jitter(value) == jitter


@pytest.mark.parametrize("value", ["101%", "-5%", "%", "10%%", "x", "10 percent", -1, True, None])
def test_parse_jitter_rejects(value: object) -> None:
    with pytest.raises(ValueError, match='expected a jitter like "10%"'):
        parse_jitter(value)


# -- push (issue 12) ------------------------------------------------------------


def test_push_dials_again_at_once_and_backs_off_after_failures() -> None:
    from fermoposta.customer.schedule import PUSH, PUSH_RETRY
    push = Schedule(every=PUSH, jitter=JitterSpec(fraction=0.5), backoff_max=300.0)
    rng = random.Random(1)
    when = datetime(2026, 1, 5, 12, 0)
    assert next_delay(push, when, 0, rng) == 0.0  # no jitter, no 1 s floor
    assert [next_delay(Schedule(every=PUSH, backoff_max=300.0), when, n, rng)
            for n in (1, 2, 3, 10)] == [2 * PUSH_RETRY, 4 * PUSH_RETRY, 8 * PUSH_RETRY, 300.0]


def test_push_in_a_window_only() -> None:
    from fermoposta.customer.schedule import PUSH
    office = Schedule(every=3600.0, windows=(Window(WEEKDAYS, 8, 18, PUSH),))
    rng = random.Random(1)
    assert next_delay(office, datetime(2026, 1, 5, 9, 30), 0, rng) == 0.0  # Monday 09:30
    # At night the hourly pull; one that would sleep past 08:00 is cut to reach it.
    assert next_delay(office, datetime(2026, 1, 5, 20, 0), 0, rng) == pytest.approx(3600.0)
    assert next_delay(office, datetime(2026, 1, 6, 7, 30), 0, rng) == pytest.approx(1800.0)


@pytest.mark.parametrize(("value", "expected"), [("push", 0.0), ("PUSH", 0.0), ("10m", 600.0),
                                                 (5, 5.0)])
def test_parse_every(value: object, expected: float) -> None:
    from fermoposta.customer.schedule import parse_every
    assert parse_every(value) == expected


@pytest.mark.parametrize("value", ["0s", "0.5s", "pull", "", True])
def test_parse_every_refuses(value: object) -> None:
    from fermoposta.customer.schedule import parse_every
    with pytest.raises(ValueError, match="push"):
        parse_every(value)
