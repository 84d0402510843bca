"""Hand a big DATA body to the store while it still arrives.

Contract:
- A stage is what a receiver's store offers (`store.base.BodyStage`, from
  `stage_body(queue_id, spool)`; see `fermoposta.store.sqlite_stage`):
  `size` (bytes stored), blocking `append(data)` that never raises (a
  failure ends the staging: `failed` turns true and `size` stops growing),
  blocking idempotent `discard()`.
- `Stager(spool, stage)` is made on the event loop once the DATA spool has
  spilled to its temporary file.  `written(total)` (on the loop, after each
  write to the spool) flushes the spool's buffer to its file and, when at
  least `STAGE_PIECE` bytes are there and not yet handed on, starts one job
  on the stagers' own small thread pool (`STAGE_THREADS`: big uploads never
  take the workers the other sessions' commits and lookups need).  The job
  reads them back with `os.pread` on a duplicate of the spool's descriptor
  (the loop's file position is never touched) and appends them, up to
  `STAGE_BATCH` bytes per append, until fewer than a piece remain.  One job
  at a time per stager; memory stays bounded by `STAGE_BATCH`.  Once the
  stage has failed nothing more is read or started.
- `await finish()` waits for the job (the final enqueue then stores only the
  rest: `stage.size` onwards).  `close()` stops further work; the duplicate
  descriptor is closed by whichever of `close()` and the running job comes
  last, so it is never closed under a `pread`.  The spool itself stays the
  caller's, whole: the enqueue still reads it (from `stage.size` on, or all
  of it if staging failed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from fermoposta.store.base import CHUNK_SIZE, BodyStage

log = logging.getLogger("fermoposta.smtp")

STAGE_PIECE = CHUNK_SIZE  # staged in whole chunks of the store
STAGE_BATCH = 16 * STAGE_PIECE  # bytes per append (one transaction)
STAGE_THREADS = 2  # a SQLite store takes one writer at a time anyway

_executor = ThreadPoolExecutor(STAGE_THREADS, thread_name_prefix="body-stager")


class Stager:
    def __init__(self, spool: IO[bytes], stage: BodyStage) -> None:
        self.spool = spool
        self.stage = stage
        self._fd: int | None = os.dup(spool.fileno())
        self._flushed = 0
        self._job: asyncio.Future[None] | None = None
        self._lock = threading.Lock()
        self._running = False  # a job is in its thread (guarded by _lock)
        self._closing = False

    def written(self, total: int) -> None:
        if self._closing or self.stage.failed:
            return
        self.spool.flush()
        self._flushed = total
        busy = self._job is not None and not self._job.done()
        if not busy and total - self.stage.size >= STAGE_PIECE:
            with self._lock:
                if self._fd is None:
                    return
                self._running = True
            self._job = asyncio.get_running_loop().run_in_executor(_executor, self._run)

    def _run(self) -> None:
        try:
            self._stage_what_is_there()
        except Exception:  # a bug here must not cost the message: the enqueue stores it all
            log.exception("storing the DATA body early failed")
        finally:
            with self._lock:
                self._running = False
                if self._closing:
                    self._close_fd()

    def _stage_what_is_there(self) -> None:
        fd = self._fd
        while fd is not None and not self._closing and not self.stage.failed:
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

    async def finish(self) -> None:
        if self._job is not None:
            await asyncio.shield(self._job)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if not self._running:
                self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
