"""Tier 1's capacity: room made (evicting) and reserved before a fill writes, so concurrent
fills cannot overshoot the cap, and the disk space of evicted blocks given back.
"""

import os
import threading
import time
from pathlib import Path
from typing import Callable

from ..index import BlockIndex, Removed
from ..memory import in_pages
from ..stats import Counters
from .blockfiles import BlockFiles
from .cachedir import CacheDir

_STATVFS_TTL = 1.0
_IN_FLIGHT_SHARE = 4  # fills being written take at most 1/4 of the cache


class Room:
    def __init__(self, cache: CacheDir, index: BlockIndex, files: BlockFiles, *, capacity: int,
                 min_free: int, counters: Counters, say_once: Callable[[str, str], None]):
        self.cache = cache
        self.index = index
        self.files = files
        self.capacity = capacity
        self.min_free = min_free
        self.counters = counters
        self._say_once = say_once
        self.lock = threading.Lock()  # held while room is made, and while orphans are judged
        self._written = threading.Condition(self.lock)  # a reservation ended
        self.reserved = 0
        self.filling: dict[str, int] = {}  # file -> blocks being written into it (under lock)
        self._free_at: tuple[float, int] | None = None  # (when, free bytes) of the last statvfs

    def reserve(self, n: int, files: list[str], hits: Callable[[], dict[bytes, int]]) -> bool:
        """Room for n bytes going into these files (one entry per block), evicting with the
        hits counted so far. Evicted bytes are freed before the lock is let go, so a fill
        that follows (perhaps of the same block) is never punched out."""
        with self.lock:
            capacity = self._effective_capacity()
            if n > capacity:
                return False
            # Room made for bytes still being written comes out of what is cached: with
            # several writers at once, each with a batch, a small cache would evict its hot
            # blocks to make room for the fills in flight. So fills in flight take at most a
            # quarter of the cache (or one batch, alone); a writer over that waits its turn.
            while self.reserved and self.reserved + n > capacity // _IN_FLIGHT_SHARE:
                self._written.wait()
            evicted = self.index.make_room(self.reserved + n, capacity, hits())
            self.reserved += n
            for file in files:
                self.filling[file] = self.filling.get(file, 0) + 1
            for removed in evicted:
                self.free(removed)
        if evicted:
            self.counters.add("evictions", len(evicted))
        return True

    def end(self, n: int, files: list[str]) -> None:
        """A reservation's writes are done (or failed)."""
        with self.lock:
            self.reserved -= n
            self._written.notify_all()
            for file in files:
                self.filling[file] -= 1
                if not self.filling[file]:
                    del self.filling[file]

    def _effective_capacity(self) -> int:
        """The configured cap, lowered so the cache disk keeps `min_free` bytes free."""
        if self._free_at is None or time.monotonic() - self._free_at[0] > _STATVFS_TTL:
            st = os.statvfs(self.cache.path)
            self._free_at = (time.monotonic(), st.f_bavail * st.f_frsize)
        return self._capacity_for(self.index.totals()["used_bytes"], self._free_at[1])

    def _capacity_for(self, used: int, free: int) -> int:
        return max(0, min(self.capacity, used + free - self.min_free))

    def gauges(self, used: int) -> dict[str, int]:
        if self._free_at is None:
            return {}
        # The disk as the cache last saw it (at most once a second, when it made room), and
        # what a fill may use now: below --cache-size when the disk, not the cap, limits.
        free = self._free_at[1]
        return {"local.disk_free_bytes": free, "local.capacity_bytes": self._capacity_for(used, free)}

    def free(self, removed: Removed) -> None:
        """Under the lock: the disk space of a block taken out of the index."""
        try:
            free_space(self.cache, self.files, removed, keep_file=removed.file.hex() in self.filling)
        except OSError as e:
            # Not on this filesystem: the space comes back when the file's last block goes.
            self.counters.add("punch_errors")
            self._say_once("punch_errors", f"event=cache_punch_failed dir={self.cache.path} error={e!r} "
                                           "action=space_freed_with_the_whole_file")


def free_space(cache: CacheDir, files: BlockFiles, removed: Removed, keep_file: bool = False) -> None:
    """The disk space of a block taken out of the index: its file goes with its last block
    (unless `keep_file`: a fill is writing into it), else its hole is punched (OSError if
    the filesystem cannot)."""
    file = removed.file.hex()
    if removed.last_in_file and not keep_file:
        files.forget(file)
        _remove(cache.file_path(file))
    else:
        # To the page's end: a hole frees only whole pages, and the rest of a block's last
        # page is its own (an object's last block ends its file; in a segment, the next
        # object starts on the next page). Else a small object's page stayed allocated.
        files.punch(file, removed.offset, in_pages(removed.length))


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
