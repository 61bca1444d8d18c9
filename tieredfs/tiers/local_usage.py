"""Tier 1's record of block re-use, for the eviction (S3-FIFO, index.py): hits batched in
memory and written to the index when room is next made, never one LMDB write per read.
"""

import threading
import time
from collections import OrderedDict

# Reads of one block within this many seconds of the access that began its current use
# (its fill, or the last counted hit) are one use: the kernel's 128 KiB pieces of a 1 MiB
# block, or a prefetched block then read, must not look like re-use to the eviction.
CORRELATION_WINDOW = 2.0
_RECENT_MAX = 65536
HITS_BATCH = 65536  # hits kept in memory before they are written to the index


class Usage:
    def __init__(self):
        self._hits: dict[bytes, int] = {}
        self._recent: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, block_id: bytes, may_flush: bool) -> bool:
        """Count a read of the block; True if the batch is full and this caller (a worker
        thread, may_flush) should write it to the index now.

        The trio thread (may_flush=False) never waits: with the lock busy, or a full batch
        waiting for a worker, its hit goes unrecorded. Only the eviction order can suffer,
        and by one hit; waiting for a lock a worker holds could cost the whole event loop
        the GIL's switch interval."""
        now = time.monotonic()
        if not self._lock.acquire(blocking=may_flush):
            return False
        try:
            began = self._recent.get(block_id)
            if began is not None and now - began < CORRELATION_WINDOW:
                return False
            full = len(self._hits) >= HITS_BATCH
            if full and not may_flush:
                return False
            self._hits[block_id] = self._hits.get(block_id, 0) + 1
            self._begin_use(block_id, now)
            return full
        finally:
            self._lock.release()

    def filled(self, block_ids, now: float) -> None:
        """Blocks just written: their fill begins a use."""
        with self._lock:
            for block_id in block_ids:
                self._begin_use(block_id, now)

    def take(self) -> dict[bytes, int]:
        """The hits counted since the last take (block id -> reads)."""
        with self._lock:
            hits, self._hits = self._hits, {}
        return hits

    def _begin_use(self, block_id: bytes, now: float) -> None:
        self._recent[block_id] = now
        self._recent.move_to_end(block_id)
        if len(self._recent) > _RECENT_MAX:
            self._recent.popitem(last=False)
