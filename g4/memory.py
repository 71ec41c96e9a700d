"""Run-time memory of a loaded .pte: keep its lookup tables on disk, paged in by the rows a token reads.

ExecuTorch's loader maps the program's constant segment (the embedding tables, which run in portable
kernels) and mlocks it, ignoring a failure. A process bound by `RLIMIT_MEMLOCK` (an app, a normal
user) fails to lock a large segment and pages the tables in on demand; a process with `CAP_IPC_LOCK`
(root) locks every table in RAM. `no_mlock()` makes the lock fail for any process while a program
loads, and `page_on_demand(path)` makes a lookup fault in its row, not the megabytes around it.
Linux only; elsewhere both do nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CAP_IPC_LOCK = 14
_CAP_VERSION_3 = 0x20080522
_MADV_RANDOM = 1


@functools.cache
def libc() -> Any:
    """glibc through ctypes (Linux), or None."""
    if sys.platform != "linux":
        return None
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _caps(set_to: Any = None) -> Any:
    """This thread's capability sets (capget), or set them (capset); None where that fails."""
    lib, head, data = libc(), _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    if lib is None or lib.capget(ctypes.byref(head), data) != 0:
        return None
    if set_to is not None:
        return None if lib.capset(ctypes.byref(head), set_to) != 0 else set_to
    return data


@contextlib.contextmanager
def no_mlock() -> Iterator[None]:
    """Inside this block mlock fails: RLIMIT_MEMLOCK is 0 and this thread's effective CAP_IPC_LOCK is dropped.

    Both are restored after. Load a program inside it to keep its constant segment unlocked.
    """
    if libc() is None:
        yield
        return
    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, limit[1]))
    caps = _caps()
    had = caps is not None and bool(caps[0].effective & (1 << _CAP_IPC_LOCK))
    if had:
        dropped = (_CapData * 2)(*caps)
        dropped[0].effective &= ~(1 << _CAP_IPC_LOCK)
        had = _caps(dropped) is not None
    try:
        yield
    finally:
        if had:
            restored = _caps()
            if restored is not None:
                restored[0].effective |= 1 << _CAP_IPC_LOCK
                _caps(restored)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, limit)


def mappings(path: str | Path) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of each mapping of `path` in this process."""
    name, out = str(Path(path).resolve()), []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for ln in lines:
        parts = ln.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == name:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, int(parts[2], 16)))
    return out


def resident(path: str | Path) -> dict[str, int]:
    """Bytes of this process's mappings of `path` (`/proc/self/smaps`): mapped `Size`, resident `Rss`, `Locked`."""
    name, out, mine = str(Path(path).resolve()), {"Size": 0, "Rss": 0, "Locked": 0}, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return out
    for ln in lines:
        head = ln.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
            mine = len(head) == 6 and head[5] == name
        elif mine and ln.split(":")[0] in out:
            out[ln.split(":")[0]] += int(ln.split()[1]) * 1024
    return out


def page_on_demand(path: str | Path) -> int:
    """Each mapping of `path` faults in the pages it reads and no more; returns the bytes so mapped.

    madvise(MADV_RANDOM) turns off read-ahead, and the mapped range is dropped from the page cache
    (clean pages, re-read from the file when touched): cached pages, in large folios after the file
    was written or read whole, would otherwise be mapped many at a time.
    """
    lib, n = libc(), 0
    if lib is None:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for lo, hi, offset in mappings(path):
            if lib.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_RANDOM) == 0:
                os.posix_fadvise(fd, offset, hi - lo, os.POSIX_FADV_DONTNEED)
                n += hi - lo
    finally:
        os.close(fd)
    return n
