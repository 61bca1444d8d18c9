"""Tier 1: blocks on the node's disk, one sparse file per object version (blockfiles.py),
indexed by LMDB (index.py).

Layout (cachedir.py): CACHE_DIR/lock, CACHE_DIR/index.lmdb/, CACHE_DIR/blocks/ab/<file id>, the
block of index i at offset i x block size. Write order is the bytes, then the index entry:
a block is readable only once both are there, so a crash leaves at most bytes nothing
points to (a whole orphan file is swept later in the background). Every read is verified
against the checksums in the index (one per 16 KiB chunk: a small read checks only the
chunks it covers); a bad block is dropped and reported as a miss. An evicted block's
bytes are freed by punching a hole; the file goes with its last block.

The capacity is enforced on insert: room is made (evicting) and reserved before the
file is written, so concurrent fills cannot overshoot it.
"""

import errno
import itertools
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import xxhash

from ..blocks import BlockRef
from ..errors import CacheError, CacheIndexFull
from ..index import BlockIndex, Removed
from ..stats import Counters
from .base import Peek
from .blockfiles import BlockFiles
from .cachedir import CacheDir, mark_clean

log = logging.getLogger(__name__)

_STATVFS_TTL = 1.0
# Reads of one block within this many seconds of the access that began its current use
# (its fill, or the last counted hit) are one use: the kernel's 128 KiB pieces of a 1 MiB
# block, or a prefetched block then read, must not look like re-use to the eviction.
CORRELATION_WINDOW = 2.0
_RECENT_MAX = 65536
_HITS_BATCH = 65536  # hits kept in memory before they are written to the index
_ORPHAN_AGE = 60.0  # a file this young may be a fill whose index entry is being written
CHUNK = 16 * 1024  # a small read verifies (and reads) only the chunks it covers
_DISK_READ = 64 * 1024  # ...but one that may have to wait for the disk reads this much around it
# A whole block up to this size is read and verified on the trio thread when its bytes are in
# memory (a small file's block); a larger one would hold every other request for too long.
PEEK_MAX = 256 * 1024


def chunk_sums(data) -> bytes:
    """The xxh3-64 digests of `data`'s CHUNK-sized pieces, concatenated (8 bytes each)."""
    if len(data) <= CHUNK:
        return xxhash.xxh3_64_digest(data)
    view = memoryview(data)
    return b"".join(xxhash.xxh3_64_digest(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK))


_IN_FLIGHT_SHARE = 4  # fills being written take at most 1/4 of the cache


