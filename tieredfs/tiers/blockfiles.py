"""Tier 1's files on disk: one sparse file per object version, each block at its own offset
(index x block size), written once with O_DIRECT where the filesystem allows, read through
descriptors kept open between reads (a bounded LRU), freed block by block by punching holes.

One file per object rather than per block: creating a file per 1 MiB block made ext4
allocate an inode each time (with many deleted lately, `recently_deleted` and
`find_get_block_common` were a third of a fill's CPU), and in a cold read of 1 GiB the
fills held the read back: in an interleaved A/B here, 340-460 MiB/s with a file per block,
480-500 MiB/s with a file per object, and half the daemon's system time.

Writing: new files written through the page cache ran into the kernel's dirty-page
throttling within a few hundred MiB: measured here, 4 threads writing new 1 MiB files
went from 3,300 MiB/s to 640 MiB/s at 3 ms of CPU per MiB, and the cache fill capped
cold reads at ~400 MiB/s. With O_DIRECT the same writes ran at 1,800-1,950 MiB/s and
0.45 ms of CPU per MiB, steadily. Blocks from S3 arrive in page-aligned buffers and are
written as they are; others (an object's short last block) go through an aligned buffer
from the pool.

Reading: a 4 KiB random read from tier 1 is mostly fixed cost; an open() and close() per read
was a tenth of it. Keeping descriptors open also lets the trio thread try a read that
cannot block (RWF_NOWAIT: the bytes come from the page cache or not at all) before it
pays for a hop to a worker thread.

A descriptor is closed only when no reader holds it, so a read never lands on a
descriptor number that was closed and reused for another file. A file holds one object
version's bytes (its name says which), so an open descriptor never goes stale; it is
forgotten when its file is unlinked, by us (its last block evicted) or by anyone else
(checked at most once a second: the read then misses, as it would without us). Bytes of an evicted
block read as zeros once its hole is punched: the checksums catch a read that raced it.
"""

import ctypes
import errno
import os
import threading
import time
from collections import OrderedDict, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

# O_DIRECT wants buffer, offset and length page-aligned.
from .. import private
from ..memory import ALIGNED_FROM, PAGE, BufferPool, address, in_pages

_LINK_CHECK_SECONDS = 1.0


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _write_all(fd: int, datas: list, offset: int) -> int:
    """Consecutive buffers from `offset` in as few system calls as the kernel takes (one,
    unless a write is short); returns the offset after them. An OSError says where the
    bytes on disk stop (`failed_at`)."""
    views = [memoryview(d).cast("B") for d in datas]
    while views:
        try:
            n = os.pwritev(fd, views, offset)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
        except OSError as e:
            e.failed_at = offset  # the bytes before it are on disk (a short write, then this)
            raise
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return offset


def _direct_ready(data) -> bool:
    """Whether O_DIRECT can take the buffer as it is: page-aligned start and length (the
    receive buffers of memory.py are)."""
    start = address(data)
    return len(data) % PAGE == 0 and start is not None and start % PAGE == 0


class _Writer:
    """The descriptor of one BlockFiles.writer(): O_DIRECT until the filesystem refuses it."""

    def __init__(self, files: "BlockFiles", path: Path):
        self.files = files
        self.path = path
        self.fd: int | None = None
        self.direct = False

    def write(self, offset: int, datas: list, shared: bool = False) -> None:
        """Consecutive blocks from `offset`. Blocks that are ready for O_DIRECT go in one
        system call: in a busy daemon each call that lets the GIL go costs a wait to get it
        back. Beside one busy Python thread, 4 writers filled 134 MiB/s one block per call,
        175-199 MiB/s one call per run (bench/cache_writes.py). `shared`: the file is a
        segment, where other objects may lie beyond these blocks."""
        if self.fd is None:
            self._open()
        if self.direct:
            try:
                self._write_direct(offset, datas, shared)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._refused()
        _write_all(self.fd, datas, offset)

    def _write_direct(self, offset: int, datas: list, shared: bool) -> None:
        ready: list = []
        for data in datas:
            if _direct_ready(data):
                ready.append(data)
                continue
            offset = _write_all(self.fd, ready, offset)
            ready = []
            self.files._write_padded(self.fd, offset, data, cut=not shared)
            offset += len(data)
        _write_all(self.fd, ready, offset)

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        if self.files._direct:
            try:
                self.fd, self.direct = self.files._open_new(self.path, flags | os.O_DIRECT), True
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.files._direct = False
        self.fd, self.direct = self.files._open_new(self.path, flags), False

    def _refused(self) -> None:
        """No O_DIRECT on this filesystem, or not with 4 KiB alignment: write through the page
        cache from now on (the block is written again, whole)."""
        self.files._direct = False
        self.close()
        self._open()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Open:
    __slots__ = ("fd", "users", "closing", "linked_at")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0
        self.closing = False
        self.linked_at = time.monotonic()  # when the file was last seen to have a name


