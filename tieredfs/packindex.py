"""The pack index format: one SQLite file per index version, named by a pointer (docs/packs.md).

Under PREFIX/.tieredfs/ on S3:

    packs/RUN-NNNNN.pack   immutable: small source objects' bytes, concatenated in walk order
    packs/RUN-NNNNN.json   that pack's entries, written after the pack (a re-run adopts the
                           packs an interrupted run wrote but never indexed)
    index/RUN.sqlite       immutable: one version of the index
    index.json             the pointer naming the current version: written last, replaced whole

SQLite (in the standard library) is opened in place once downloaded: a lookup reads a few
pages, and nothing is parsed at load, so 1,000,000 entries load in the time of a download.

Since the listing mode (`--listing-from-index`), an index also holds each entry's mtime and the
prefix's objects that are not packed (`others`: too big, or empty), so that a directory can be
listed from it alone. Both are additions a reader of the first indexes simply does not ask
for; an index without them lists only its packed files, each with the mount's time.
"""

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash

from .errors import PackIndexUnusable

RESERVED = ".tieredfs"  # the reserved directory under a packed prefix; hidden in the mount
POINTER = "index.json"
FORMAT = 1

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE packs (id INTEGER PRIMARY KEY, key TEXT NOT NULL, etag TEXT NOT NULL,
                    size INTEGER NOT NULL);
CREATE TABLE entries (path TEXT PRIMARY KEY, etag NOT NULL, size INTEGER NOT NULL,
                      pack INTEGER NOT NULL, offset INTEGER NOT NULL, xxh3 INTEGER NOT NULL,
                      mtime_ns INTEGER) WITHOUT ROWID;
CREATE TABLE others (path TEXT PRIMARY KEY, etag NOT NULL, size INTEGER NOT NULL,
                     mtime_ns INTEGER) WITHOUT ROWID;
"""
_PAGE = 512  # rows per query of a directory listing
_MD5_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Pack:
    key: str  # full object key
    etag: str
    size: int


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # source key relative to the packed prefix
    etag: str  # the source object's ETag when packed
    size: int
    pack: Pack
    offset: int  # of the source's bytes in the pack
    xxh3: int  # xxh3-64 of the source's bytes
    mtime_ns: int = 0  # the source's Last-Modified (0: not in this index)


@dataclass(frozen=True, slots=True)
class Other:
    """An object of the prefix that is not packed: listed from the index, read from S3."""

    path: str
    etag: str
    size: int
    mtime_ns: int = 0


def reserved_prefix(prefix: str) -> str:
    return f"{prefix}{RESERVED}/"


def checksum(data) -> int:
    """xxh3-64 of the bytes, as SQLite's signed 64-bit integer."""
    value = xxhash.xxh3_64_intdigest(data)
    return value - (1 << 64) if value >= 1 << 63 else value


def etag_stored(etag: str):
    """An MD5 ETag (most of them) as its 16 bytes: half the index of its hex."""
    return bytes.fromhex(etag) if len(etag) == 32 and set(etag) <= _MD5_HEX else etag


def etag_read(value) -> str:
    return value.hex() if isinstance(value, bytes) else value


def pointer_bytes(index_name: str, entries: int, packs: int) -> bytes:
    return json.dumps({"format": FORMAT, "index": index_name, "entries": entries,
                       "packs": packs}).encode()


def index_name_of(pointer: bytes, where: str) -> str:
    """The index version a pointer names (relative to the reserved prefix)."""
    try:
        doc = json.loads(pointer)
        fmt, name = doc["format"], doc["index"]
    except (ValueError, KeyError, TypeError):
        raise PackIndexUnusable(f"pack index pointer {where!r} is not a tieredfs pointer") from None
    if fmt != FORMAT:
        raise PackIndexUnusable(f"pack index pointer {where!r} has format {fmt!r}; this tieredfs "
                                f"reads format {FORMAT}: upgrade it, or re-run tieredfs pack")
    if not isinstance(name, str) or not name.startswith("index/") or ".." in name:
        raise PackIndexUnusable(f"pack index pointer {where!r} names {name!r}")
    return name


