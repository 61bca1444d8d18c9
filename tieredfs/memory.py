"""Memory for block data: glibc malloc settings for a daemon that moves large buffers
between threads, buffers for receiving blocks, and a pool that reuses the large ones.

Measured on a cold 512 MiB read (docs/readahead.md): with glibc's defaults each 8 MiB GET
body is a fresh mmap, so every byte costs a page fault and a zeroed page, and each worker
thread grows an arena of its own that is rarely given back (peak RSS ~310 MiB). Keeping
buffers below 32 MiB in the heap and capping arenas at 2 brought the peak to ~230 MiB and
cut the daemon's system time. The heap still returns free memory beyond 16 MiB.

Receive buffers are not zeroed (every byte is written before anyone reads it), and those
of a block or more start on a page, so tier 1 can write them with O_DIRECT as they are.
Zeroing 8 MiB per GET, then copying it again into an aligned buffer for the disk, were
15% and 4% of the time the GIL was held during a cold read (py-spy --gil).

Large buffers are reused, not freed (`BufferPool`): on this machine (a VM whose balloon
device reports free pages to the host, which most likely makes a freed page new again) the
first touch of a page costs ~2 us, 0.55 ms per MiB against 0.02 ms for memory touched before. A cold 1 GiB read with a new buffer per block took
72,000-102,000 page faults in the daemon, most of them filling receive buffers; reused,
27,000-32,000, nearly all of them the pool's first fill (docs/readahead.md).
"""

import ctypes
import ctypes.util
import logging
import mmap
import threading
import weakref

from .stats import Counters

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 2), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 16 << 20))
PAGE = 4096
ALIGNED_FROM = 64 * 1024  # smaller buffers are not worth a page of slack


def in_pages(n: int) -> int:
    """n bytes rounded up to whole pages."""
    return -(-n // PAGE) * PAGE

_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.restype = ctypes.py_object
_new_bytearray.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)


def receive_buffer(n: int) -> memoryview:
    """n writable bytes, not zeroed; page-aligned if n is 64 KiB or more."""
    if n < ALIGNED_FROM:
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


def _release_heap() -> None:
    """Give the heap's free pages back to the system. Blocks under 64 KiB (small files) come
    from malloc, and the heap returns memory only from its top: after a cold walk of 2,000
    small files an idle daemon stayed at ~112 MiB of RSS. A few ms, every trim period."""
    if _libc is not None:
        _libc.malloc_trim(0)


try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim.argtypes = (ctypes.c_size_t,)
except (OSError, AttributeError):
    _libc = None


_POOLED_FROM = ALIGNED_FROM  # smaller buffers come from malloc, which reuses them well enough
_KEEP = 16 << 20
_exporters: dict[int, type] = {}


def _exporter(size: int) -> type:
    """A ctypes array type over `size` bytes of a pool's mapping. Its instance is what every
    view of a pooled buffer refers to, so its death (a weak reference says when) is the
    moment the buffer is free again; a Python subclass, since only those take weak references."""
    cls = _exporters.get(size)
    if cls is None:
        cls = _exporters[size] = type("PooledBuffer", (ctypes.c_char * size,), {})
    return cls


class BufferPool:
    """Page-aligned buffers of 64 KiB or more, handed out as plain memoryviews and reused once
    the last view of one is gone (from any thread): nobody gives a buffer back by hand.

    At most `keep` bytes wait in the pool for reuse; a buffer freed beyond that is unmapped.
    `trim()` (every half minute or so) unmaps the buffers no take() needed since the last trim,
    so an idle daemon gives its peak back.
    """

    def __init__(self, keep: int = _KEEP, counters: Counters | None = None):
        self.keep = keep
        self.counters = counters or Counters("memory")
        # Re-entrant: a buffer caught in a reference cycle (an exception's traceback) is freed
        # by the garbage collector, which may run at any allocation, even under this lock.
        self._lock = threading.RLock()
        self._free: dict[int, list[mmap.mmap]] = {}  # by size; the oldest first
        self._unused: dict[int, int] = {}  # by size: buffers none of the takes since trim() needed
        self._free_bytes = 0
        self._lent_bytes = 0
        self._out: dict[int, tuple[weakref.ref, int, mmap.mmap]] = {}  # by id of the weak ref

    def take(self, n: int, wait: bool = True) -> memoryview:
        """n writable bytes, not zeroed; page-aligned if n is 64 KiB or more.

        With wait=False (the trio thread) the pool's lock is only tried: if another thread
        holds it, or no buffer of the size is free, the bytes are a new buffer of the heap,
        not pooled (mapping one is a system call, and the trio thread waits for neither)."""
        size = in_pages(n)
        if size < _POOLED_FROM or not self._lock.acquire(blocking=wait):
            return receive_buffer(n)
        try:
            free = self._free.get(size)
            mapping = free.pop() if free else None
            if mapping is not None:
                self._free_bytes -= size
                self._unused[size] = min(self._unused[size], len(free))
                view = self._lend(mapping, size)
        finally:
            self._lock.release()
        if mapping is not None:
            self.counters.add("pool_reused")
        elif not wait:
            return receive_buffer(n)
        else:
            mapping = mmap.mmap(-1, size)
            self.counters.add("pool_new")
            with self._lock:
                view = self._lend(mapping, size)
        return view if size == n else view[:n]

    def _lend(self, mapping: mmap.mmap, size: int) -> memoryview:
        """A view of `mapping`, which comes back to the pool when its last view is gone
        (holding the lock)."""
        holder = _exporter(size).from_buffer(mapping)
        ref = weakref.ref(holder, self._returned)
        self._out[id(ref)] = (ref, size, mapping)
        self._lent_bytes += size
        return memoryview(holder).cast("B")

    def _returned(self, ref: weakref.ref) -> None:
        with self._lock:
            _, size, mapping = self._out.pop(id(ref))
            self._lent_bytes -= size
            if self._free_bytes + size > self.keep:
                return  # unmapped as soon as its dying holder lets go of it
            free = self._free.setdefault(size, [])
            if not free:
                self._unused[size] = 0
            free.append(mapping)
            self._free_bytes += size

    def trim(self) -> int:
        """Unmap the free buffers that no take() has needed since the last trim; their bytes."""
        freed = 0
        with self._lock:
            for size, free in list(self._free.items()):
                idle = self._unused.get(size, 0)
                closed = 0
                for mapping in free[:idle]:
                    try:
                        mapping.close()
                    except BufferError:  # its last holder is still being torn down: next time
                        break
                    closed += 1
                del free[:closed]
                freed += closed * size
                self._unused[size] = len(free)
            self._free_bytes -= freed
        _release_heap()
        return freed

    def gauges(self) -> dict[str, int]:
        with self._lock:
            return {"memory.pool_free_bytes": self._free_bytes,
                    "memory.pool_lent_bytes": self._lent_bytes}
