"""The mount's side of packs: which listed prefixes are packed, and where a file's bytes are.

A directory whose listing shows the reserved `.tieredfs/` is a packed prefix. Its pointer is
read (one GET) when the listing is, at most once per listing TTL, and the index version it
names is downloaded once into the cache dir (versions are immutable: a restart reuses it).
A file is served from a pack only while the ETag its listing shows is the one packed: a
changed source object bypasses the pack, so a stale pack never serves old bytes.

Failures here never fail a listing or a read: without an index, files are read from their
own objects, as if nothing were packed.

Three more things are answered from the index (docs/packs.md):
- opens: each listed directory's packed files are looked up in one pass when it is listed
  (`listed`), so open() finds its pack range on the trio thread, without a worker thread;
- a mount below a packed prefix: the mount root's ancestors are probed for a pointer (one
  GET each, once per listing TTL), since no listing of the mount shows their `.tieredfs/`;
- with `--listing-from-index`, directories under a packed prefix are listed from its index
  (`listing`), with no LIST: objects added since the last `tieredfs pack` are not seen.
"""

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from .blocks import ObjectVersion
from .errors import ObjectMissing, PackIndexUnusable, TieredError
from .packindex import POINTER, RESERVED, Entry, PackIndex, index_name_of, reserved_prefix
from .stats import Counters
from .tiers.s3 import ListedObject, Listing

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackedSource:
    """Where a packed file's bytes are: [offset, offset+size) of `pack`."""

    pack: ObjectVersion
    offset: int
    size: int


UNKNOWN = object()  # source_now: the file's directory was not looked up; ask `source`
_PRELOADED_FILES = 200_000  # packed files of listed directories kept for opens (~200 B each)


@dataclass
class _Prefix:
    checked_at: float
    pointer_etag: str = ""
    index: PackIndex | None = None


