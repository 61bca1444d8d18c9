"""The mount's side of packs: which listed prefixes are packed, and where a file's bytes are.

A directory whose listing shows the reserved `.tieredfs/` is a packed prefix. Its pointer is
read (one GET) when the listing is, at most once per listing TTL, and the index version it
names is downloaded once into the cache dir (versions are immutable: a restart reuses it).
A file is served from a pack only while the ETag its listing shows is the one packed: a
changed source object bypasses the pack, so a stale pack never serves old bytes.

Failures here never fail a listing or a read: without an index, files are read from their
own objects, as if nothing were packed.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from .blocks import ObjectVersion
from .errors import ObjectMissing, PackIndexUnusable, TieredError
from .packindex import POINTER, PackIndex, index_name_of, reserved_prefix
from .stats import Counters

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackedSource:
    """Where a packed file's bytes are: [offset, offset+size) of `pack`."""

    pack: ObjectVersion
    offset: int
    size: int


@dataclass
class _Prefix:
    checked_at: float
    pointer_etag: str = ""
    index: PackIndex | None = None


class PackRegistry:
    def __init__(self, bucket: str, get_object: Callable[[str], tuple[bytes, str]], index_dir: Path,
                 ttl: float, counters: Counters, clock: Callable[[], float] = time.monotonic):
        self.bucket = bucket
        self._get = get_object
        self._dir = index_dir
        self._ttl = ttl
        self._clock = clock
        self.counters = counters
        self._lock = threading.Lock()
        self._prefixes: dict[str, _Prefix] = {}
        self._packed: tuple[str, ...] = ()  # prefixes with an index, longest first

    def listed(self, prefix: str, packed: bool) -> None:
        """A listing of `prefix` was taken (a worker thread); `packed`: it shows `.tieredfs/`."""
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
            data, _ = self._get(key)
            self.counters.add("index_downloads")
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp = local.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, local)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise PackIndexUnusable(f"cannot keep the pack index in {self._dir}: {e.strerror}") from None
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
            if entry is None:
                return None
            if entry.etag != etag:
                self.counters.add("stale_bypassed")
                return None
            self.counters.add("packed_opens")
            p = entry.pack
            return PackedSource(ObjectVersion(self.bucket, p.key, p.etag, p.size), entry.offset, entry.size)
        return None

    def pack_failed(self, key: str) -> None:
        """A pack could not be read (deleted, replaced): look at the pointer again next listing."""
        self.counters.add("pack_read_failures")
        with self._lock:
            for prefix, state in self._prefixes.items():
                if key.startswith(prefix):
                    state.checked_at = -self._ttl

    def gauges(self) -> dict[str, int]:
        return {"packs.indexes": len(self._packed)}
