"""The LMDB index of the local block cache (the only module that imports lmdb).

Per block: length, the file holding it and its offset there, the xxh3-64 checksum of
each 16 KiB chunk (so a small read verifies only what it reads, a whole-block read all of
them), eviction queue and position, access frequency, insert and last-access times. Per
file: how many of its blocks are indexed, so the last one evicted removes the file. Eviction is S3-FIFO (docs/cache.md): new blocks enter a
small FIFO; only blocks read again while there move to the main FIFO, so one big
scan passes through the small queue without flushing the hot set.

The queue order lives in LMDB too (key = queue + sequence number), so a restart
needs no scan: the oldest block of each queue is one cursor step away.
"""

import functools
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lmdb

from . import private
from .errors import CacheError, CacheFormatChanged, CacheIndexFull

log = logging.getLogger(__name__)

SMALL, MAIN = 0, 1
SMALL_SHARE = 0.10  # the small queue's share of the capacity, as in the S3-FIFO paper
MAX_FREQ = 3

# length, queue, seq, freq, inserted, last_access, file, offset; then the chunk sums
_ENTRY = struct.Struct("<IBQBdd16sQ")
_ORDER = struct.Struct(">BQ")  # queue, seq: big-endian so keys sort in FIFO order
_U64 = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_SEQ = struct.Struct(">Q")  # ghost order keys: big-endian to sort oldest first
# 3: a checksum per 16 KiB chunk; 4: the blocks of an object version in one file. An index
# of another format starts empty.
FORMAT = b"4"
_SUMS_KEPT = 16384  # blocks whose checksums and places are kept in memory (~5 MiB)
_CHUNK = 16 * 1024  # the checksummed piece of a block (tiers/local.py CHUNK)