class PackRegistry:
    def __init__(self, bucket: str, get_object: Callable[[str], tuple[bytes, str]],
                 get_file: Callable[[str, Path], str], index_dir: Path, ttl: float, counters: Counters,
                 clock: Callable[[], float] = time.monotonic, root: str = "",
                 listing_from_index: bool = False):
        self.bucket = bucket
        self._root = root  # the mount's prefix: its ancestors may be packed
        self._from_index = listing_from_index
        self._probed: dict[str, float] = {}  # prefix -> when its pointer was last looked for
        # Directory -> its packed files by key, looked up when it was listed (opens use it).
        self._dirs: OrderedDict[str, dict[str, Entry]] = OrderedDict()
        self._preloaded = 0
        self._get = get_object
        self._get_file = get_file  # an index, streamed to disk: not held in memory
        self._dir = index_dir
        self._ttl = ttl
        self._clock = clock
        self.counters = counters
        self._lock = threading.Lock()
        self._prefixes: dict[str, _Prefix] = {}
        self._packed: tuple[str, ...] = ()  # prefixes with an index, longest first

    def listed(self, prefix: str, packed: bool) -> None:
        """A listing of `prefix` was taken (a worker thread); `packed`: it shows `.tieredfs/`."""
        self._check(prefix, packed)
        if prefix == self._root:
            self._probe(_ancestors(prefix))
        self._preload(prefix)

    def _check(self, prefix: str, packed: bool) -> None:
        """The pointer of `prefix` read again once a TTL, and the index it names loaded."""
        with self._lock:
            state = self._prefixes.get(prefix)
        if not packed:
            if state is not None:
                self._replace(prefix, None)
            return
        if state is not None and self._clock() - state.checked_at < self._ttl:
            return
        where = reserved_prefix(prefix) + POINTER
        try:
            pointer, etag = self._get(where)
            if state is not None and etag == state.pointer_etag:
                state.checked_at = self._clock()
                return
            index = self._load(prefix, index_name_of(pointer, where))
        except ObjectMissing:
            self._replace(prefix, None)  # packs being written, no index yet
            return
        except TieredError as e:
            self.counters.add("index_errors")
            log.warning("event=pack_index_unusable prefix=%r error=%r action=reading_source_objects",
                        prefix, str(e))
            if state is not None:
                state.checked_at = self._clock()  # keep what we have; try again after a TTL
            return
        self._replace(prefix, _Prefix(self._clock(), etag, index))
        log.info("event=pack_index_loaded prefix=%r index=%s packs=%d", prefix, index.path.name,
                 len(index.packs))

    def _load(self, prefix: str, name: str) -> PackIndex:
        key = reserved_prefix(prefix) + name
        local = self._dir / (xxhash.xxh3_128_hexdigest(f"{self.bucket}\0{key}".encode()) + ".sqlite")
        if not local.exists():
            tmp = local.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._get_file(key, tmp)
                self.counters.add("index_downloads")
                os.replace(tmp, local)
            except OSError as e:
                raise PackIndexUnusable(f"cannot keep the pack index in {self._dir}: {e.strerror}") from None
            finally:
                tmp.unlink(missing_ok=True)  # a part downloaded or written (gone once replaced)
        try:
            return PackIndex(local)
        except PackIndexUnusable:
            local.unlink(missing_ok=True)  # damaged on disk: the next try downloads it again
            raise

    def _replace(self, prefix: str, state: _Prefix | None) -> None:
        with self._lock:
            old = self._prefixes.pop(prefix, None)
            if state is not None:
                self._prefixes[prefix] = state
            self._packed = tuple(sorted((p for p, s in self._prefixes.items() if s.index),
                                        key=len, reverse=True))
            if old is not None and (state is None or state.index is not old.index):
                for d in [d for d in self._dirs if d.startswith(prefix)]:
                    self._preloaded -= len(self._dirs.pop(d))
        if old is not None and old.index is not None and (state is None or state.index is not old.index):
            old.index.close()
            old.index.path.unlink(missing_ok=True)  # a newer version replaced it

    def covers(self, key: str) -> bool:
        """Cheap, on the trio thread: may `key` be packed? (Then ask `source`, in a thread.)"""
        return any(key.startswith(p) for p in self._packed)

    def source(self, key: str, etag: str) -> PackedSource | None:
        """Blocking (SQLite): the pack range holding this version of `key`, or None."""
        for prefix in self._packed:
            if not key.startswith(prefix):
                continue
            with self._lock:
                state = self._prefixes.get(prefix)
            if state is None or state.index is None:
                continue
            try:
                entry = state.index.lookup(key[len(prefix):])
            except PackIndexUnusable as e:  # replaced by a newer version meanwhile
                log.debug("event=pack_lookup_failed key=%r error=%r", key, str(e))
                return None
            return self._packed_source(entry, etag)
        return None

    def source_now(self, key: str, etag: str):
        """On the trio thread: `source` from the lookups made when the file's directory was
        listed; UNKNOWN if it was not (then ask `source`, in a worker thread)."""
        with self._lock:
            found = self._dirs.get(key[:key.rfind("/") + 1])
        if found is None:
            return UNKNOWN
        return self._packed_source(found.get(key), etag)

    def _packed_source(self, entry: Entry | None, etag: str) -> PackedSource | None:
        if entry is None:
            return None
        if entry.etag != etag:
            self.counters.add("stale_bypassed")
            return None
        self.counters.add("packed_opens")
        p = entry.pack
        return PackedSource(ObjectVersion(self.bucket, p.key, p.etag, p.size), entry.offset, entry.size)

    # --- the index as a source of listings and lookups ---------------------------------------

    def _covering(self, prefix: str) -> tuple[str, PackIndex] | None:
        """The longest packed prefix at or above `prefix`, and its index."""
        for packed in self._packed:
            if prefix.startswith(packed):
                with self._lock:
                    state = self._prefixes.get(packed)
                if state is not None and state.index is not None:
                    return packed, state.index
        return None

    def _preload(self, prefix: str, files: list | None = None) -> None:
        """Worker thread: the packed files directly under `prefix`, for opens (`source_now`)."""
        with self._lock:
            if prefix in self._dirs:
                return  # looked up with this index already (a new index drops them)
        covering = self._covering(prefix)
        if covering is None:
            return
        packed, index = covering
        try:
            if files is None:
                files, _ = index.directory(prefix[len(packed):])
        except PackIndexUnusable as e:  # replaced by a newer version meanwhile
            log.debug("event=pack_preload_failed prefix=%r error=%r", prefix, str(e))
            return
        found = {packed + f.path: f for f in files if isinstance(f, Entry)}
        if len(found) > _PRELOADED_FILES:
            return  # a huge directory's opens look their file up one by one instead
        with self._lock:
            if self._covering_now(prefix) is not index:
                return  # replaced meanwhile
            self._dirs[prefix] = found
            self._preloaded += len(found)
            while self._preloaded > _PRELOADED_FILES and len(self._dirs) > 1:
                self._preloaded -= len(self._dirs.popitem(last=False)[1])

    def _covering_now(self, prefix: str) -> PackIndex | None:
        """Under the lock: the index `_covering` would answer."""
        for packed in self._packed:
            if prefix.startswith(packed):
                return self._prefixes[packed].index
        return None

    def _probe(self, prefixes: list[str]) -> None:
        """Look for the pointer of each prefix not known to be packed, longest first, once a
        listing TTL; stop at the first found. One GET each (a 404 when not packed)."""
        now = self._clock()
        for prefix in prefixes:
            with self._lock:
                known = prefix in self._packed
                recent = now - self._probed.get(prefix, -self._ttl) < self._ttl
            if known or recent:
                if known:
                    self._check(prefix, True)  # its pointer once a TTL, as any packed prefix
                    return
                continue
            self._probed[prefix] = now
            self.counters.add("pointer_probes")
            self._check(prefix, True)
            if prefix in self._packed:
                return

    def list_dir(self, list_s3: Callable[..., Listing], **kwargs) -> Callable[[str], Listing]:
        """The namespace's way to list a directory: from the index when `listing` can, else S3."""
        def list_dir(prefix: str) -> Listing:
            listing = self.listing(prefix)
            return listing if listing is not None else list_s3(prefix, **kwargs)
        return list_dir

    def listing(self, prefix: str) -> Listing | None:
        """Worker thread, with --listing-from-index: `prefix` listed from the index of the
        packed prefix above it, with no LIST; None when none covers it (list S3)."""
        if not self._from_index:
            return None
        if prefix == self._root:
            self._probe([prefix, *_ancestors(prefix)])
        covering = self._covering(prefix)
        if covering is not None:
            self._check(covering[0], True)  # its pointer once a TTL: a new index is seen
            covering = self._covering(prefix)
        if covering is None:
            return None
        packed, index = covering
        if not index.lists_all:
            self.counters.add("index_listings_refused")  # an older index lists packed files only
            return None
        try:
            files, dirs = index.directory(prefix[len(packed):])
        except PackIndexUnusable as e:
            log.debug("event=index_listing_failed prefix=%r error=%r", prefix, str(e))
            return None
        self.counters.add("index_listings")
        self._preload(prefix, files)
        subdirs = [f"{prefix}{d}/" for d in dirs if prefix != packed or d != RESERVED]
        if prefix == packed:
            subdirs.append(reserved_prefix(prefix))  # the namespace hides it, and knows it is packed
        return Listing(subdirs, [ListedObject(packed + f.path, f.size, f.mtime_ns, f.etag) for f in files])

    def pack_failed(self, key: str) -> None:
        """A pack could not be read (deleted, replaced): look at the pointer again next listing."""
        self.counters.add("pack_read_failures")
        with self._lock:
            for prefix, state in self._prefixes.items():
                if key.startswith(prefix):
                    state.checked_at = -self._ttl

    def gauges(self) -> dict[str, int]:
        return {"packs.indexes": len(self._packed), "packs.preloaded_files": self._preloaded}


def _ancestors(prefix: str) -> list[str]:
    """"a/b/c/" -> ["a/b/", "a/", ""]: the prefixes above a mount's root, longest first."""
    parts = prefix.split("/")[:-1]
    return ["/".join(parts[:i]) + "/" if i else "" for i in range(len(parts) - 1, -1, -1)]