def new_index(path: Path, prefix: str) -> None:
    """An empty index version in a new local file: its tables, its format and prefix."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.executescript(_SCHEMA)
        conn.executemany("INSERT INTO meta VALUES (?, ?)",
                         [("format", str(FORMAT)), ("prefix", prefix)])
        conn.commit()
    finally:
        conn.close()


def write_index(path: Path, prefix: str, entries: list[Entry], others: list[Other] = ()) -> int:
    """Write one index version to a new local file; returns the number of packs it names.
    (The packer builds its versions row by row instead: packwork.py.)"""
    pack_ids: dict[Pack, int] = {}
    for e in entries:
        pack_ids.setdefault(e.pack, len(pack_ids) + 1)
    new_index(path, prefix)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.executemany("INSERT INTO packs VALUES (?, ?, ?, ?)",
                         [(i, p.key, p.etag, p.size) for p, i in pack_ids.items()])
        conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                         ((e.path, etag_stored(e.etag), e.size, pack_ids[e.pack], e.offset, e.xxh3,
                           e.mtime_ns) for e in sorted(entries, key=lambda e: e.path)))
        conn.executemany("INSERT INTO others VALUES (?, ?, ?, ?)",
                         ((o.path, etag_stored(o.etag), o.size, o.mtime_ns)
                          for o in sorted(others, key=lambda o: o.path)))
        conn.commit()
    finally:
        conn.close()
    return len(pack_ids)


class PackIndex:
    """One index version, opened read-only in place. Thread-safe (one lock: lookups are µs)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True,
                                         check_same_thread=False)
            meta = dict(self._conn.execute("SELECT name, value FROM meta"))
            self.packs = {i: Pack(k, e, s) for i, k, e, s in
                          self._conn.execute("SELECT id, key, etag, size FROM packs")}
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(entries)")}
            tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.Error as e:
            raise PackIndexUnusable(f"pack index {path.name} cannot be read: {e}") from None
        if meta.get("format") != str(FORMAT):
            self._conn.close()
            raise PackIndexUnusable(f"pack index {path.name} has format {meta.get('format')!r}, "
                                    f"this tieredfs reads {FORMAT}")
        self._mtime = ", mtime_ns" if "mtime_ns" in columns else ", 0"
        self.lists_all = "others" in tables  # every object of the prefix, not only packed ones

    def lookup(self, path: str) -> Entry | None:
        row = self._query("SELECT etag, size, pack, offset, xxh3" + self._mtime +
                          " FROM entries WHERE path = ?", (path,), one=True)
        return None if row is None else self._entry(path, *row)

    def entries(self) -> list[Entry]:
        return [self._entry(*row) for row in self._query(
            "SELECT path, etag, size, pack, offset, xxh3" + self._mtime + " FROM entries", ())]

    def entries_by_pack(self) -> Iterator[tuple[Pack, list[Entry]]]:
        """Each pack with its entries in offset order, a pack at a time (`--verify`): one
        pack's entries in memory, not the index's. One sorted query, read a page at a time."""
        try:
            with self._lock:
                cursor = self._conn.execute("SELECT path, etag, size, pack, offset, xxh3" + self._mtime +
                                            " FROM entries ORDER BY pack, offset")
            current, group = None, []
            while True:
                with self._lock:
                    page = cursor.fetchmany(_PAGE)
                for row in page:
                    if row[3] != current and group:
                        yield self.packs[current], group
                        group = []
                    current = row[3]
                    group.append(self._entry(*row))
                if len(page) < _PAGE:
                    break
        except sqlite3.Error as e:
            raise PackIndexUnusable(f"pack index {self.path.name}: {e}") from None
        if group:
            yield self.packs[current], group

    def others(self) -> list[Other]:
        if not self.lists_all:
            return []
        return [Other(p, etag_read(e), s, m or 0) for p, e, s, m in
                self._query("SELECT path, etag, size, mtime_ns FROM others", ())]

    def directory(self, rel: str) -> tuple[list[Entry | Other], list[str]]:
        """What the index holds directly under `rel` ("" or ending in "/"): its files (an
        Entry if packed, else an Other) and the names of its subdirectories, each in path
        order. Whole subtrees are skipped in one query each, so a directory costs a query
        per page of its own names and one per subdirectory, however deep the tree below."""
        files: list[Entry | Other] = []
        dirs: set[str] = set()
        for table, columns, make in (
                ("entries", "path, etag, size, pack, offset, xxh3" + self._mtime, self._entry),
                ("others", "path, etag, size, mtime_ns", self._other)):
            if table == "others" and not self.lists_all:
                continue
            # Every path under "x/" sorts before "x0" ('0' follows '/'): a directory's
            # names are [rel, rel[:-1] + "0"), and a subtree is skipped by starting at "sub0".
            lo, end = rel, ((rel[:-1] + "0",) if rel else ())
            while True:
                rows = self._query(f"SELECT {columns} FROM {table} WHERE path >= ?"
                                   f"{' AND path < ?' if end else ''} ORDER BY path LIMIT {_PAGE}",
                                   (lo, *end))
                for row in rows:
                    rest = row[0][len(rel):]
                    if "/" in rest:
                        sub = rest.split("/", 1)[0]
                        dirs.add(sub)
                        lo = f"{rel}{sub}0"  # past the whole subtree, in one step
                        break
                    files.append(make(*row))
                    lo = row[0] + "\0"  # the next path after this one
                else:
                    if len(rows) < _PAGE:
                        break
        files.sort(key=lambda f: f.path)
        return files, sorted(dirs)

    def _query(self, sql: str, args: tuple, one: bool = False):
        try:
            with self._lock:
                cursor = self._conn.execute(sql, args)
                return cursor.fetchone() if one else cursor.fetchall()
        except sqlite3.Error as e:  # closed (a newer version replaced it) or damaged
            raise PackIndexUnusable(f"pack index {self.path.name}: {e}") from None

    def _entry(self, path, etag, size, pack, offset, xxh3, mtime_ns=0) -> Entry:
        return Entry(path, etag_read(etag), size, self.packs[pack], offset, xxh3, mtime_ns or 0)

    @staticmethod
    def _other(path, etag, size, mtime_ns) -> Other:
        return Other(path, etag_read(etag), size, mtime_ns or 0)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