class BlockFiles:
    def __init__(self, path_of: Callable[[str], os.PathLike], limit: int,
                 buffers: BufferPool | None = None):
        self.path_of = path_of
        self.limit = limit
        self.buffers = buffers or BufferPool()  # what blocks are read into
        self._nowait = True  # until the cache filesystem refuses RWF_NOWAIT
        self._direct = True  # until it refuses O_DIRECT
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._lock = threading.Lock()
        self._late_releases: deque[_Open] = deque()  # the trio thread's, when the lock was busy

    def read(self, name: str, offset: int, size: int, wait: bool) -> memoryview | None:
        """`size` bytes at `offset` (fewer at the end of the file).

        wait=False never blocks: None if the file is not open already or its bytes are not
        all in the page cache. wait=True opens the file if needed; OSError if it cannot.
        """
        if not wait and not self._nowait:
            return None
        handle = self._acquire(name, may_open=wait)
        if handle is None:
            return None
        try:
            buf = self.buffers.take(size)
            if wait:
                got = os.preadv(handle.fd, [buf], offset)
                return buf if got == size else buf[:got]
            try:
                got = os.preadv(handle.fd, [buf], offset, os.RWF_NOWAIT)
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:  # this filesystem cannot: stop asking
                    self._nowait = False
                return None
            return buf if got == size else None  # partly cached, or short: the waiting path decides
        finally:
            self._release(handle, wait)

    def read_run(self, name: str, offset: int, sizes: list[int]) -> list[memoryview]:
        """Consecutive pieces from `offset`, one buffer each, in one system call (blocking).
        A piece past the end of the file comes back short or empty.

        One call, not one per block: each call lets the GIL go and waits to get it back,
        behind the trio thread's replies to the kernel. The caller keeps calls to ~1 MiB
        (tiers/local.py, READ_CALL)."""
        handle = self._acquire(name, may_open=True)
        try:
            bufs = [self.buffers.take(n) for n in sizes]
            got = os.preadv(handle.fd, bufs, offset)
        finally:
            self._release(handle, True)
        views = []
        for buf, n in zip(bufs, sizes):
            views.append(buf if got >= n else buf[:max(0, got)])
            got -= n
        return views

    def write_at(self, name: str, offset: int, data) -> None:
        """`data` at `offset` of the file, which is created if it is missing. Bytes around it
        (other blocks) are left as they are."""
        with self.writer(name) as w:
            w.write(offset, [data])

    @contextmanager
    def writer(self, name: str):
        """Blocks written into one file through one descriptor: a batch of blocks costs one
        open and close, not one each (each is a wait for the GIL in a busy daemon)."""
        w = _Writer(self, Path(self.path_of(name)))
        try:
            yield w
        finally:
            w.close()

    def punch(self, name: str, offset: int, length: int) -> None:
        """Free the disk space of [offset, offset + length); it reads as zeros after."""
        try:
            fd = os.open(self.path_of(name), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            os.close(fd)

    @staticmethod
    def _open_new(path: Path, flags: int) -> int:
        try:
            return private.open_file(path, flags)
        except FileNotFoundError:
            path.parent.mkdir(mode=private.DIR_MODE, parents=True, exist_ok=True)
            return private.open_file(path, flags)

    def _write_padded(self, fd: int, offset: int, data, cut: bool = True) -> None:
        """O_DIRECT of a buffer that is not ready for it: copied into an aligned one. `cut`:
        the padding is cut off the file (not in a segment: what lies beyond is others')."""
        n = len(data)
        padded = in_pages(n)
        buf = self.buffers.take(max(padded, ALIGNED_FROM))  # the pool's buffers are page-aligned
        buf[:n] = data
        buf[n:padded] = bytes(padded - n)
        _write_all(fd, [buf[:padded]], offset)
        if padded != n and cut:
            # Only an object's last block is short, so nothing lies beyond it: the padding goes.
            os.ftruncate(fd, offset + n)

    def forget(self, name: str) -> None:
        """The file is being unlinked: close its descriptor once no reader holds it."""
        with self._lock:
            self._settle_releases()
            handle = self._open.pop(name, None)
            if handle is not None:
                self._retire(handle)

    def close_all(self) -> None:
        with self._lock:
            self._settle_releases()
            while self._open:
                self._retire(self._open.popitem()[1])

    def __len__(self) -> int:
        return len(self._open)

    def _acquire(self, name: str, may_open: bool) -> _Open | None:
        """The file's descriptor, held until _release. may_open=False is the trio thread's
        call: it never waits, not even for the lock (a worker holding it may be waiting for
        the GIL, and the trio thread would then wait out the GIL's switch interval too)."""
        if may_open:
            self._lock.acquire()
        elif not self._lock.acquire(blocking=False):
            return None
        try:
            self._settle_releases()
            handle = self._open.get(name)
            if handle is not None:
                self._open.move_to_end(name)
                handle.users += 1
        finally:
            self._lock.release()
        if handle is not None:
            if self._still_linked(handle):
                return handle
            # Unlinked behind our back (someone cleaning the cache dir): its bytes are still
            # readable here, but the space should be freed and the miss seen, as without us.
            self._release(handle, may_open)
            if may_open:
                self.forget(name)
        if not may_open:
            return None
        fd = os.open(self.path_of(name), os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            handle = self._open.get(name)
            if handle is not None:  # another thread opened it meanwhile
                os.close(fd)
            else:
                handle = self._open[name] = _Open(fd)
                while len(self._open) > self.limit:
                    self._retire(self._open.popitem(last=False)[1])
            handle.users += 1
            return handle

    @staticmethod
    def _still_linked(handle: _Open) -> bool:
        """Asked of the filesystem at most once a second per file: an fstat was ~1.4 us of a
        ~65 us cached 4 KiB read (A/B: ~5% more IOPS without it). A file unlinked by someone
        else is seen within that second; its bytes until then are still the block's."""
        now = time.monotonic()
        if now - handle.linked_at < _LINK_CHECK_SECONDS:
            return True
        if os.fstat(handle.fd).st_nlink:
            handle.linked_at = now
            return True
        return False

    def _release(self, handle: _Open, wait: bool = True) -> None:
        """Let go of a descriptor. The trio thread (wait=False) does not wait for the lock:
        if a worker holds it, the release is queued and the next holder settles it (a
        descriptor that is closing stays open until then, never closed under a reader)."""
        if not wait and not self._lock.acquire(blocking=False):
            self._late_releases.append(handle)
            return
        if wait:
            self._lock.acquire()
        try:
            self._settle_releases()
            self._let_go(handle)
        finally:
            self._lock.release()

    def _settle_releases(self) -> None:
        """Under the lock: the releases the trio thread could not make itself."""
        while self._late_releases:
            self._let_go(self._late_releases.popleft())

    @staticmethod
    def _let_go(handle: _Open) -> None:
        handle.users -= 1
        if handle.closing and handle.users == 0:
            os.close(handle.fd)

    def _retire(self, handle: _Open) -> None:
        """Under the lock: close now, or when its last reader is done."""
        handle.closing = True
        if handle.users == 0:
            os.close(handle.fd)
