"""Start writing a file's dirty pages to disk now, without waiting (a hint).

Contract:
- `start_writeback(fd)` asks the kernel to begin writing back every dirty
  page of the open file `fd` and returns at once: Linux
  ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)`` (sync_file_range(2)),
  looked up once through ctypes.  Elsewhere, or when the call is missing or
  fails, it does nothing.  It never raises, and it does not wait for the
  writes to complete (the kernel may make it wait for a free slot in the
  device's request queue: callers run it in a worker thread).
- It promises NOTHING about durability: sync_file_range(2) neither writes
  the file's metadata nor flushes the disk's cache.  Callers still fsync
  before they answer 250; they call this earlier so that the fsync finds
  the data already written and its blocks allocated, and several files'
  fsyncs then share journal commits instead of each forcing
  its own.  Measured on ext4: 3,000 4 KiB Maildir files in groups of 16,
  0.94-1.10 s with fsync alone, 0.61-0.81 s with this
  hint first (bench/README.md).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>

_call: Callable[[int, int, int, int], int] | None = None
_looked_up = False


def _lookup() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own C library
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    call: Callable[[int, int, int, int], int] = function
    return call


def start_writeback(fd: int) -> None:
    """Begin writing back `fd`'s dirty pages (a hint; see the module docstring)."""
    global _call, _looked_up
    if not _looked_up:
        _call, _looked_up = _lookup(), True
    if _call is not None:
        _call(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # -1 (errno set) is ignored: a hint
