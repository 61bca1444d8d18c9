"""Tier 1: blocks on the node's disk, one sparse file per object version (blockfiles.py), or
for small whole objects a place in a shared segment (local_writes.py), indexed by LMDB
(index.py), whose entry says where each block is.

Layout (cachedir.py): CACHE_DIR/lock, CACHE_DIR/index.lmdb/, CACHE_DIR/blocks/ab/<file id>, the
block of index i at offset i x block size. Write order is the bytes, then the index entry:
a block is readable only once both are there, so a crash leaves at most bytes nothing
points to (a whole orphan file is swept later in the background). Every read is verified
against the checksums in the index (one per 16 KiB chunk: a small read checks only the
chunks it covers); a bad block is dropped and reported as a miss. An evicted block's
bytes are freed by punching a hole; the file goes with its last block.

The capacity is enforced on insert: room is made (evicting) and reserved before the
file is written, so concurrent fills cannot overshoot it (local_room.py). Re-use is
batched for the eviction (local_usage.py), fills are written in runs (local_writes.py),
orphans swept in the background (local_upkeep.py).

Verified on every read from disk, never remembered as good: the bytes under a block can
change without the index knowing (a disk error, a file cleaned by hand, a hole punched
by an eviction racing the read), and remembering a verdict would serve them unchecked.
It costs ~0.1 ms per MiB (docs/performance-notes.md, "Warm reads, round 3").
"""

import errno
import logging
import time
from pathlib import Path

import xxhash

from ..blocks import BlockRef, in_pieces
from ..errors import CacheError, CacheIndexFull
from ..index import BlockIndex, Located
from ..memory import in_pages
from ..stats import Counters
from . import local_upkeep
from .base import Peek
from .blockfiles import BlockFiles
from .cachedir import CacheDir, mark_clean
from .local_room import Room
from .local_usage import Usage
from .local_writes import Placed, Segments, consecutive, write_blocks

log = logging.getLogger(__name__)

CHUNK = 16 * 1024  # a small read verifies (and reads) only the chunks it covers
_DISK_READ = 64 * 1024  # ...but one that may have to wait for the disk reads this much around it
# A whole block up to this size is read and verified on the trio thread when its bytes are in
# memory (a small file's block); a larger one would hold every other request for too long.
PEEK_MAX = 256 * 1024
# Bytes one read system call may take for several blocks. Not more: one preadv of 16 blocks
# of 1 MiB cost 3-9x the CPU per MiB of 16 preadvs now and then on this VM (2 of 8 runs;
# the 16 never did), and a warm sequential read through the mount then took 1.0-1.3 ms of
# daemon CPU per MiB against 0.7-0.9 (docs/performance-notes.md, "Warm reads, round 3").
READ_CALL = 1 << 20


def chunk_sums(data) -> bytes:
    """The xxh3-64 digests of `data`'s CHUNK-sized pieces, concatenated (8 bytes each)."""
    if len(data) <= CHUNK:
        return xxhash.xxh3_64_digest(data)
    view = memoryview(data)
    return b"".join(xxhash.xxh3_64_digest(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK))


