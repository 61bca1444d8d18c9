"""Memory for block data: glibc malloc settings for a daemon that moves large buffers
between threads, and buffers for receiving blocks.

Measured on a cold 512 MiB read (docs/readahead.md): with glibc's defaults each 8 MiB GET
body is a fresh mmap, so every byte costs a page fault and a zeroed page, and each worker
thread grows an arena of its own that is rarely given back (peak RSS ~310 MiB). Keeping
buffers below 32 MiB in the heap and capping arenas at 2 brought the peak to ~230 MiB and
cut the daemon's system time. The heap still returns free memory beyond 16 MiB.

Receive buffers are not zeroed (every byte is written before anyone reads it), and those
of a block or more start on a page, so tier 1 can write them with O_DIRECT as they are.
Zeroing 8 MiB per GET, then copying it again into an aligned buffer for the disk, were
15% and 4% of the time the GIL was held during a cold read (py-spy --gil).
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 2), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 16 << 20))
PAGE = 4096
_ALIGNED_FROM = 64 * 1024  # smaller buffers are not worth a page of slack

_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.restype = ctypes.py_object
_new_bytearray.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)


def receive_buffer(n: int) -> memoryview:
    """n writable bytes, not zeroed; page-aligned if n is 64 KiB or more."""
    if n < _ALIGNED_FROM:
        return memoryview(_new_bytearray(None, n))
    raw = _new_bytearray(None, n + PAGE - 1)
    start = -address(raw) % PAGE
    return memoryview(raw)[start:start + n]


def address(buf) -> int | None:
    """Where a writable buffer's bytes start in memory; None for a read-only one."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except (TypeError, ValueError):  # read-only, or empty
        return None


def tune_malloc() -> None:
    """Apply the settings (before any thread starts); a libc without mallopt is left as is."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("event=malloc_untuned reason=no_mallopt")
        return
    for param, value in _SETTINGS:
        if mallopt(param, value) != 1:
            log.debug("event=malloc_untuned param=%d", param)
