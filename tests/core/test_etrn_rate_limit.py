"""The ETRN rate limit under a race, made deterministic: two ETRNs for one
domain both counted before either recorded its own (as two connections on
two nodes can).  Never both may go on."""

from __future__ import annotations

import threading

from fermoposta.provider.etrn import EtrnService


class Counter:
    """A RateCounter in memory; with `race`, each thread's first count waits
    until both threads have counted (both see no ETRN yet)."""

    def __init__(self, race: threading.Barrier | None = None) -> None:
        self.events: list[tuple[str, float]] = []
        self.lock = threading.Lock()
        self.race = race
        self.counted = threading.local()

    def count_events(self, key: str, since: float) -> int:
        with self.lock:
            n = sum(1 for k, at in self.events if k == key and at > since)
        if self.race is not None and not getattr(self.counted, "once", False):
            self.counted.once = True
            self.race.wait(5)
        return n

    def add_event(self, key: str, at: float, window: float) -> int:
        with self.lock:
            self.events.append((key, at))
            return sum(1 for k, t in self.events if k == key and t > at - window)


def test_two_etrns_racing_past_the_first_count_do_not_both_go_on() -> None:
    store = Counter(threading.Barrier(2))
    service = EtrnService(store, interval=60.0, clock=lambda: 1000.0)  # type: ignore[arg-type]
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(
        service._rate_limit(["etrn.example"]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 2
    assert sum(len(r) for r in results) <= 1, results  # at worst none, never both


def test_without_a_race_one_etrn_per_interval() -> None:
    store = Counter()
    clock = [1000.0]
    service = EtrnService(store, interval=60.0, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert service._rate_limit(["a.example", "b.example"]) == ["a.example", "b.example"]
    assert service._rate_limit(["a.example"]) == []
    assert len(store.events) == 2  # a refused ETRN records nothing
    clock[0] += 61.0
    assert service._rate_limit(["a.example"]) == ["a.example"]
