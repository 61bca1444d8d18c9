"""One `tieredfs pack` run's view of its prefix, in SQLite files of a temporary directory.

The listing, the entries of the last index that still hold, what is left to pack and the
index version being built all live on disk, so the packer's memory does not grow with the
prefix: a page of the listing, one pack's objects and SQLite's page cache. The temporary
directory is the system's (TMPDIR): about 250 bytes of disk per object there (the listing
and plan ~130, the new index ~65, the last index ~65).
"""

import contextlib
import functools
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import PackWorkFailed
from .packindex import Pack, PackIndex, etag_read, etag_stored, new_index
from .tiers.s3 import ListedObject, S3Backend

_WORK_SCHEMA = """
CREATE TABLE sources (path TEXT PRIMARY KEY, etag NOT NULL, size INTEGER NOT NULL,
                      mtime_ns INTEGER NOT NULL, walk TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE packmap (old INTEGER PRIMARY KEY, new INTEGER NOT NULL);
CREATE TABLE todo (seq INTEGER PRIMARY KEY, path TEXT NOT NULL, etag NOT NULL, size INTEGER NOT NULL);
"""
_PAGE = 1000
_NOT_PACKED = "NOT EXISTS (SELECT 1 FROM idx.entries e WHERE e.path = s.path)"


def walk_key(path: str) -> str:
    """A key that sorts as a walk reads: a directory's files, then its subdirectories one by
    one, each in name order (os.walk, find, a data loader's listing). The directories are
    joined by \\x01 and the name follows \\x00, both below any character of a real key, so
    SQLite's byte order of these strings is the order of (directories, name)."""
    parent, _, name = path.rpartition("/")
    return parent.replace("/", "\x01") + "\x00" + name


_KINDS = ("pack", "verify", "gc")


@contextlib.contextmanager
def work_dir(kind: str) -> Iterator[Path]:
    """A temporary directory for one run's work files (`kind`: pack, verify or gc), named
    with this process's id. Those of runs that were killed (SIGKILL, a crash: a SIGTERM lets
    a run remove its own) are removed first, so they do not pile up in TMPDIR."""
    base = Path(tempfile.gettempdir())
    _sweep(base)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"tieredfs-{kind}-{os.getpid()}-", dir=base))
    except OSError as e:
        raise work_failed(base, e) from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sweep(base: Path) -> None:
    for d in base.glob("tieredfs-*-*-*"):
        _, kind, pid, *_ = d.name.split("-")
        if kind not in _KINDS or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # its run is gone
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # alive, as another user
            pass


def downloaded_index(s3: S3Backend, key: str, path: Path) -> PackIndex:
    """The index version `key`, downloaded to `path` in a work dir (streamed, not held in
    memory) and opened. The work dir goes with the file."""
    try:
        s3.get_file(key, path)
    except OSError as e:
        raise work_failed(path.parent, e) from None
    return PackIndex(path)


def work_failed(workdir: Path, e: Exception) -> PackWorkFailed:
    return PackWorkFailed(f"the packer's work files in {workdir} failed ({e}): free space there, "
                          f"or set TMPDIR to a disk with room (about 250 bytes per object)")


