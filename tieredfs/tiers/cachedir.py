"""A cache directory: its paths, its single-owner lock, and opening its index whatever
state the last daemon left it in (tiers/local.py uses it; docs/cache.md, "LMDB durability").

Layout: CACHE_DIR/lock, CACHE_DIR/index.lmdb/ (with `closed-cleanly` while no daemon has
it open), CACHE_DIR/blocks/ab/<32-hex file id>.
"""

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path

from .. import private
from ..errors import CacheError, CacheFormatChanged, CacheLocked
from ..index import BlockIndex, verify_elsewhere

log = logging.getLogger(__name__)

_ASIDE = ".corrupt-"  # an unreadable index is kept as index.lmdb.corrupt-<time>
_CLEAN = "closed-cleanly"  # in index.lmdb/: the last daemon closed the index (open_index)


class CacheDir:
    """The paths of one cache directory and its single-owner lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.blocks = self.path / "blocks"
        self.index = self.path / "index.lmdb"
        self.lock_path = self.path / "lock"
        self._lock_fd: int | None = None

    def file_path(self, file: str) -> Path:
        # One level of 256 directories: with two (65,536) nearly every block of a new cache
        # also made a new directory, and ext4 directory creation was ~40% of the fill time.
        return self.blocks / file[:2] / file

    def create(self) -> None:
        try:
            private.make_dir(self.path)
            self.blocks.mkdir(mode=private.DIR_MODE, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot create cache dir {self.path}: {e.strerror}") from None

    def lock(self, owner: str) -> None:
        """Become the one daemon using this cache dir, or say who already is."""
        fd = private.open_file(self.lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLocked(f"cache dir {self.path} is in use by {self.holder() or 'another process'}")
        self._lock_fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {owner}\n".encode())
        except OSError:
            pass  # a full disk: the flock still protects; only the "who" is missing

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def holder(self) -> str | None:
        """'tieredfs pid N (mounted at M)' if a live daemon holds the lock, else None."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                pid, _, mnt = os.read(fd, 4096).decode(errors="replace").strip().partition(" ")
                return f"tieredfs pid {pid} (mounted at {mnt})"
        finally:
            os.close(fd)

    def holder_mountpoint(self) -> str | None:
        text = self.holder()
        return text.partition("(mounted at ")[2].rstrip(")") if text else None


def open_index(cache: CacheDir, map_size: int) -> BlockIndex:
    """Open the index; one of an older format is removed, an unreadable one moved aside (the
    last one only: they are not counted in the cache size), and the cache starts empty. The
    files it indexed are orphans then, swept in the background. One that the last daemon
    did not close is read through in a child process first (_check_unclean)."""
    try:
        _check_unclean(cache)
        index = BlockIndex(cache.index, map_size)
        index.totals()
    except CacheFormatChanged as e:
        log.warning("event=cache_index_format_changed detail=%r action=start_empty", str(e))
        _clear_away(lambda: shutil.rmtree(cache.index))
    except CacheError as e:
        if not cache.index.exists():
            raise  # nothing to move aside: the disk itself refuses (full, read-only)
        for older in cache.index.parent.glob(f"{cache.index.name}{_ASIDE}*"):
            shutil.rmtree(older, ignore_errors=True)
        aside = cache.index.with_name(f"{cache.index.name}{_ASIDE}{int(time.time())}")
        log.warning("event=cache_index_unreadable error=%r action=start_empty moved_to=%s", str(e), aside)
        _clear_away(lambda: os.rename(cache.index, aside))
    else:
        return _in_use(cache, index)
    return _in_use(cache, BlockIndex(cache.index, map_size))


def _in_use(cache: CacheDir, index: BlockIndex) -> BlockIndex:
    try:
        _set_clean(cache, False)
    except CacheError:
        index.close()
        raise
    return index


def _check_unclean(cache: CacheDir) -> None:
    """After a daemon that did not close the index (killed, or the OS went down: with
    MDB_NOSYNC a power loss can leave pages that were never written, and on some LMDB
    aborts the process), read all of it in a child process before this one opens it."""
    if not (cache.index / "data.mdb").exists() or (cache.index / _CLEAN).exists():
        return
    problem = verify_elsewhere(cache.index)
    if problem is not None:
        raise CacheError(f"cache index {cache.index} was not closed cleanly and is damaged: {problem}")


def _set_clean(cache: CacheDir, clean: bool) -> None:
    """The mark of an index closed cleanly (synced after it): made at close, removed at open,
    each durable before the index is written again."""
    marker = cache.index / _CLEAN
    try:
        if clean:
            os.close(private.open_file(marker, os.O_WRONLY | os.O_CREAT))
        else:
            marker.unlink(missing_ok=True)
        fd = os.open(cache.index, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if not clean:
            raise CacheError(f"cannot mark cache index {cache.index} in use: {e.strerror}") from None
        # Not marked clean: the next start reads the index through once more, nothing worse.


def _clear_away(step) -> None:
    """Remove or move the old index; a disk that refuses makes the cache unusable, not the start."""
    try:
        step()
    except OSError as e:
        raise CacheError(f"cannot clear away the old cache index: {e.strerror}") from None


def mark_clean(cache: CacheDir) -> None:
    """After the index's last sync and close: the next start need not read it through."""
    _set_clean(cache, True)
