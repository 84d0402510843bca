"""What the queue commands (`provider.queue_admin`, `queue_view`,
`queue_actions`) share: paging through the queue, and small helpers.

Contract:
- `BATCH` is the most messages one store call reads or changes (one short
  transaction each, so a live provider keeps working meanwhile); `pages`,
  `chunks` and `all_ids` are the only users (patch `BATCH` here).
- `pages(fetch, where, after, key)`: every item `fetch` returns for `where`
  after the key `after`, `BATCH` a call; `all_ids(store, start)`: pages of
  the ids of every message received before `start`; `chunks(items)`:
  `items` `BATCH` at a time.
- `normalize_id(text)`: a queue id as compared (upper case, a trailing `*`
  or `!` from `list` dropped); `plural(n, word)`: "1 message", "2 messages".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from fermoposta.store.base import AdminStore, QueueFilter

__all__ = ["BATCH", "all_ids", "chunks", "normalize_id", "pages", "plural"]

BATCH = 500  # messages per store call (one short transaction each)

_T = TypeVar("_T")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def normalize_id(text: str) -> str:
    return text.strip().rstrip("*!").upper()


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def all_ids(store: AdminStore, start: float) -> Iterator[list[str]]:
    """Pages of the ids of every message received before `start`."""
    where = QueueFilter(received_before=start)
    after: tuple[float, str] | None = None
    while True:
        page = store.queue_ids(where, after, BATCH)
        if not page:
            return
        yield [message_id for _, message_id in page]
        if len(page) < BATCH:
            return
        after = page[-1]


def pages(fetch: Callable[[QueueFilter, tuple[float, str] | None, int], list[_T]],
          where: QueueFilter, after: tuple[float, str] | None,
          key: Callable[[_T], tuple[float, str]]) -> Iterator[_T]:
    """Every item `fetch` returns for `where` after the key `after`, BATCH a call."""
    while True:
        page = fetch(where, after, BATCH)
        yield from page
        if len(page) < BATCH:
            return
        after = key(page[-1])