def _work_errors(fn):
    """SQLite's failures (a full disk above all) as one clear error, not a traceback."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (sqlite3.Error, OSError) as e:
            raise work_failed(self.workdir, e) from None
    return wrapper


class PackWork:
    @_work_errors
    def __init__(self, workdir: Path, prefix: str):
        self.workdir = workdir
        self.prefix = prefix
        self.index_path = workdir / "index.sqlite"
        new_index(self.index_path, prefix)
        self._db = sqlite3.connect(workdir / "work.sqlite")
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_WORK_SCHEMA)
        self._db.execute("ATTACH ? AS idx", (str(self.index_path),))
        for pragma in ("journal_mode=OFF", "synchronous=OFF"):
            self._db.execute(f"PRAGMA idx.{pragma}")
        self._pack_ids: dict[str, int] = {}  # pack key -> its id in the index being built
        self._old_others: bool | None = None  # the last index lists its unpacked objects

    # --- what the prefix holds --------------------------------------------------------------

    @_work_errors
    def add_sources(self, objects: Iterable[tuple[str, ListedObject]]) -> None:
        """(path under the prefix, object) of a page of the listing."""
        self._db.executemany("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?)",
                             ((path, etag_stored(o.etag), o.size, o.mtime_ns, walk_key(path))
                              for path, o in objects))

    @_work_errors
    def keep(self, old_index: Path, listed_packs: dict[str, str], lists_all: bool) -> tuple[int, int]:
        """The last index's entries whose source and pack are as listed, into the new
        version; returns (kept, dropped). `listed_packs`: pack key -> ETag now."""
        self._db.execute("ATTACH ? AS old", (str(old_index),))
        self._old_others = lists_all
        for old_id, key, etag, size in self._db.execute("SELECT id, key, etag, size FROM old.packs").fetchall():
            if listed_packs.get(key) == etag:
                self._db.execute("INSERT INTO packmap VALUES (?, ?)", (old_id, self._pack_id(Pack(key, etag, size))))
        kept = self._changes(
            "INSERT INTO idx.entries SELECT e.path, e.etag, e.size, m.new, e.offset, e.xxh3, s.mtime_ns"
            " FROM old.entries e JOIN packmap m ON m.old = e.pack"
            " JOIN sources s ON s.path = e.path AND s.etag = e.etag AND s.size = e.size")
        total = self._db.execute("SELECT count(*) FROM old.entries").fetchone()[0]
        return kept, total - kept

    @_work_errors
    def adopt(self, pack: Pack, rows: Iterable[tuple]) -> int:
        """A manifest's rows (path, etag, size, offset, xxh3) whose source is unchanged and
        not already packed; returns how many were taken."""
        pack_id = self._pack_id(pack)
        return self._changes(
            "INSERT INTO idx.entries SELECT s.path, s.etag, s.size, ?, ?, ?, s.mtime_ns FROM sources s"
            f" WHERE s.path = ? AND s.etag = ? AND s.size = ? AND {_NOT_PACKED}",
            [(pack_id, offset, xxh3, path, etag_stored(etag), size)
             for path, etag, size, offset, xxh3 in rows])

    # --- what is left to pack ---------------------------------------------------------------

    @_work_errors
    def plan(self, max_size: int) -> tuple[int, int]:
        """Lists the sources not packed yet, of 1 to `max_size` bytes, in walk order, in a
        table of their own (so packing them may insert as it goes); returns (files, bytes)."""
        self._db.execute("DELETE FROM todo")
        self._db.execute("INSERT INTO todo (path, etag, size) SELECT path, etag, size FROM sources s"
                         f" WHERE size BETWEEN 1 AND ? AND {_NOT_PACKED} ORDER BY walk", (max_size,))
        return self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM todo").fetchone()

    def todo(self) -> Iterator[ListedObject]:
        """What `plan` listed, in its order, read a page at a time."""
        seq = 0
        while True:
            rows = self._db.execute("SELECT seq, path, etag, size FROM todo WHERE seq > ? ORDER BY seq"
                                    f" LIMIT {_PAGE}", (seq,)).fetchall()
            for seq, path, etag, size in rows:
                yield ListedObject(self.prefix + path, size, 0, etag_read(etag))
            if len(rows) < _PAGE:
                return

    @_work_errors
    def packed(self, pack: Pack, rows: list[tuple]) -> None:
        """The entries of a pack just written: rows (path, etag, size, offset, xxh3)."""
        pack_id = self._pack_id(pack)
        self._db.executemany(
            "INSERT INTO idx.entries SELECT ?, ?, ?, ?, ?, ?, mtime_ns FROM sources WHERE path = ?",
            [(path, etag_stored(etag), size, pack_id, offset, xxh3, path)
             for path, etag, size, offset, xxh3 in rows])

    # --- the new version -------------------------------------------------------------------

    @_work_errors
    def finish(self) -> tuple[int, int, bool]:
        """Complete the version: the objects not packed (`others`, for --listing-from-index),
        and only the packs its entries name. Returns (entries, packs, whether its `others`
        differ from the last index's: False if there was no last index)."""
        self._db.execute(f"INSERT INTO idx.others SELECT path, etag, size, mtime_ns FROM sources s WHERE {_NOT_PACKED}")
        self._db.execute("DELETE FROM idx.packs WHERE id NOT IN (SELECT pack FROM idx.entries)")
        count = lambda sql: self._db.execute(sql).fetchone()[0]
        if self._old_others is None:
            changed = False
        elif self._old_others:
            changed = bool(count("SELECT EXISTS (SELECT * FROM idx.others EXCEPT SELECT * FROM old.others)") or
                           count("SELECT EXISTS (SELECT * FROM old.others EXCEPT SELECT * FROM idx.others)"))
        else:
            changed = bool(count("SELECT EXISTS (SELECT 1 FROM idx.others)"))
        entries, packs = count("SELECT count(*) FROM idx.entries"), count("SELECT count(*) FROM idx.packs")
        self._db.commit()
        return entries, packs, changed

    def close(self) -> None:
        self._db.close()

    def _pack_id(self, pack: Pack) -> int:
        if pack.key not in self._pack_ids:
            self._pack_ids[pack.key] = len(self._pack_ids) + 1
            self._db.execute("INSERT INTO idx.packs VALUES (?, ?, ?, ?)",
                             (self._pack_ids[pack.key], pack.key, pack.etag, pack.size))
        return self._pack_ids[pack.key]

    def _changes(self, sql: str, rows: list[tuple] | None = None) -> int:
        before = self._db.total_changes
        if rows is None:
            self._db.execute(sql)
        else:
            self._db.executemany(sql, rows)
        return self._db.total_changes - before
