"""The pack index format: one SQLite file per index version, named by a pointer (docs/packs.md).

Under PREFIX/.tieredfs/ on S3:

    packs/RUN-NNNNN.pack   immutable: small source objects' bytes, concatenated in walk order
    packs/RUN-NNNNN.json   that pack's entries, written after the pack (a re-run adopts the
                           packs an interrupted run wrote but never indexed)
    index/RUN.sqlite       immutable: one version of the index
    index.json             the pointer naming the current version: written last, replaced whole

SQLite (in the standard library) is opened in place once downloaded: a lookup reads a few
pages, and nothing is parsed at load, so 1,000,000 entries load in the time of a download.
"""

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

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
                      pack INTEGER NOT NULL, offset INTEGER NOT NULL, xxh3 INTEGER NOT NULL)
                      WITHOUT ROWID;
"""
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


def reserved_prefix(prefix: str) -> str:
    return f"{prefix}{RESERVED}/"


def checksum(data) -> int:
    """xxh3-64 of the bytes, as SQLite's signed 64-bit integer."""
    value = xxhash.xxh3_64_intdigest(data)
    return value - (1 << 64) if value >= 1 << 63 else value


def _etag_stored(etag: str):
    """An MD5 ETag (most of them) as its 16 bytes: half the index of its hex."""
    return bytes.fromhex(etag) if len(etag) == 32 and set(etag) <= _MD5_HEX else etag


def _etag_read(value) -> str:
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


def write_index(path: Path, prefix: str, entries: list[Entry]) -> int:
    """Write one index version to a new local file; returns the number of packs it names."""
    pack_ids: dict[Pack, int] = {}
    for e in entries:
        pack_ids.setdefault(e.pack, len(pack_ids) + 1)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.executescript(_SCHEMA)
        conn.executemany("INSERT INTO meta VALUES (?, ?)",
                         [("format", str(FORMAT)), ("prefix", prefix)])
        conn.executemany("INSERT INTO packs VALUES (?, ?, ?, ?)",
                         [(i, p.key, p.etag, p.size) for p, i in pack_ids.items()])
        conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                         ((e.path, _etag_stored(e.etag), e.size, pack_ids[e.pack], e.offset, e.xxh3)
                          for e in sorted(entries, key=lambda e: e.path)))
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
        except sqlite3.Error as e:
            raise PackIndexUnusable(f"pack index {path.name} cannot be read: {e}") from None
        if meta.get("format") != str(FORMAT):
            self._conn.close()
            raise PackIndexUnusable(f"pack index {path.name} has format {meta.get('format')!r}, "
                                    f"this tieredfs reads {FORMAT}")

    def lookup(self, path: str) -> Entry | None:
        try:
            with self._lock:
                row = self._conn.execute("SELECT etag, size, pack, offset, xxh3 FROM entries "
                                         "WHERE path = ?", (path,)).fetchone()
        except sqlite3.Error as e:  # closed (a newer version replaced it) or damaged
            raise PackIndexUnusable(f"pack index {self.path.name}: {e}") from None
        return None if row is None else self._entry(path, *row)

    def entries(self) -> list[Entry]:
        with self._lock:
            rows = self._conn.execute("SELECT path, etag, size, pack, offset, xxh3 FROM entries").fetchall()
        return [self._entry(*row) for row in rows]

    def _entry(self, path, etag, size, pack, offset, xxh3) -> Entry:
        return Entry(path, _etag_read(etag), size, self.packs[pack], offset, xxh3)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