class LocalTier:
    name = "local"

    def __init__(self, cache: CacheDir, index: BlockIndex, files: BlockFiles, *, capacity: int,
                 min_free: int, counters: Counters):
        self.cache = cache
        self.index = index
        self.files = files
        self.capacity = capacity
        self.min_free = min_free
        self.counters = counters
        self._room = threading.Lock()
        self._written = threading.Condition(self._room)  # a reservation ended
        self._reserved = 0
        self._filling: dict[str, int] = {}  # file -> blocks being written into it (under _room)
        self._hits: dict[bytes, int] = {}
        self._recent: OrderedDict[bytes, float] = OrderedDict()
        self._hits_lock = threading.Lock()
        self._free_at: tuple[float, int] | None = None  # (when, free bytes) of the last statvfs
        self._said: set[str] = set()

    # --- Tier interface ----------------------------------------------------------------

    def get(self, ref: BlockRef) -> bytes | None:
        block_id = bytes.fromhex(ref.id)
        known = self._checksums(block_id)
        if known is None:
            self.counters.add("misses")
            return None
        length, sums = known
        try:
            data = self.files.read(ref.file, ref.start, length, wait=True)
        except OSError as e:
            return self._unreadable(block_id, e)
        if len(data) != length or len(data) != ref.length:
            return self._drop(block_id, f"length {len(data)} != {length}")
        if chunk_sums(data) != sums:
            return self._drop(block_id, "checksum mismatch")
        self._hit(block_id, len(data), may_flush=True)
        return data

    def peek(self, ref: BlockRef) -> bytes | Peek:
        """get() that never blocks. A miss is known from the index alone (its entries are in
        memory or LMDB's map): a cold read then goes to S3 without a worker thread's round
        trip to learn it (one of three thread hops per cold small file). A small block whose
        file is open and whose pages are in memory is read here; anything else, and anything
        amiss, is left to get()."""
        block_id = bytes.fromhex(ref.id)
        known = self._checksums(block_id)  # a failing index: a miss, S3 answers
        if known is None:
            self.counters.add("misses")
            return Peek.ABSENT
        length, sums = known
        if length != ref.length or length > PEEK_MAX:
            return Peek.UNKNOWN
        try:
            data = self.files.read(ref.file, ref.start, length, wait=False)
        except OSError:
            return Peek.UNKNOWN
        if data is None or chunk_sums(data) != sums:
            return Peek.UNKNOWN
        self._hit(block_id, length, may_flush=False)
        return data

    def get_part(self, ref: BlockRef, lo: int, hi: int) -> bytes | None:
        """Bytes [lo, hi) of the block, reading and verifying only the chunks they lie in."""
        return self._part(ref, lo, hi, wait=True)

    def peek_part(self, ref: BlockRef, lo: int, hi: int) -> bytes | None:
        """get_part that never blocks, for the trio thread: the bytes if the block's file is
        open and its pages are in memory, else None (then ask get_part in a worker thread).
        Anything amiss is left to get_part to find, drop and report."""
        return self._part(ref, lo, hi, wait=False)

    def _part(self, ref: BlockRef, lo: int, hi: int, wait: bool):
        block_id = bytes.fromhex(ref.id)
        known = self._checksums(block_id)
        if known is None or known[0] != ref.length:
            return None  # the caller reads the whole block
        length, sums = known
        first, last = lo // CHUNK, (hi - 1) // CHUNK
        if wait:
            # This read may go to the disk: take the chunks around it too, so that the next
            # small reads nearby find their pages in memory and need no worker thread.
            group = _DISK_READ // CHUNK
            first = first // group * group
            last = min((last // group + 1) * group, -(-length // CHUNK)) - 1
        start = first * CHUNK
        size = min(length, (last + 1) * CHUNK) - start
        try:
            data = self.files.read(ref.file, ref.start + start, size, wait)
        except OSError as e:
            return self._unreadable(block_id, e)
        if data is None:
            return None
        if chunk_sums(data) != sums[first * 8:(last + 1) * 8]:
            return self._drop(block_id, "chunk checksum mismatch or short file") if wait else None
        self._hit(block_id, hi - lo, may_flush=wait)
        return memoryview(data)[lo - start:hi - start]

    def _checksums(self, block_id: bytes) -> tuple[int, bytes] | None:
        """The index's (length, chunk sums) of a block; a failing index is a miss."""
        try:
            return self.index.checksums(block_id)
        except CacheError as e:
            self._index_failed(e)
            return None

    def _index_failed(self, e: CacheError) -> None:
        """An LMDB failure: counted, said once per kind; the read or fill goes on without it."""
        kind = "index_full" if isinstance(e, CacheIndexFull) else "index_errors"
        self.counters.add(kind)
        self._say_once(kind, f"event=cache_{kind} dir={self.cache.path} error={str(e)!r} "
                             "action=serving_from_lower_tiers (further ones are only counted)")

    def _hit(self, block_id: bytes, nbytes: int, may_flush: bool) -> None:
        self.counters.add("hits")
        self.counters.add("hit_bytes", nbytes)
        self._note_hit(block_id, may_flush)

    def put(self, ref: BlockRef, data: bytes) -> None:
        """Store a block if room can be made; failures are counted, never raised."""
        self.put_many([(ref, data)])

    def put_many(self, items: list[tuple[BlockRef, bytes]]) -> None:
        """Store blocks if room can be made, with one reservation, one open per file and one
        index transaction for them all: in a busy daemon each call that lets the GIL go costs
        a wait to get it back, and per block those waits, not the disk, bounded fills.
        Failures are counted, never raised."""
        try:
            todo = self._new_blocks(items)
            if not todo:
                return
            n = sum(len(data) for _, data in todo)
            if not self._reserve(n, [ref.file for ref, _ in todo]):
                if len(todo) > 1:  # together they do not fit: each may, alone
                    for item in todo:
                        self.put_many([item])
                else:
                    self.counters.add("declined")
                return
            try:
                written, error = self._write_blocks(todo)
                if written:
                    self._index_written(written)
                    now = time.monotonic()
                    for r, _ in written:
                        self._note_use(bytes.fromhex(r.id), now)
                    self.counters.add("fills", len(written))
                    self.counters.add("fill_bytes", sum(len(d) for _, d in written))
                if error is not None:
                    raise error
            finally:
                with self._room:
                    self._reserved -= n
                    self._written.notify_all()
                    for ref, _ in todo:
                        self._filling[ref.file] -= 1
                        if not self._filling[ref.file]:
                            del self._filling[ref.file]
        except CacheError as e:
            self._index_failed(e)
        except OSError as e:
            code = getattr(e, "errno", None)
            kind = "disk_full" if code in (errno.ENOSPC, errno.EDQUOT) else "write_errors"
            self.counters.add(kind)
            self._say_once(kind, f"event=cache_{kind} dir={self.cache.path} error={e!r} "
                                 "action=serving_from_lower_tiers")

    def _index_written(self, written: list[tuple[BlockRef, bytes]]) -> None:
        """Index blocks written to disk; if the index refuses, their bytes are given back."""
        try:
            self.index.insert_many([(bytes.fromhex(r.id), len(d), chunk_sums(d),
                                     bytes.fromhex(r.file), r.start) for r, d in written])
        except CacheError:
            for ref, data in written:
                try:
                    self.files.punch(ref.file, ref.start, len(data))
                except OSError:
                    pass  # no holes here: the file goes with the sweep or its last block
            raise

    def _new_blocks(self, items: list[tuple[BlockRef, bytes]]) -> list[tuple[BlockRef, bytes]]:
        """The items of the right length not cached yet, each once, by file and offset."""
        todo = {}
        for ref, data in items:
            if len(data) == ref.length and ref.id not in todo and self.index.checksums(bytes.fromhex(ref.id)) is None:
                todo[ref.id] = (ref, data)
        return sorted(todo.values(), key=lambda item: (item[0].file, item[0].start))

    def _write_blocks(self, todo) -> tuple[list, OSError | None]:
        """Write blocks (sorted by file and offset), one descriptor per file and one write per
        run of consecutive blocks; stop at the first error. The blocks of the run on disk
        whole before the error are kept; the space of the rest is given back (part of it may
        be on disk)."""
        written = []
        for file, group in itertools.groupby(todo, key=lambda item: item[0].file):
            with self.files.writer(file) as w:
                for run in _consecutive(list(group)):
                    start = run[0][0].start
                    try:
                        w.write(start, [data for _, data in run])
                    except OSError as e:
                        on_disk = getattr(e, "failed_at", start)
                        whole = [(r, d) for r, d in run if r.start + len(d) <= on_disk]
                        written.extend(whole)
                        lost = run[len(whole)][0].start
                        end = run[-1][0].start + len(run[-1][1])
                        try:
                            self.files.punch(file, lost, end - lost)
                        except OSError:
                            pass
                        return written, e
                    written.extend(run)
        return written, None

    def stats(self) -> dict[str, int]:
        return self.counters.snapshot() | self.gauges()

    def gauges(self) -> dict[str, int]:
        try:
            totals = self.index.totals()
        except CacheError as e:
            self._index_failed(e)
            return {}
        gauges = {f"local.{k}": v for k, v in totals.items()}
        if self._free_at is not None:
            # The disk as the cache last saw it (at most once a second, when it made room), and
            # what a fill may use now: below --cache-size when the disk, not the cap, limits.
            free = self._free_at[1]
            gauges["local.disk_free_bytes"] = free
            gauges["local.capacity_bytes"] = self._capacity_for(totals["used_bytes"], free)
        return gauges

    # --- capacity ------------------------------------------------------------------------

    def _reserve(self, n: int, files: list[str]) -> bool:
        """Room for n bytes going into these files (one entry per block). Evicted bytes are
        freed before the lock is let go, so a fill that follows (perhaps of the same block) is
        never punched out."""
        with self._room:
            capacity = self._effective_capacity()
            if n > capacity:
                return False
            # Room made for bytes still being written comes out of what is cached: with
            # several writers at once, each with a batch, a small cache would evict its hot
            # blocks to make room for the fills in flight. So fills in flight take at most a
            # quarter of the cache (or one batch, alone); a writer over that waits its turn.
            while self._reserved and self._reserved + n > capacity // _IN_FLIGHT_SHARE:
                self._written.wait()
            evicted = self.index.make_room(self._reserved + n, capacity, self._take_hits())
            self._reserved += n
            for file in files:
                self._filling[file] = self._filling.get(file, 0) + 1
            for removed in evicted:
                self._free(removed)
        if evicted:
            self.counters.add("evictions", len(evicted))
        return True

    def _effective_capacity(self) -> int:
        """The configured cap, lowered so the cache disk keeps `min_free` bytes free."""
        if self._free_at is None or time.monotonic() - self._free_at[0] > _STATVFS_TTL:
            st = os.statvfs(self.cache.path)
            self._free_at = (time.monotonic(), st.f_bavail * st.f_frsize)
        return self._capacity_for(self.index.totals()["used_bytes"], self._free_at[1])

    def _capacity_for(self, used: int, free: int) -> int:
        return max(0, min(self.capacity, used + free - self.min_free))

    def _take_hits(self) -> dict[bytes, int]:
        with self._hits_lock:
            hits, self._hits = self._hits, {}
        return hits

    def _note_hit(self, block_id: bytes, may_flush: bool) -> None:
        """Batched: frequencies reach LMDB when room is next made, or when the batch is full
        and this is a worker thread; the FUSE thread never writes LMDB, and while a full
        batch waits for a worker, further hits go unrecorded (memory stays bounded)."""
        now = time.monotonic()
        with self._hits_lock:
            began = self._recent.get(block_id)
            if began is not None and now - began < CORRELATION_WINDOW:
                return
            full = len(self._hits) >= _HITS_BATCH
            if full and not may_flush:
                return
            self._hits[block_id] = self._hits.get(block_id, 0) + 1
        self._note_use(block_id, now)
        if full:
            try:
                self.index.apply_hits(self._take_hits())
            except CacheError as e:
                self._index_failed(e)  # these hits are lost: only eviction order suffers

    def _note_use(self, block_id: bytes, now: float) -> None:
        with self._hits_lock:
            self._recent[block_id] = now
            self._recent.move_to_end(block_id)
            if len(self._recent) > _RECENT_MAX:
                self._recent.popitem(last=False)

    # --- files -------------------------------------------------------------------------------

    def _free(self, removed: Removed) -> None:
        """Under _room: the disk space of a block taken out of the index."""
        try:
            free_space(self.cache, self.files, removed, keep_file=removed.file.hex() in self._filling)
        except OSError as e:
            # Not on this filesystem: the space comes back when the file's last block goes.
            self.counters.add("punch_errors")
            self._say_once("punch_errors", f"event=cache_punch_failed dir={self.cache.path} error={e!r} "
                                           "action=space_freed_with_the_whole_file")

    def _drop(self, block_id: bytes, why: str) -> None:
        try:
            removed = self.index.remove([block_id])
        except CacheError as e:
            self._index_failed(e)
            return None
        if not removed:
            return None  # evicted while this read was on its way: a plain miss
        self.counters.add("corrupt")
        self._say_once("corrupt", f"event=cache_block_corrupt id={block_id.hex()} reason={why!r} "
                                  "action=dropped_and_refetched (further ones are only counted)")
        with self._room:
            self._free(removed[0])
        return None

    def _unreadable(self, block_id: bytes, e: OSError) -> None:
        """A block that cannot be read is dropped, unless the fault is this process's own
        (out of descriptors or memory): then the block is fine and only this read misses."""
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            self.counters.add("read_errors")
            self._say_once("read_errors", f"event=cache_read_error error={e!r} action=serving_from_lower_tiers")
            return None
        return self._drop(block_id, f"unreadable: {e.strerror}")

    def _say_once(self, what: str, line: str) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning(line)

    # --- background upkeep --------------------------------------------------------------------

    def sweep_dir(self, subdir: Path) -> int:
        """Remove orphans (files none of whose blocks is indexed) from one fan-out directory,
        and directories in it: those are the older two-level layout's, all of them orphans."""
        removed = 0
        now = time.time()
        try:
            names = os.listdir(subdir)
        except OSError:
            return 0
        for name in names:
            path = subdir / name
            try:
                if now - path.stat().st_mtime < _ORPHAN_AGE:
                    continue
                if path.is_dir():
                    removed += sum(len(files) for _, _, files in os.walk(path))
                    shutil.rmtree(path)
                elif self._remove_orphan(path):
                    removed += 1
            except (OSError, ValueError):
                continue
            except CacheError as e:
                self._index_failed(e)  # whether a file is an orphan cannot be known: keep them
                break
        self.counters.add("orphans_swept", removed)
        return removed

    def _remove_orphan(self, path: Path) -> bool:
        name = path.name
        with self._room:  # no fill may start writing into it meanwhile
            if len(name) == 32 and (name in self._filling or self.index.file_in_use(bytes.fromhex(name))):
                return False
            path.unlink()
            return True

    def fanout_dirs(self) -> list[Path]:
        try:
            return [self.cache.blocks / a for a in sorted(os.listdir(self.cache.blocks))]
        except OSError:
            return []

    def close(self) -> None:
        self.files.close_all()
        try:
            hits = self._take_hits()
            if hits:
                self.index.apply_hits(hits)
        except CacheError as e:
            self._index_failed(e)
        try:
            self.index.close()
            mark_clean(self.cache)
        except CacheError as e:
            self._index_failed(e)


def free_space(cache: CacheDir, files: BlockFiles, removed: Removed, keep_file: bool = False) -> None:
    """The disk space of a block taken out of the index: its file goes with its last block
    (unless `keep_file`: a fill is writing into it), else its hole is punched (OSError if
    the filesystem cannot)."""
    file = removed.file.hex()
    if removed.last_in_file and not keep_file:
        files.forget(file)
        _remove(cache.file_path(file))
    else:
        files.punch(file, removed.offset, removed.length)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _consecutive(items: list[tuple[BlockRef, bytes]]) -> list[list[tuple[BlockRef, bytes]]]:
    """Blocks sorted by offset, in runs where each starts where the one before it ends."""
    runs: list[list] = []
    for ref, data in items:
        if runs and runs[-1][-1][0].start + len(runs[-1][-1][1]) == ref.start:
            runs[-1].append((ref, data))
        else:
            runs.append([(ref, data)])
    return runs
