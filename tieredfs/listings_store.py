"""Directory listings kept in the cache dir, so a restarted daemon serves cached files at once.

One SQLite file (`listings.sqlite`, standard library): a row per (store identity, prefix),
replaced whole in one transaction. SQLite's WAL journal makes every write atomic across a
crash or a SIGKILL, and a bound on the whole store is one DELETE of the oldest rows; a file
per directory would need an fsync and a rename per listing, and a walk of every file to
keep a bound (docs/namespace.md, "Listings kept across restarts").

The identity is the endpoint and the bucket: another bucket's or another store's listing
of the same prefix is never found. Each row's blob (zlib, whose checksum catches damage)
repeats identity and prefix, checked on load, so a damaged row is never another's entries.

Writes happen in one thread of the store's own, from a bounded set of pending listings
(the newest per prefix); a load first looks there, so it never finds an older row than the
last listing saved. Anything wrong with the file (damaged, another format version, a disk
error) is logged once, the file is started afresh, and the daemon lists S3 as without it.
"""

import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from pathlib import Path

from .tiers.s3 import ListedObject, Listing

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_APPLICATION_ID = 0x74664C53  # "tfLS": a SQLite file of another program is not read as ours
_PENDING_NAMES = 500_000  # names of listings waiting for the writer thread, all together
_FORGET = object()  # pending: the stored row must not be used (the directory was marked stale)


