"""The AUTH throttle (mail/anvil.py) in memory, with a fake clock (issue 8, defect 8)."""

from __future__ import annotations

import pytest

from fermoposta.mail.anvil import (
    KNOWN_ADDRESS_TTL,
    AuthThrottle,
    ThrottleSettings,
    address_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw: float) -> tuple[AuthThrottle, Clock]:
    clock = Clock()
    settings = dict(failure_delay=1.0, max_delay=8.0, max_failures_per_ip=5,
                    max_failures_per_account=4, window=600.0, lockout=300.0)
    settings.update(kw)
    return AuthThrottle(ThrottleSettings(**settings), clock=clock), clock  # type: ignore[arg-type]


def test_delay_doubles_per_failure_up_to_the_maximum():
    t, _ = make(max_failures_per_ip=0, max_failures_per_account=0)
    delays = [t.failure("192.0.2.7", None).delay for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_no_delay_when_failure_delay_is_zero():
    t, _ = make(failure_delay=0.0)
    assert t.failure("192.0.2.7", "acme").delay == 0.0


def test_address_locked_after_max_failures_then_released_after_lockout():
    t, clock = make()
    verdicts = [t.failure("192.0.2.7", None) for _ in range(5)]
    assert [v.address_locked for v in verdicts] == [False] * 4 + [True]
    assert verdicts[-1].address_failures == 5
    assert t.address_locked("192.0.2.7") == pytest.approx(300.0)
    assert t.address_locked("192.0.2.8") == 0.0  # another address is not concerned
    clock.now += 299
    assert t.address_locked("192.0.2.7") == pytest.approx(1.0)
    clock.now += 1
    assert t.address_locked("192.0.2.7") == 0.0
    # after the lockout the count starts again
    assert t.failure("192.0.2.7", None).delay == 1.0


def test_failures_are_forgotten_after_the_window():
    t, clock = make()
    for _ in range(4):
        t.failure("192.0.2.7", None)
    clock.now += 600
    v = t.failure("192.0.2.7", None)
    assert v.address_failures == 1 and not v.address_locked and v.delay == 1.0


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4():
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("not-an-address") == "not-an-address"
    t, _ = make()
    for i in range(5):
        t.failure(f"2001:db8:1:2::{i + 1}", None)
    assert t.address_locked("2001:db8:1:2::abcd") > 0


def test_account_delay_follows_the_account_across_addresses():
    t, _ = make(max_failures_per_ip=0, max_failures_per_account=0)
    delays = [t.failure(f"198.51.100.{i}", "acme").delay for i in range(1, 5)]
    assert delays == [1.0, 2.0, 4.0, 8.0]  # every address new, the account's count grows


def test_locked_account_refuses_suspect_addresses_only():
    t, clock = make(max_failures_per_ip=0)
    # the customer logged in from its usual address before the attack
    t.success("203.0.113.5", "acme")
    verdicts = [t.failure(f"198.51.100.{i}", "acme") for i in range(1, 5)]
    assert [v.account_locked for v in verdicts] == [False] * 3 + [True]
    # the attacker's addresses (they failed) are refused, right password or not
    assert t.account_refused("198.51.100.1", "acme")
    assert t.account_refused("198.51.100.4", "acme")
    # a clean address and the customer's known one are checked as usual
    assert not t.account_refused("192.0.2.99", "acme")
    assert not t.account_refused("203.0.113.5", "acme")
    # another account is not concerned, nor an unnamed one
    assert not t.account_refused("198.51.100.1", "other")
    assert not t.account_refused("198.51.100.1", None)
    # the lockout ends
    clock.now += 300
    assert not t.account_refused("198.51.100.1", "acme")


def test_known_good_address_survives_its_own_typo_during_an_attack():
    t, _ = make(max_failures_per_ip=0)
    t.success("203.0.113.5", "acme")
    t.failure("203.0.113.5", "acme")  # the customer mistypes once
    for i in range(1, 5):
        t.failure(f"198.51.100.{i}", "acme")
    assert not t.account_refused("203.0.113.5", "acme")


def test_known_good_addresses_expire():
    t, clock = make(max_failures_per_ip=0, window=10 * KNOWN_ADDRESS_TTL,
                    lockout=10 * KNOWN_ADDRESS_TTL)
    t.success("203.0.113.5", "acme")
    t.failure("203.0.113.5", None)
    for i in range(1, 5):
        t.failure(f"198.51.100.{i}", "acme")
    assert not t.account_refused("203.0.113.5", "acme")
    clock.now += KNOWN_ADDRESS_TTL
    assert t.account_refused("203.0.113.5", "acme")


def test_success_does_not_clear_the_address_count():
    """Else an attacker with an account of his own resets his count between guesses."""
    t, _ = make()
    for _ in range(4):
        t.failure("192.0.2.7", "victim")
    t.success("192.0.2.7", "mine")
    assert t.failure("192.0.2.7", "victim").address_locked


def test_zero_maximums_turn_lockouts_off():
    t, _ = make(max_failures_per_ip=0, max_failures_per_account=0)
    for _ in range(100):
        v = t.failure("192.0.2.7", "acme")
        assert not v.address_locked and not v.account_locked
    assert t.address_locked("192.0.2.7") == 0.0
    assert not t.account_refused("192.0.2.7", "acme")


def test_tables_are_bounded():
    t, _ = make(max_entries=100, max_failures_per_ip=2)
    for i in range(1000):
        t.failure(f"10.0.{i // 256}.{i % 256}", None)
        t.success(f"10.0.{i // 256}.{i % 256}", f"user{i}")
    addresses, accounts, known = t.sizes()
    assert addresses <= 100 and known <= 100
    assert accounts == 0  # unnamed failures count per address only


def test_expired_entries_make_room_before_live_ones():
    t, clock = make(max_entries=2, max_failures_per_ip=2, lockout=3000.0)
    t.failure("192.0.2.1", None)
    t.failure("192.0.2.1", None)  # locked out until +3000: least recent, but live
    clock.now += 100
    t.failure("192.0.2.2", None)  # forgotten after the 600 s window
    clock.now += 700
    t.failure("192.0.2.3", None)  # full: the expired .2 goes, not the locked .1
    assert t.address_locked("192.0.2.1") > 0


def test_least_recently_failed_is_dropped_when_full():
    t, clock = make(max_entries=2, max_failures_per_ip=2)
    t.failure("192.0.2.1", None)
    t.failure("192.0.2.1", None)  # locked out
    clock.now += 1
    t.failure("192.0.2.2", None)
    clock.now += 1
    t.failure("192.0.2.3", None)  # full: .1 (least recent) goes
    assert t.sizes()[0] == 2
    assert t.address_locked("192.0.2.1") == 0.0


def test_new_settings_keep_the_counts():
    t, _ = make()
    for _ in range(4):
        t.failure("192.0.2.7", None)
    t.settings = ThrottleSettings(failure_delay=0.5, max_delay=8.0, max_failures_per_ip=5,
                                  max_failures_per_account=4, window=600.0, lockout=300.0)
    v = t.failure("192.0.2.7", None)
    assert v.address_locked and v.delay == 8.0


def test_checks_under_way_count_against_the_address() -> None:
    clock = [0.0]
    t = AuthThrottle(ThrottleSettings(max_failures_per_ip=3, failure_delay=0),
                     lambda: clock[0])
    assert t.begin("192.0.2.1") and t.begin("192.0.2.1") and t.begin("192.0.2.1")
    assert not t.begin("192.0.2.1")  # three under way: no fourth
    assert t.begin("192.0.2.2")  # another address is not affected
    t.failure("192.0.2.1", None)
    t.end("192.0.2.1")
    assert not t.begin("192.0.2.1")  # one failure + two under way
    t.success("192.0.2.1", "acme")
    t.end("192.0.2.1")
    assert t.begin("192.0.2.1")  # one failure + one under way
    t.end("192.0.2.1")
    t.end("192.0.2.1")
    t.end("192.0.2.2")
    assert t._in_flight == {}  # nothing left behind
