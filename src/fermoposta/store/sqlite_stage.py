"""Big bodies stored while they arrive: the SQLite engine's `stage_body`.

Why: a body stored only after its last byte makes the sender wait for the
whole copy into the store (a 200 MiB message: 0.4 s of inserts and the fsync
of 200 MiB after the final dot) and holds the store's write lock meanwhile,
so every other session's 250 waits too.  Staged, the chunks go in while the
body is still arriving, each in a short transaction of its own, and the
commit after the final dot only adds the tail, the envelope and the
recipients.

Contract (a mixin of `SQLiteStore`, using only its transactions):
- `stage_body(queue_id, body)` returns a `BodyStage`; nothing is written yet.
- The first `append` inserts a placeholder `messages` row under `queue_id`
  with `size = -1` and `client` = this process's holder name
  (`holders.Holders`), then the chunks (`body_chunks`, seq 0, 1, ...).
  Every append is one committed transaction without an fsync of its own
  (`synchronous=NORMAL`: nothing staged was promised to anyone; the
  enqueue's durable commit syncs the whole WAL, these frames included, and
  the checkpoint thread syncs them meanwhile); only the placeholder's own
  data; no view of the queue shows a row with
  size -1 (`queue list`, `queue show`, the actions by id, `queue stats`,
  `is_empty`), and it has no recipient, so nothing drains, delivers or
  expires it.
- A failing append (disk full, a queue id already taken) ends the staging
  (`failed`): it is logged, what was staged is removed (best effort: a
  discard that fails is tried again by the next append of any stage, and
  by the next start's sweep) and the stage forgotten, so the `enqueue`
  stores the whole body the usual way.
- A stage belongs to one body: `stage_body(queue_id, body)` records the
  file object, and only an enqueue of that same object finishes it, so a
  message that drew the same queue id (a collision) never takes another's
  staged bytes; the registry only ever drops its own entry.
- `_finish_stage(conn, message, body, queue_id, now)` is called by
  `_enqueue` inside the enqueue's transaction: when `queue_id` has a live
  stage it turns the placeholder into the message (envelope, arrival time,
  the tail of `body` from the staged size on, then the size) and returns
  (the id, the size); StoreError if the placeholder is gone (an operator removed it:
  the sender gets a 4xx and sends again).  None: no stage, store as usual.
  `_forget_stages(ids)` after that transaction committed.
- `discard()` deletes the placeholder if it is still one (size -1), so it is
  harmless after a successful enqueue; idempotent.
- `sweep_stages()` deletes placeholders whose holder process is dead (a
  crash mid-DATA); `provider run` calls it at start.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from typing import IO, TYPE_CHECKING

from fermoposta.store.base import CHUNK_SIZE, NewMessage, StoreError, bytes_after
from fermoposta.store.holders import Holders

log = logging.getLogger("fermoposta.store")

STAGING = -1  # messages.size of a placeholder


class SQLiteStage:
    """One staged body; see the module docstring."""

    def __init__(self, owner: SQLiteStaging, queue_id: str, body: IO[bytes]) -> None:
        self._owner = owner
        self.queue_id = queue_id
        self.body = body  # only an enqueue of this very file object finishes it
        self.seq = 0  # chunks stored
        self._size = 0
        self.started = False  # the placeholder exists
        self._failed = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def failed(self) -> bool:
        return self._failed

    def fail(self) -> None:
        self._failed = True

    def append(self, data: bytes) -> None:
        self._owner._append_stage(self, data)

    def added(self, chunks: int, size: int) -> None:
        self.seq += chunks
        self._size += size

    def discard(self) -> None:
        self._owner._discard_stage(self)


class SQLiteStaging:
    """`stage_body` and `sweep_stages` of `SQLiteStore`."""

    _clock: Callable[[], float]
    _node: str
    _holders: Holders

    if TYPE_CHECKING:  # provided by SQLiteStore
        def _write(self, *, durable: bool = True
                   ) -> AbstractContextManager[sqlite3.Connection]: ...

        def _read(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def _init_staging(self) -> None:
        self._stages: dict[str, SQLiteStage] = {}
        self._stages_lock = threading.Lock()
        self._undiscarded: set[str] = set()  # placeholders a discard failed to remove

    def stage_body(self, queue_id: str, body: IO[bytes]) -> SQLiteStage:
        return SQLiteStage(self, queue_id, body)

    def _unregister(self, stage: SQLiteStage) -> None:
        with self._stages_lock:
            if self._stages.get(stage.queue_id) is stage:
                del self._stages[stage.queue_id]

    def _append_stage(self, stage: SQLiteStage, data: bytes) -> None:
        if stage.failed or not data:
            return
        view = memoryview(data)  # chunks bound as BLOBs without a copy of their own
        chunks = [view[i:i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]
        with self._stages_lock:
            retry = sorted(self._undiscarded)
        try:
            with self._write(durable=False) as conn:
                for queue_id in retry:  # earlier discards that failed
                    conn.execute("DELETE FROM messages WHERE id = ? AND size = ?",
                                 (queue_id, STAGING))
                if not stage.started:
                    conn.execute(
                        "INSERT INTO messages (id, sender, received_at, size, origin, smtputf8,"
                        " body_8bit, envid, ret, client, node)"
                        " VALUES (?, '', ?, ?, 'mx', 0, 0, NULL, NULL, ?, ?)",
                        (stage.queue_id, self._clock(), STAGING, self._holders.me(),
                         self._node))
                conn.executemany(
                    "INSERT INTO body_chunks (message_id, seq, data) VALUES (?, ?, ?)",
                    [(stage.queue_id, stage.seq + i, chunk) for i, chunk in enumerate(chunks)])
        except (StoreError, OSError) as exc:
            log.warning("%s: storing the body while it arrives failed (%s); it will be "
                        "stored at the end of DATA", stage.queue_id, exc)
            stage.fail()
            self._unregister(stage)
            if stage.started:
                self._discard_stage(stage)
            return
        with self._stages_lock:
            self._undiscarded.difference_update(retry)
            stage.started = True
            stage.added(len(chunks), len(data))
            if stage.queue_id not in self._stages:
                self._stages[stage.queue_id] = stage

    def _discard_stage(self, stage: SQLiteStage) -> None:
        self._unregister(stage)
        if not stage.started:
            return
        try:
            with self._write() as conn:
                conn.execute("DELETE FROM messages WHERE id = ? AND size = ?",
                             (stage.queue_id, STAGING))
        except (StoreError, OSError) as exc:
            log.warning("%s: could not remove the body staged for a message not accepted "
                        "(%s); tried again with the next big message, and at the next "
                        "provider start", stage.queue_id, exc)
            with self._stages_lock:
                self._undiscarded.add(stage.queue_id)

    def _finish_stage(self, conn: sqlite3.Connection, message: NewMessage, body: IO[bytes],
                      queue_id: str | None, now: float) -> tuple[str, int] | None:
        if queue_id is None:
            return None
        with self._stages_lock:
            stage = self._stages.get(queue_id)
        if stage is None or stage.body is not body or stage.failed or not stage.started:
            return None  # not this body's stage (another message drew the same id)
        cur = conn.execute(
            "UPDATE messages SET sender = ?, received_at = ?, origin = ?, smtputf8 = ?,"
            " body_8bit = ?, envid = ?, ret = ?, client = ?, node = ?, wire_ready = ?"
            " WHERE id = ? AND size = ?",
            (message.sender, now, str(message.origin), int(message.smtputf8),
             int(message.body_8bit), message.envid, message.ret, message.client, self._node,
             int(message.wire_ready), queue_id, STAGING))
        if cur.rowcount != 1:
            raise StoreError(f"the body staged for {queue_id} is no longer in the store")
        body.seek(stage.size)
        size, seq = stage.size, stage.seq
        while True:
            data = body.read(CHUNK_SIZE)
            if not data:
                break
            conn.execute("INSERT INTO body_chunks (message_id, seq, data) VALUES (?, ?, ?)",
                         (queue_id, seq, bytes(data)))
            size += len(data)
            seq += 1
            del data
        conn.execute("UPDATE messages SET size = ? WHERE id = ?", (size, queue_id))
        return queue_id, size

    def _bytes_to_copy(self, body: IO[bytes], queue_id: str | None) -> int:
        """How many bytes of `body` an enqueue would copy into the store, from
        its position; as if endless when it cannot tell, or when the body has
        a live stage (the commit's fsync would then also flush the staged
        part, which its own commits did not).  The position is kept:
        `StoreError` if it cannot be put back."""
        with self._stages_lock:
            if queue_id is not None and queue_id in self._stages:
                return sys.maxsize
        remaining = bytes_after(body)
        return sys.maxsize if remaining is None else remaining

    def _forget_stages(self, queue_ids: Collection[str]) -> None:
        """After the enqueue that made them messages has committed."""
        with self._stages_lock:
            for queue_id in queue_ids:
                self._stages.pop(queue_id, None)

    def sweep_stages(self) -> int:
        # The scan (no index on size) runs as a read, so the write lock is
        # taken only when there is something to remove.
        with self._read() as conn:
            rows = conn.execute("SELECT id, client FROM messages WHERE size = ?",
                                (STAGING,)).fetchall()
        dead = [str(r[0]) for r in rows if not self._holders.is_alive(str(r[1]))]
        if dead:
            with self._write() as conn:
                for queue_id in dead:  # a dead holder's placeholder stays one
                    conn.execute("DELETE FROM messages WHERE id = ? AND size = ?",
                                 (queue_id, STAGING))
        if dead:
            log.info("removed %d staged %s of messages whose DATA a stopped process never "
                     "finished (%s)", len(dead), "body" if len(dead) == 1 else "bodies",
                     ", ".join(dead[:10]))
        return len(dead)