class ListingStore:
    def __init__(self, path: Path, identity: str, max_bytes: int, counters=None):
        self.path = path
        self._identity = identity
        self._max_bytes = max_bytes
        self._counters = counters
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()  # one connection, used by loaders and the writer
        self._total = 0  # bytes of blobs stored
        self._disabled = False
        self._pending: dict[str, tuple] = {}  # prefix -> (listing or _FORGET, wall time listed)
        self._pending_names = 0
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        self._closing = False

    # --- the namespace's side ------------------------------------------------------------

    def load(self, prefix: str) -> tuple[Listing, float] | None:
        """(listing, its age in seconds) as last saved for `prefix`, or None. Blocking."""
        with self._cond:
            pending = self._pending.get(prefix)
        if pending is not None:
            listing, at = pending
            return None if listing is _FORGET else (listing, time.time() - at)
        blob = self._run(self._select, prefix)
        if blob is None:
            return None
        try:
            listing, at = _decode(blob, self._identity, prefix)
        except (ValueError, TypeError, KeyError, zlib.error) as e:
            self._count("damaged_rows")
            log.warning("event=listing_ignored prefix=%r reason=%r action=listing_s3", prefix, str(e))
            self.forget(prefix)
            return None
        self._count("loads")
        return listing, time.time() - at

    def save(self, prefix: str, listing: Listing, listed_at: float) -> None:
        """Keep `listing` (taken at wall time `listed_at`); written soon, by the writer thread."""
        self._queue(prefix, listing, listed_at, len(listing.objects) + len(listing.prefixes))

    def forget(self, prefix: str) -> None:
        """The stored listing of `prefix` must not be used again (S3 showed it wrong)."""
        self._queue(prefix, _FORGET, 0.0, 0)

    def _queue(self, prefix: str, item, at: float, names: int) -> None:
        if self._disabled:
            return
        with self._cond:
            if self._closing:
                return
            old = self._pending.get(prefix)
            old_names = _names(old[0]) if old else 0
            if item is not _FORGET and self._pending_names - old_names + names > _PENDING_NAMES:
                self._count("dropped")  # the disk is behind: this one is listed again next start
                return
            self._pending[prefix] = (item, at)
            self._pending_names += names - old_names
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="listings-writer",
                                                daemon=True)
                self._writer.start()
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending (for at most `timeout` seconds) and close the file."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            writer = self._writer
        if writer is not None:
            writer.join(timeout)
        with self._db_lock:
            if self._db is not None and (writer is None or not writer.is_alive()):
                self._db.close()
                self._db = None

    # --- the writer thread ---------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                prefix = next(iter(self._pending))
                item, at = self._pending[prefix]
            if item is _FORGET:
                self._run(self._delete, prefix)
            else:
                blob = _encode(item, self._identity, prefix, at)
                self._run(self._upsert, prefix, blob)
            with self._cond:
                # Only if no newer listing of it came meanwhile.
                if self._pending.get(prefix, (None,))[0] is item:
                    del self._pending[prefix]
                    self._pending_names -= _names(item)

    # --- SQLite ----------------------------------------------------------------------------

    def _run(self, fn, *args):
        """fn(db, *args) under the lock; a broken file is logged once and started afresh."""
        if self._disabled:
            return None
        with self._db_lock:
            try:
                if self._db is None:
                    self._db = self._open()
                return fn(self._db, *args)
            except (sqlite3.Error, OSError, _Unusable) as e:
                self._reset(e)
                return None

    def _open(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        if fresh:  # created 0600 as the cache's other files; SQLite gives its WAL the same mode
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            app, version = (db.execute("PRAGMA application_id").fetchone()[0],
                            db.execute("PRAGMA user_version").fetchone()[0])
            if (app, version) == (0, 0) and not db.execute("SELECT 1 FROM sqlite_master").fetchone():
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # space of evicted rows goes back
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("CREATE TABLE listings (identity TEXT NOT NULL, prefix TEXT NOT NULL, "
                           "written REAL NOT NULL, data BLOB NOT NULL, PRIMARY KEY (identity, prefix))")
                db.execute("CREATE INDEX by_age ON listings (written)")
                db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
            elif app != _APPLICATION_ID:
                raise _Unusable("not a tieredfs listings file")
            elif version != FORMAT_VERSION:
                raise _Unusable(f"format version {version}, this tieredfs reads {FORMAT_VERSION}")
            else:
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # a crash loses the last writes, never the file
            self._total = db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM listings").fetchone()[0]
        except BaseException:
            db.close()
            raise
        return db

    def _select(self, db: sqlite3.Connection, prefix: str) -> bytes | None:
        row = db.execute("SELECT data FROM listings WHERE identity = ? AND prefix = ?",
                         (self._identity, prefix)).fetchone()
        return None if row is None else row[0]

    def _delete(self, db: sqlite3.Connection, prefix: str) -> None:
        old = db.execute("SELECT LENGTH(data) FROM listings WHERE identity = ? AND prefix = ?",
                         (self._identity, prefix)).fetchone()
        if old is not None:
            db.execute("DELETE FROM listings WHERE identity = ? AND prefix = ?", (self._identity, prefix))
            self._total -= old[0]

    def _upsert(self, db: sqlite3.Connection, prefix: str, blob: bytes) -> None:
        if len(blob) > self._max_bytes // 2:
            self._count("too_big")  # one directory may not push every other one out
            self._delete(db, prefix)
            return
        total = self._total
        db.execute("BEGIN")  # one transaction: the old row or the new one, never neither
        try:
            self._delete(db, prefix)
            db.execute("INSERT INTO listings VALUES (?, ?, ?, ?)",
                       (self._identity, prefix, time.time(), blob))
            self._total += len(blob)
            over = self._total > self._max_bytes
            if over:
                self._evict(db)
            db.execute("COMMIT")
            if over:
                db.execute("PRAGMA incremental_vacuum").fetchall()  # the file shrinks back
        except BaseException:
            self._total = total
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._count("saves")

    def _evict(self, db: sqlite3.Connection) -> None:
        """The oldest rows, down to 3/4 of the bound (of any identity: it is one cache dir)."""
        goal = self._max_bytes * 3 // 4
        for rowid, size in db.execute("SELECT rowid, LENGTH(data) FROM listings ORDER BY written").fetchall():
            if self._total <= goal:
                break
            db.execute("DELETE FROM listings WHERE rowid = ?", (rowid,))
            self._total -= size
            self._count("evicted")

    def _reset(self, error: BaseException) -> None:
        """Called with the lock held: the file is set aside for a new one, once per daemon."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self._count("resets")
        first = not getattr(self, "_was_reset", False)
        self._was_reset = True
        log.warning("event=listings_file_unusable path=%s error=%r action=%s", self.path, str(error),
                    "starting_afresh" if first else "not_persisting_listings")
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except OSError:
                pass
        self._total = 0
        if not first:
            self._disabled = True  # it broke again: listings are not kept for this run

    def _count(self, name: str) -> None:
        if self._counters is not None:
            self._counters.add(name)


class _Unusable(Exception):
    """The file is not one this version can read."""


def _names(item) -> int:
    return 0 if item is _FORGET else len(item.objects) + len(item.prefixes)


def _encode(listing: Listing, identity: str, prefix: str, at: float) -> bytes:
    """Names relative to the prefix (they all share it), as compact JSON, compressed."""
    n = len(prefix)
    body = {"v": FORMAT_VERSION, "id": identity, "prefix": prefix, "at": at,
            "p": [p[n:] for p in listing.prefixes],
            "o": [[o.key[n:], o.size, o.mtime_ns, o.etag] for o in listing.objects]}
    return zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 1)


def _decode(blob: bytes, identity: str, prefix: str) -> tuple[Listing, float]:
    body = json.loads(zlib.decompress(blob))
    if body["v"] != FORMAT_VERSION or body["id"] != identity or body["prefix"] != prefix:
        raise ValueError("the row is not this store's listing of this prefix")
    prefixes = [prefix + p for p in body["p"]]
    # (prefix + a name that is not a string is a TypeError: a damaged row)
    objects = [ListedObject(prefix + k, int(size), int(mtime), str(etag)) for k, size, mtime, etag in body["o"]]
    return Listing(prefixes, objects), float(body["at"])


def identity(endpoint_url: str | None, region: str | None, bucket: str) -> str:
    """Whose listings these are: the same bucket name on another store is another bucket."""
    return f"{(endpoint_url or 'aws:' + (region or '')).rstrip('/').lower()}|{bucket}"
