"""One message's body while it arrives, for DATA and BDAT alike.

Contract:
- `IncomingBody(stage_for)` spools a body (the first `SPOOL_MEMORY` bytes in
  memory, the rest in a temporary file: bounded memory).  `write(data)` is
  the sink of the connection's reads (the trace header goes first, the same
  way).  Once the spool outgrows `SPOOL_MEMORY`, `stage_for(spool)` is asked
  once for a body stage (`TransactionSession.body_stage`); from then on the
  body is also handed to the store while it arrives (`body_stager.Stager`),
  and a stager that cannot start (no descriptor left) only means the enqueue
  stores it all.
- `await ready()` gives the spool at offset 0 and its size once the staging
  job is done (the enqueue then stores only the rest); `stored = True` says
  a receiver took the message.
- `await close()` ends it: what was staged for a message not stored is
  discarded (shielded: a cancelled session still cleans up; a failure is
  logged and left to the store's `sweep_stages`), the spool is closed.
  `abandon()` does the same from synchronous code (RSET, EHLO, the session's
  end): the discard then runs as a task of its own.  Both are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tempfile
from collections.abc import Callable
from typing import IO

from fermoposta.net.body_stager import Stager
from fermoposta.store.base import BodyStage

log = logging.getLogger("fermoposta.smtp")

SPOOL_MEMORY = 1024 * 1024  # bodies above this spill to a temporary file

_Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]
_cleanups: set[asyncio.Future[None]] = set()  # discards under way (kept from the GC)


class IncomingBody:
    """See the module docstring."""

    def __init__(self, stage_for: Callable[[IO[bytes]], BodyStage | None], *,
                 session_id: str = "", logger: _Logger = log) -> None:
        # In memory until it outgrows SPOOL_MEMORY, then a temporary file
        # (`_spill`): what `SpooledTemporaryFile` does, without its Python
        # layer around each write.
        self.spool: IO[bytes] = io.BytesIO()
        self._in_memory = True
        self.stored = False
        self._stage_for = stage_for
        self._session_id = session_id
        self._log = logger
        self._stager: Stager | None = None
        self._staging_tried = False
        self._closed = False

    def write(self, data: bytes) -> None:
        spool = self.spool
        spool.write(data)
        if self._in_memory:
            if spool.tell() <= SPOOL_MEMORY:
                return
            spool = self._spill()
        if self._stager is not None:
            self._stager.written(spool.tell())
        elif not self._staging_tried:
            self._staging_tried = True
            stage = self._stage_for(spool)
            if stage is None:
                return
            try:
                self._stager = Stager(spool, stage)
            except OSError as exc:  # no descriptor left: stored at the end instead
                self._log.warning("%s: cannot store the body while it arrives: %s",
                                  self._session_id, exc)
                return
            self._stager.written(spool.tell())

    def _spill(self) -> IO[bytes]:
        """Move the body from memory into a temporary file (positioned at its end)."""
        memory = self.spool
        assert isinstance(memory, io.BytesIO)
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _end()
        try:
            with memory.getbuffer() as view:
                spool.write(view)
        except BaseException:
            spool.close()
            raise
        memory.close()
        self.spool, self._in_memory = spool, False
        return spool

    async def ready(self) -> tuple[IO[bytes], int]:
        """The spool at offset 0 and its size, staging done."""
        size = self.spool.tell()
        if self._stager is not None:
            await self._stager.finish()  # the rest is stored by the enqueue
        self.spool.seek(0)
        return self.spool, size

    async def close(self) -> None:
        stager = self._end()
        if stager is not None:
            await _discard(stager)

    def abandon(self) -> None:
        """`close()` without waiting (the message is not stored)."""
        stager = self._end()
        if stager is not None:
            task = asyncio.ensure_future(_cleanup(stager))
            _cleanups.add(task)
            task.add_done_callback(_cleanups.discard)
            task.add_done_callback(_log_cleanup_failure)

    def _end(self) -> Stager | None:
        """Close the spool and the stager (once); the stager whose staged
        body must now be discarded, if any."""
        if self._closed:
            return None
        self._closed = True
        stager = self._stager
        try:
            if stager is not None:
                stager.close()
        finally:
            self.spool.close()  # the stager reads a descriptor of its own
        return stager if stager is not None and not self.stored else None


async def _cleanup(stager: Stager) -> None:
    await stager.finish()
    await asyncio.to_thread(stager.stage.discard)


async def _discard(stager: Stager) -> None:
    """What was staged for a message not stored goes, once the stager's
    thread has ended (else its first append could make the placeholder after
    the discard).  Shielded: a cancelled session (shutdown) still cleans up;
    the store logs a failure and sweeps what is left at its next start."""
    task = asyncio.ensure_future(_cleanup(stager))
    task.add_done_callback(_log_cleanup_failure)
    with contextlib.suppress(Exception):  # logged by the callback
        await asyncio.shield(task)


def _log_cleanup_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("discarding a staged body failed", exc_info=task.exception())
