"""`store.base.new_queue_id`: 12 upper-case hex digits, the time first (in
1/256 s, wrapping every 68 minutes) so that ids drawn together sort
together, then 28 random bits.  (That the stores draw again on a collision
is in test_contract_messages.py and test_group_commit.py.)"""

from __future__ import annotations

import re
import types

import pytest

from fermoposta.store import base
from fermoposta.store.base import new_queue_id

WRAP = (1 << base.QUEUE_ID_SLOT_BITS) / base.QUEUE_ID_SLOTS_PER_SECOND  # seconds


def at(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The clock the queue ids read (theirs alone) stopped at `seconds`."""
    monkeypatch.setattr(base, "time", types.SimpleNamespace(time=lambda: seconds))


def test_twelve_upper_case_hex_digits() -> None:
    assert all(re.fullmatch(r"[0-9A-F]{12}", new_queue_id()) for _ in range(1000))


def test_the_time_comes_first_in_256ths_of_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    start = 1_765_000_000.0
    at(monkeypatch, start)
    first = new_queue_id()[:5]
    assert first == f"{int(start * 256) % (1 << 20):05X}"
    at(monkeypatch, start + 1 / 256)
    assert int(new_queue_id()[:5], 16) == int(first, 16) + 1
    at(monkeypatch, start + 10)  # ten seconds on: 2,560 slots later
    assert int(new_queue_id()[:5], 16) == int(first, 16) + 2560


def test_ids_drawn_later_sort_later_until_the_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    wrap_start = 1_765_000_000 // WRAP * WRAP + WRAP  # the time part is 00000 here
    ids = []
    for step in range(0, 60 * 60, 37):  # an hour, a draw every 37 s
        at(monkeypatch, wrap_start + step)
        ids.append(new_queue_id())
    assert ids[0].startswith("00000")
    assert ids == sorted(ids)
    at(monkeypatch, wrap_start + WRAP - 1 / 256)
    assert new_queue_id().startswith("FFFFF")
    at(monkeypatch, wrap_start + WRAP)
    assert new_queue_id().startswith("00000")


def test_the_random_part_varies_within_one_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    at(monkeypatch, 1_765_000_000.0)
    ids = {new_queue_id() for _ in range(2000)}
    assert len({queue_id[:5] for queue_id in ids}) == 1
    # 2,000 draws of 28 bits: a repeat is a 0.7% chance, two are rare.
    assert len(ids) >= 1998