class LocalTier:
    name = "local"

    def __init__(self, cache: CacheDir, index: BlockIndex, files: BlockFiles, *, capacity: int,
                 min_free: int, counters: Counters):
        self.cache = cache
        self.index = index
        self.files = files
        self.counters = counters
        self._said: set[str] = set()
        self.room = Room(cache, index, files, capacity=capacity, min_free=min_free,
                         counters=counters, say_once=self._say_once)
        self.usage = Usage()
        self.segments = Segments()

    # --- reads ---------------------------------------------------------------------------

    def get(self, ref: BlockRef) -> bytes | None:
        return self.get_many([ref])[0]

    def get_many(self, refs: list[BlockRef]) -> list[bytes | None]:
        """get() of each block; consecutive small blocks of one file are read in one system
        call of up to READ_CALL bytes (each call lets the GIL go and waits to get it back),
        and each block is verified alone."""
        found: dict[str, bytes | None] = {}
        known = []
        for ref in refs:
            where = self._locate(bytes.fromhex(ref.id))
            if where is None:
                self.counters.add("misses")
                found[ref.id] = None
            else:
                known.append((Placed(ref.id, where.file, where.offset, where.length), (ref, where)))
        known.sort(key=lambda item: (item[0].file, item[0].start))
        for run in consecutive(known):
            for piece in in_pieces(run, READ_CALL, lambda item: item[0].length):
                found.update(self._read_run(piece))
        return [found[ref.id] for ref in refs]

    def _read_run(self, run: list[tuple[Placed, tuple[BlockRef, Located]]]) -> dict[str, bytes | None]:
        first = run[0][0]
        try:
            datas = self.files.read_run(first.file, first.start, [place.length for place, _ in run])
        except OSError as e:
            return {place.id: self._unreadable(bytes.fromhex(place.id), e) for place, _ in run}
        return {ref.id: self._verified(ref, where.length, where.sums, data)
                for (_, (ref, where)), data in zip(run, datas)}

    def _verified(self, ref: BlockRef, length: int, sums: bytes, data) -> bytes | None:
        block_id = bytes.fromhex(ref.id)
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
        where = self._locate(block_id)  # a failing index: a miss, S3 answers
        if where is None:
            self.counters.add("misses")
            return Peek.ABSENT
        length, sums = where.length, where.sums
        if length != ref.length or length > PEEK_MAX:
            return Peek.UNKNOWN
        try:
            data = self.files.read(where.file, where.offset, length, wait=False)
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
        where = self._locate(block_id)
        if where is None or where.length != ref.length:
            return None  # the caller reads the whole block
        length, sums = where.length, where.sums
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
            data = self.files.read(where.file, where.offset + start, size, wait)
        except OSError as e:
            return self._unreadable(block_id, e)
        if data is None:
            return None
        if chunk_sums(data) != sums[first * 8:(last + 1) * 8]:
            return self._drop(block_id, "chunk checksum mismatch or short file") if wait else None
        self._hit(block_id, hi - lo, may_flush=wait)
        return memoryview(data)[lo - start:hi - start]

    def _locate(self, block_id: bytes) -> Located | None:
        """The index's length, chunk sums and place of a block; a failing index is a miss."""
        try:
            return self.index.locate(block_id)
        except CacheError as e:
            self.index_failed(e)
            return None

    def index_failed(self, e: CacheError) -> None:
        """An LMDB failure: counted, said once per kind; the read or fill goes on without it."""
        kind = "index_full" if isinstance(e, CacheIndexFull) else "index_errors"
        self.counters.add(kind)
        self._say_once(kind, f"event=cache_{kind} dir={self.cache.path} error={str(e)!r} "
                             "action=serving_from_lower_tiers (further ones are only counted)")

    def _hit(self, block_id: bytes, nbytes: int, may_flush: bool) -> None:
        """Counted; re-use is noted for the eviction. A full batch of hits is written to the
        index here only in a worker thread (may_flush): the trio thread never writes LMDB."""
        self.counters.add("hits")
        self.counters.add("hit_bytes", nbytes)
        if self.usage.hit(block_id, may_flush):
            try:
                self.index.apply_hits(self.usage.take())
            except CacheError as e:
                self.index_failed(e)  # these hits are lost: only eviction order suffers

    # --- fills -----------------------------------------------------------------------------

    def put(self, ref: BlockRef, data: bytes) -> None:
        """Store a block if room can be made; failures are counted, never raised."""
        self.put_many([(ref, data)])

    def put_many(self, items: list[tuple[BlockRef, bytes]]) -> None:
        """Store blocks if room can be made, with one reservation, one open per file and one
        index transaction for them all: in a busy daemon each call that lets the GIL go costs
        a wait to get it back, and per block those waits, not the disk, bounded fills.
        Failures are counted, never raised."""
        try:
            new = self._new_blocks(items)
            if not new:
                return
            places = self.segments.place([ref for ref, _ in new])
            todo = sorted(zip(places, (data for _, data in new)),
                          key=lambda item: (item[0].file, item[0].start))
            n = sum(len(data) for _, data in todo)
            files = [place.file for place, _ in todo]
            if not self.room.reserve(n, files, self.usage.take):
                if len(new) > 1:  # together they do not fit: each may, alone
                    for item in new:
                        self.put_many([item])
                else:
                    self.counters.add("declined")
                return
            try:
                written, error = write_blocks(self.files, todo)
                if written:
                    self._index_written(written)
                    self.usage.filled([bytes.fromhex(r.id) for r, _ in written], time.monotonic())
                    self.counters.add("fills", len(written))
                    self.counters.add("fill_bytes", sum(len(d) for _, d in written))
                if error is not None:
                    raise error
            finally:
                self.room.end(n, files)
        except CacheError as e:
            self.index_failed(e)
        except OSError as e:
            code = getattr(e, "errno", None)
            kind = "disk_full" if code in (errno.ENOSPC, errno.EDQUOT) else "write_errors"
            self.counters.add(kind)
            self._say_once(kind, f"event=cache_{kind} dir={self.cache.path} error={e!r} "
                                 "action=serving_from_lower_tiers")

    def _index_written(self, written: list[tuple[Placed, bytes]]) -> None:
        """Index blocks written to disk; if the index refuses, their bytes are given back."""
        try:
            self.index.insert_many([(bytes.fromhex(r.id), len(d), chunk_sums(d),
                                     bytes.fromhex(r.file), r.start) for r, d in written])
        except CacheError:
            for place, data in written:
                try:
                    self.files.punch(place.file, place.start, in_pages(len(data)))
                except OSError:
                    pass  # no holes here: the file goes with the sweep or its last block
            raise

    def _new_blocks(self, items: list[tuple[BlockRef, bytes]]) -> list[tuple[BlockRef, bytes]]:
        """The items of the right length not cached yet, each once."""
        todo = {}
        for ref, data in items:
            if len(data) == ref.length and ref.id not in todo and self.index.locate(bytes.fromhex(ref.id)) is None:
                todo[ref.id] = (ref, data)
        return list(todo.values())

    # --- stats -----------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return self.counters.snapshot() | self.gauges()

    def gauges(self) -> dict[str, int]:
        try:
            totals = self.index.totals()
        except CacheError as e:
            self.index_failed(e)
            return {}
        return {f"local.{k}": v for k, v in totals.items()} | self.room.gauges(totals["used_bytes"])

    # --- what is amiss ---------------------------------------------------------------------

    def _drop(self, block_id: bytes, why: str) -> None:
        try:
            removed = self.index.remove([block_id])
        except CacheError as e:
            self.index_failed(e)
            return None
        if not removed:
            return None  # evicted while this read was on its way: a plain miss
        self.counters.add("corrupt")
        self._say_once("corrupt", f"event=cache_block_corrupt id={block_id.hex()} reason={why!r} "
                                  "action=dropped_and_refetched (further ones are only counted)")
        with self.room.lock:
            self.room.free(removed[0])
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

    # --- upkeep and close ------------------------------------------------------------------

    def sweep_dir(self, subdir: Path) -> int:
        """Remove orphans from one fan-out directory (local_upkeep.py)."""
        return local_upkeep.sweep_dir(self, subdir)

    def fanout_dirs(self) -> list[Path]:
        return local_upkeep.fanout_dirs(self.cache.blocks)

    def close(self) -> None:
        self.files.close_all()
        try:
            hits = self.usage.take()
            if hits:
                self.index.apply_hits(hits)
        except CacheError as e:
            self.index_failed(e)
        try:
            self.index.close()
            mark_clean(self.cache)
        except CacheError as e:
            self.index_failed(e)