def map_size_for(capacity: int, block_size: int, page_size: int = 4096, least: int = 1 << 30) -> int:
    """A map that holds the index of a full cache of `capacity` bytes in `block_size` blocks.

    Per block: its entry (45 bytes and 8 per 16 KiB chunk: 2 KiB of sums at 4 MiB blocks,
    32 KiB at 64 MiB) with its key, in a leaf page or, past about half a page, in overflow
    pages of its own; its queue key; its file's count; a ghost id (two keys). Doubled: B-tree
    pages are half full after splits, and pages freed by a commit are reused only once no
    reader holds the snapshot before it. The map is address space, not disk: data.mdb grows
    as it is used, so a generous map costs nothing.
    """
    value = _ENTRY.size + 8 * -(-block_size // _CHUNK)
    entry = value + 16 + 16  # + key and node header
    if entry > page_size // 2:
        entry = -(-(value + 16) // page_size) * page_size + 32  # overflow pages + a leaf node
    per_block = entry + 4 * 48  # queue key, file count, ghost id and its order key
    return max(least, capacity // block_size * per_block * 2)


def _lmdb_errors(fn):
    """Every LMDB failure leaves the index as the cache's own error: CacheIndexFull when the
    map is full, CacheError otherwise. Callers treat either as a miss or a declined fill."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except lmdb.MapFullError:
            raise CacheIndexFull("cache index map is full") from None
        except lmdb.Error as e:
            raise CacheError(f"cache index: {type(e).__name__}: {e}") from None
    return wrapper


@dataclass
class Entry:
    length: int
    queue: int
    seq: int
    freq: int
    inserted: float
    last_access: float
    file: bytes  # the file holding the block (16 bytes: BlockRef.file, or a segment)
    offset: int  # where in that file
    chunk_sums: bytes = b""  # xxh3-64 digests of the block's CHUNK-sized pieces, concatenated

    def pack(self) -> bytes:
        return _ENTRY.pack(self.length, self.queue, self.seq, self.freq, self.inserted,
                           self.last_access, self.file, self.offset) + self.chunk_sums


class Located(NamedTuple):
    """What a read of a block needs from the index: its length, its chunk sums, and where
    its bytes are (the file's 32-hex name and the offset in it)."""

    length: int
    sums: bytes
    file: str
    offset: int


@dataclass(frozen=True)
class Removed:
    """A block taken out of the index, for its bytes to be freed on disk."""

    block_id: bytes
    file: bytes
    offset: int
    length: int
    last_in_file: bool  # no other block of its file is indexed: the file can go


def _unpack(raw: bytes) -> Entry:
    return Entry(*_ENTRY.unpack(raw[:_ENTRY.size]), chunk_sums=bytes(raw[_ENTRY.size:]))


class BlockIndex:
    @_lmdb_errors
    def __init__(self, path: Path, map_size: int):
        try:
            path.mkdir(mode=private.DIR_MODE, exist_ok=True)
            self.env = lmdb.open(str(path), map_size=map_size, max_dbs=6, subdir=True,
                                 mode=private.FILE_MODE,
                                 # No fsync per commit: a process crash loses nothing, but an OS
                                 # crash or power loss may lose the last commits or corrupt the
                                 # database (LMDB's MDB_NOSYNC). Block files are checksummed and
                                 # open_index (tiers/local.py) moves an unreadable index aside, so
                                 # either costs cache hits only; fsync per insert would cost more.
                                 sync=False, metasync=False, readahead=False, max_readers=256)
        except (lmdb.Error, OSError) as e:
            raise CacheError(f"cannot open cache index {path}: {e}") from None
        try:
            self._check_size(path)
        except CacheError:
            self.env.close()
            raise
        self._blocks = self.env.open_db(b"blocks")
        self._order = self.env.open_db(b"order")
        self._ghosts = self.env.open_db(b"ghosts")
        self._ghost_order = self.env.open_db(b"ghost_order")
        self._files = self.env.open_db(b"files")
        self._meta = self.env.open_db(b"meta")
        self._check_format(path)
        # (length, chunk sums) of recently read blocks, so a hit needs no LMDB transaction.
        # A block's bytes never change under its id: only its removal makes this stale, and
        # removals (after their commit) bump _removals, so a lookup that raced one is not kept.
        self._sums: dict[bytes, Located] = {}
        self._sums_lock = threading.Lock()
        self._removals = 0

    def _check_size(self, path: Path) -> None:
        """data.mdb holds every page its last commit names: a file cut short (a crash of the
        OS before its pages reached the disk, a full disk, a user) would be read through
        the map past its end, and that is SIGBUS, not an error."""
        pages = self.env.info()["last_pgno"] + 1
        need, size = pages * self.env.stat()["psize"], os.path.getsize(path / "data.mdb")
        if size < need:
            raise CacheError(f"cache index {path} is truncated: data.mdb has {size} bytes, "
                             f"its last commit needs {need}")

    def _check_format(self, path: Path) -> None:
        with self.env.begin(write=True) as txn:
            found = txn.get(b"format", db=self._meta)
            if found is None and txn.stat(self._blocks)["entries"] == 0:
                txn.put(b"format", FORMAT, db=self._meta)
                found = FORMAT
        if found != FORMAT:
            self.env.close()
            raise CacheFormatChanged(f"cache index {path} is of format {(found or b'1').decode()}, "
                                     f"this version uses {FORMAT.decode()}")

    @_lmdb_errors
    def close(self) -> None:
        try:
            self.env.sync(True)
        finally:
            self.env.close()

    @_lmdb_errors
    def sync(self) -> None:
        self.env.sync(True)

    # --- reads -----------------------------------------------------------------------------

    @_lmdb_errors
    def lookup(self, block_id: bytes) -> Entry | None:
        with self.env.begin(db=self._blocks) as txn:
            raw = txn.get(block_id)
        return _unpack(raw) if raw is not None else None

    def locate(self, block_id: bytes) -> Located | None:
        """A block's length, chunk sums and place on disk, or None: lookup() for the read path."""
        found = self._sums.get(block_id)
        if found is not None:
            return found
        removals = self._removals
        entry = self.lookup(block_id)
        if entry is None:
            return None
        found = Located(entry.length, entry.chunk_sums, entry.file.hex(), entry.offset)
        # Kept only if the lock is free: this runs on the trio thread too, which must not
        # wait for a worker holding it (the next lookup of the block keeps it instead).
        if self._sums_lock.acquire(blocking=False):
            try:
                if removals == self._removals:
                    if len(self._sums) >= _SUMS_KEPT:
                        del self._sums[next(iter(self._sums))]  # the oldest kept
                    self._sums[block_id] = found
            finally:
                self._sums_lock.release()
        return found

    def _removed(self, block_ids) -> None:
        """After a commit that removed these blocks: forget what locate() kept of them."""
        with self._sums_lock:
            self._removals += 1
            for block_id in block_ids:
                self._sums.pop(block_id, None)

    @_lmdb_errors
    def file_in_use(self, file: bytes) -> bool:
        """Some block of this file is indexed."""
        with self.env.begin(db=self._files) as txn:
            return txn.get(file) is not None

    @_lmdb_errors
    def totals(self) -> dict[str, int]:
        with self.env.begin() as txn:
            small, main = self._used(txn, SMALL), self._used(txn, MAIN)
            count = txn.stat(self._blocks)["entries"]
            ghosts = txn.stat(self._ghosts)["entries"]
        return {"used_bytes": small + main, "small_bytes": small, "main_bytes": main,
                "blocks": count, "ghosts": ghosts}

    @_lmdb_errors
    def oldest_insert(self) -> float | None:
        with self.env.begin() as txn:
            times = [e.inserted for q in (SMALL, MAIN) if (e := self._head(txn, q)[1])]
        return min(times) if times else None

    @_lmdb_errors
    def entries(self):
        """Every (block_id, Entry); a snapshot, for `cache check`."""
        with self.env.begin(db=self._blocks) as txn:
            return [(bytes(k), _unpack(v)) for k, v in txn.cursor()]

    # --- writes ----------------------------------------------------------------------------

    @_lmdb_errors
    def make_room(self, needed: int, capacity: int, hits: dict[bytes, int]) -> list[Removed]:
        """Evict until used + needed <= capacity; return what was evicted (bytes to free)."""
        evicted: list[Removed] = []
        with self.env.begin(write=True) as txn:
            self._apply_hits(txn, hits)
            while self._used(txn, SMALL) + self._used(txn, MAIN) + needed > capacity:
                victim = self._evict_one(txn, capacity)
                if victim is None:
                    break
                evicted.append(victim)
        self._removed([r.block_id for r in evicted])
        return evicted

    def insert(self, block_id: bytes, length: int, chunk_sums: bytes, file: bytes, offset: int) -> None:
        self.insert_many([(block_id, length, chunk_sums, file, offset)])

    @_lmdb_errors
    def insert_many(self, blocks: list[tuple[bytes, int, bytes, bytes, int]]) -> None:
        """(block id, length, chunk sums, file, offset) of each, in one transaction."""
        now = time.time()
        replaced = []
        with self.env.begin(write=True) as txn:
            for block_id, length, chunk_sums, file, offset in blocks:
                if self._delete(txn, block_id) is not None:
                    replaced.append(block_id)
                was_ghost = txn.pop(block_id, db=self._ghosts)
                if was_ghost is not None:
                    txn.delete(was_ghost, db=self._ghost_order)
                queue = MAIN if was_ghost is not None else SMALL
                self._append(txn, block_id, Entry(length, queue, 0, 0, now, now, file, offset, chunk_sums))
                self._count_file(txn, file, +1)
        if replaced:
            # A block filled twice at once is indexed at its second place: what locate() kept
            # of the first goes (tier 1 appends small objects where there is room: two places).
            self._removed(replaced)

    @_lmdb_errors
    def remove(self, block_ids: list[bytes]) -> list[Removed]:
        """Take blocks out of the index; returns those that were in it."""
        with self.env.begin(write=True) as txn:
            removed = [r for r in (self._delete(txn, b) for b in block_ids) if r is not None]
        self._removed(block_ids)
        return removed

    @_lmdb_errors
    def clear(self) -> None:
        with self.env.begin(write=True) as txn:
            for db in (self._blocks, self._order, self._ghosts, self._ghost_order, self._files,
                       self._meta):
                txn.drop(db, delete=False)
            txn.put(b"format", FORMAT, db=self._meta)
        with self._sums_lock:
            self._removals += 1
            self._sums.clear()

    @_lmdb_errors
    def apply_hits(self, hits: dict[bytes, int]) -> None:
        with self.env.begin(write=True) as txn:
            self._apply_hits(txn, hits)

    # --- internals (inside a write transaction) ---------------------------------------------

    def _apply_hits(self, txn, hits: dict[bytes, int]) -> None:
        now = time.time()
        for block_id, n in hits.items():
            raw = txn.get(block_id, db=self._blocks)
            if raw is not None:
                e = _unpack(raw)
                e.freq, e.last_access = min(MAX_FREQ, e.freq + n), now
                txn.put(block_id, e.pack(), db=self._blocks)

    def _evict_one(self, txn, capacity: int) -> Removed | None:
        """One S3-FIFO step; returns the evicted block, or None when nothing is left."""
        while True:
            use_small = self._used(txn, SMALL) > capacity * SMALL_SHARE or self._used(txn, MAIN) == 0
            block_id, e = self._head(txn, SMALL if use_small else MAIN)
            if e is None:
                return None
            if e.freq > 0:
                # Read again since it was queued: give it another lap in the main queue.
                self._unlink(txn, block_id, e)
                e.queue, e.freq = MAIN, (0 if use_small else e.freq - 1)
                self._append(txn, block_id, e)
                continue
            removed = self._take_out(txn, block_id, e)
            if use_small:
                self._remember_ghost(txn, block_id, capacity // max(1, e.length))
            return removed

    def _head(self, txn, queue: int) -> tuple[bytes | None, Entry | None]:
        cur = txn.cursor(db=self._order)
        if cur.set_range(_ORDER.pack(queue, 0)) and cur.key()[0] == queue:
            block_id = bytes(cur.value())
            raw = txn.get(block_id, db=self._blocks)
            if raw is not None:
                return block_id, _unpack(raw)
            cur.delete()  # an order key without an entry: a leftover, drop it
            return self._head(txn, queue)
        return None, None

    def _append(self, txn, block_id: bytes, e: Entry) -> None:
        e.seq = self._next(txn, b"seq")
        txn.put(block_id, e.pack(), db=self._blocks)
        txn.put(_ORDER.pack(e.queue, e.seq), block_id, db=self._order)
        self._add_used(txn, e.queue, e.length)

    def _unlink(self, txn, block_id: bytes, e: Entry) -> None:
        txn.delete(_ORDER.pack(e.queue, e.seq), db=self._order)
        txn.delete(block_id, db=self._blocks)
        self._add_used(txn, e.queue, -e.length)

    def _delete(self, txn, block_id: bytes) -> Removed | None:
        raw = txn.get(block_id, db=self._blocks)
        return self._take_out(txn, block_id, _unpack(raw)) if raw is not None else None

    def _take_out(self, txn, block_id: bytes, e: Entry) -> Removed:
        """Out of the index for good (not a move between queues): its file counts one less."""
        self._unlink(txn, block_id, e)
        left = self._count_file(txn, e.file, -1)
        return Removed(block_id, e.file, e.offset, e.length, last_in_file=left == 0)

    def _count_file(self, txn, file: bytes, delta: int) -> int:
        raw = txn.get(file, db=self._files)
        n = max(0, (_COUNT.unpack(raw)[0] if raw else 0) + delta)
        if n:
            txn.put(file, _COUNT.pack(n), db=self._files)
        else:
            txn.delete(file, db=self._files)
        return n

    def _remember_ghost(self, txn, block_id: bytes, limit: int) -> None:
        seq = self._next(txn, b"ghost_seq")
        txn.put(block_id, _SEQ.pack(seq), db=self._ghosts)
        txn.put(_SEQ.pack(seq), block_id, db=self._ghost_order)
        if txn.stat(self._ghosts)["entries"] > max(16, limit):
            cur = txn.cursor(db=self._ghost_order)
            if cur.first():
                txn.delete(bytes(cur.value()), db=self._ghosts)
                cur.delete()

    def _used(self, txn, queue: int) -> int:
        raw = txn.get(b"used.%d" % queue, db=self._meta)
        return _U64.unpack(raw)[0] if raw else 0

    def _add_used(self, txn, queue: int, delta: int) -> None:
        txn.put(b"used.%d" % queue, _U64.pack(max(0, self._used(txn, queue) + delta)), db=self._meta)

    def _next(self, txn, name: bytes) -> int:
        raw = txn.get(name, db=self._meta)
        n = (_U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(name, _U64.pack(n), db=self._meta)
        return n


_VERIFY_SECONDS = 600.0


def verify_elsewhere(path: Path) -> str | None:
    """Read every page of the index in a child process; None if all are readable, else what
    went wrong. In a child because on some damage (zeroed pages) LMDB aborts the process."""
    try:
        done = subprocess.run([sys.executable, "-m", "tieredfs.index", str(path)], capture_output=True,
                              text=True, timeout=_VERIFY_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("event=cache_index_verify_slow seconds=%d action=kept_unverified", _VERIFY_SECONDS)
        return None
    if done.returncode == 0:
        return None
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[-1] if lines else f"the check died (exit status {done.returncode})"


def _walk(path: Path) -> int:
    """Every key and value of every database (overflow pages included); returns how many."""
    env = lmdb.open(str(path), readonly=True, max_dbs=6, subdir=True, readahead=False)
    n = 0
    with env.begin() as txn:
        names = [bytes(k) for k, _ in txn.cursor()]
        for name in [None, *names]:
            db = env.open_db(name, txn=txn, create=False) if name else None
            for _ in txn.cursor(db=db).iternext(keys=True, values=True):
                n += 1
    env.close()
    return n


if __name__ == "__main__":
    try:
        print(f"ok entries={_walk(Path(sys.argv[1]))}")
    except lmdb.Error as e:
        print(f"{type(e).__name__}: {e}")
        sys.exit(1)
