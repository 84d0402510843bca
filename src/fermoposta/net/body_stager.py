"""Hand a big DATA body to the store while it still arrives.

Contract:
- `BodyStage` is what a receiver's store offers (`store.stage_body`, see
  `fermoposta.store.sqlite_stage`): `size` (bytes stored), blocking
  `append(data)` that never raises (a failure ends the staging and `size`
  stops growing), blocking idempotent `discard()`.
- `Stager(spool, stage)` is made on the event loop once the DATA spool has
  spilled to its temporary file.  `written(total)` (on the loop, after each
  write to the spool) flushes the spool's buffer to its file and, when at
  least `STAGE_PIECE` bytes are there and not yet handed on, starts one
  worker thread that reads them back with `os.pread` on a duplicate of the
  spool's descriptor (the loop's file position is never touched) and
  appends them, up to `STAGE_BATCH` bytes per append, until fewer than a
  piece remain or the stage stops growing.  One thread at a time; memory
  stays bounded by `STAGE_BATCH`.
- `await finish()` waits for that thread (the final enqueue then stores only
  the rest: `stage.size` onwards).  `close()` gives the duplicate
  descriptor back, at once or when the thread ends; nothing starts after
  it.  The spool itself stays the caller's, whole: the enqueue still reads
  it (from `stage.size` on, or all of it if staging failed).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import IO, Protocol

log = logging.getLogger("fermoposta.smtp")

STAGE_PIECE = 256 * 1024  # the store's chunk size: staged in whole chunks
STAGE_BATCH = 16 * STAGE_PIECE  # bytes per append (one transaction)


class BodyStage(Protocol):
    @property
    def size(self) -> int: ...

    def append(self, data: bytes) -> None: ...

    def discard(self) -> None: ...


class Stager:
    def __init__(self, spool: IO[bytes], stage: BodyStage) -> None:
        self.spool = spool
        self.stage = stage
        self._fd: int | None = os.dup(spool.fileno())
        self._flushed = 0
        self._task: asyncio.Future[None] | None = None
        self._closing = False

    def written(self, total: int) -> None:
        if self._closing:
            return
        self.spool.flush()
        self._flushed = total
        busy = self._task is not None and not self._task.done()
        if not busy and total - self.stage.size >= STAGE_PIECE:
            self._task = asyncio.ensure_future(asyncio.to_thread(self._run))

    def _run(self) -> None:
        try:
            self._stage_what_is_there()
        except Exception:  # a bug here must not cost the message: the enqueue stores it all
            log.exception("storing the DATA body early failed")

    def _stage_what_is_there(self) -> None:
        fd = self._fd
        while fd is not None and not self._closing:
            start = self.stage.size
            whole = (self._flushed - start) // STAGE_PIECE * STAGE_PIECE
            if whole <= 0:
                return
            try:
                data = os.pread(fd, min(whole, STAGE_BATCH), start)
            except OSError as exc:
                log.warning("cannot read back the DATA spool to store it early: %s", exc)
                return
            if not data:
                return
            self.stage.append(data)
            del data
            if self.stage.size <= start:
                return  # the stage failed: the enqueue stores it all

    async def finish(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def close(self) -> None:
        self._closing = True
        if self._task is None or self._task.done():
            self._close_fd()
        else:
            self._task.add_done_callback(lambda _: self._close_fd())

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
