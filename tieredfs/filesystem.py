"""What the mount does, independent of FUSE: names, handles, reads, stats.

fuse_ops.py only translates between this and pyfuse3. Names already listed are
answered on the trio thread; blocking namespace work (listing S3, freeing a big
forgotten listing) runs in worker threads.
"""

import itertools
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import trio

from .blocks import ObjectVersion
from .errors import ObjectChanged, ObjectMissing, ReadOnly, TieredError, UnknownHandle
from .namespace import ROOT_INO, Namespace, Node
from .packs import UNKNOWN, PackRegistry
from .reader import OpenFile, Reader
from .stats import Registry

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WALKS_REMEMBERED = 1024  # directories whose last opened position is kept
STALE_GRACE = 2.0  # seconds a request waits for a directory's refresh before a stale answer


@dataclass
class Opened:
    fh: int
    keep_cache: bool


class FileSystem:
    def __init__(self, namespace: Namespace, reader: Reader, bucket: str,
                 list_limiter: trio.CapacityLimiter, stats: Callable[[], dict], dir_prefetch: int = 0,
                 tree_keys: int = 0,
                 packs: PackRegistry | None = None, pack_readahead: int = 0,
                 meter: "ReadMeter | None" = None):
        self.meter = meter or ReadMeter()
        self.namespace = namespace
        self.packs = packs
        self._pack_readahead = pack_readahead
        self.reader = reader
        self.bucket = bucket
        self._dir_prefetch = dir_prefetch
        # A directory with subdirectories that the kernel looks into is listed flat, all depths
        # at once, if it holds at most this many keys: its subdirectories then need no LIST
        # each (Namespace.list_tree). From the index (--listing-from-index) no LIST is made.
        self._tree_keys = tree_keys
        self._walks: OrderedDict[int, int] = OrderedDict()  # directory -> last opened position
        self._list_limiter = list_limiter
        self._stats = stats
        self._fh = itertools.count(1)
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, list[Node]] = {}
        self._etag_at_last_open: dict[int, str] = {}
        self._nursery: trio.Nursery | None = None
        self._refreshes: dict[int, trio.Event] = {}  # directory -> its refresh under way
        self._kept: set[int] = set()  # directories answered from a kept listing until refreshed
        self._reaping = False
        self._trees: OrderedDict[int, None] = OrderedDict()  # directories listed flat, or tried

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (freeing forgotten listings) runs in the mount's nursery."""
        self._nursery = nursery

    async def _ns(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._list_limiter)

    # --- names -----------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Node:
        # A listed name is answered here, on the trio thread: only a directory that must be
        # listed first takes a worker thread, so lookups never queue behind S3 listings.
        node = await self._listed(parent, self.namespace.lookup, parent, name)
        self._list_tree_ahead(parent)
        return node

    def _list_tree_ahead(self, ino: int) -> None:
        """The kernel looks into a directory: if it has subdirectories, list the whole tree
        below it flat in the background (if small enough), before the kernel asks into them."""
        if self._nursery is None or not self._tree_keys or ino in self._trees:
            return
        entries = self.namespace.children(ino, wait=False, stale=True)
        if entries is None:
            return
        self._remember_tree(ino)
        # More entries than keys allowed: the tree is too big for one flat listing anyway.
        if len(entries) <= self._tree_keys and any(n.is_dir for n in entries):
            self._nursery.start_soon(self._list_tree, ino)

    async def _list_tree(self, ino: int) -> None:
        try:
            covered = await self._ns(self.namespace.list_tree, ino, self._tree_keys)
        except (TieredError, NotADirectoryError) as e:
            # Each directory is listed on its own when asked, and a failure is seen then.
            log.debug("event=tree_listing_failed ino=%d error=%r", ino, str(e))
            return
        for below in covered:
            self._remember_tree(below)  # listed by this one: not again, a level down

    def _remember_tree(self, ino: int) -> None:
        self._trees[ino] = None
        if len(self._trees) > _WALKS_REMEMBERED:
            self._trees.popitem(last=False)

    async def _listed(self, ino: int, query, *args):
        """query(*args) answered from directory `ino`'s listing, listing it if need be.

        Past the TTL, one refresh runs in the background and the request waits for it at
        most STALE_GRACE seconds: a small directory is relisted well within that and the
        answer is fresh; a big one (100,000 names take seconds) answers from the last
        listing meanwhile. A name the last listing lacks waits for the refresh. A directory
        not listed yet by this daemon may have a listing kept on disk (Namespace.restore)."""
        try:
            found = query(*args, wait=False)
        except ObjectMissing:
            if ino not in self._refreshes:
                raise
            found = None  # the last listing lacks it, and a refresh is under way
        if found is not None:
            return found
        if self._nursery is None:
            return await self._ns(query, *args)
        if not self.namespace.listed(ino):
            if not await self._ns(self.namespace.restore, ino):
                return await self._ns(query, *args)  # nothing to serve meanwhile: wait for S3
            # A listing kept from before (a restart): its answers come at once, also when it
            # is older than the TTL, while one refresh runs (docs/namespace.md).
            if self.namespace.fresh(ino):
                found = query(*args, wait=False)
                return found if found is not None else await self._ns(query, *args)
            self._kept.add(ino)
        # A kept listing answers at once until its refresh is done.
        grace = 0.0 if ino in self._kept else STALE_GRACE
        done = self._refreshes.get(ino)
        if done is None:
            done = self._refreshes[ino] = trio.Event()
            self._nursery.start_soon(self._refresh, ino, done)
        if grace:
            with trio.move_on_after(grace):
                await done.wait()
        try:
            found = query(*args, wait=False, stale=True)
        except ObjectMissing:
            if done.is_set():
                raise
            await done.wait()
            found = query(*args, wait=False, stale=True)
        # None only if the listing went meanwhile (the kernel forgot the directory).
        return found if found is not None else await self._ns(query, *args)

    async def _refresh(self, ino: int, done: trio.Event) -> None:
        try:
            await self._ns(self.namespace.children, ino)
        except (TieredError, NotADirectoryError) as e:
            # The requests waiting answer from the last listing, or see the error themselves.
            log.debug("event=refresh_failed ino=%d error=%r", ino, str(e))
        finally:
            del self._refreshes[ino]
            self._kept.discard(ino)
            done.set()

    async def getattr(self, ino: int) -> Node:
        return self.namespace.node(ino)

    async def opendir(self, ino: int) -> int:
        """Snapshot the entries so readdir offsets stay valid while S3 changes."""
        entries = await self._listed(ino, self.namespace.children, ino)
        fh = next(self._fh)
        self._dirs[fh] = entries
        return fh

    def readdir(self, fh: int, start: int, emit: Callable[[Node, int], bool]) -> None:
        """emit(entry, offset of the next one) from `start` on, until it returns False (the
        kernel's page is full: a big directory takes many calls). Each entry emitted is one
        more reference the kernel holds (readdirplus)."""
        entries = self._dirs.get(fh)
        if entries is None:
            raise UnknownHandle(f"directory handle {fh} is not open")
        for i in range(max(0, start), len(entries)):
            if not emit(entries[i], i + 1):
                return
            self.namespace.remember(entries[i])

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    def forget(self, inode_counts) -> None:
        for ino in self.namespace.forget(inode_counts):
            # The kernel dropped the inode, and its pages with it.
            self._etag_at_last_open.pop(ino, None)
        if self.namespace.unreaped() and not self._reaping:
            if self._nursery is None:
                self.namespace.reap()
            else:
                self._reaping = True
                self._nursery.start_soon(self._reap)

    async def _reap(self) -> None:
        """Free forgotten listings' names in a worker thread: a big directory's are many."""
        try:
            while self.namespace.unreaped():  # also what a forget added while this ran
                await self._ns(self.namespace.reap)
        finally:
            self._reaping = False

    # --- files ---------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> Opened:
        if flags & _WRITE_FLAGS:
            raise ReadOnly("tieredfs is read-only")
        node = self.namespace.node(ino)
        if node.is_dir:
            raise IsADirectoryError(node.name)
        f = await self._open_file(node)
        self._files[f.fh] = f
        # The kernel may keep this inode's pages only if they are of the same version.
        keep = self._etag_at_last_open.get(ino) == node.etag
        self._etag_at_last_open[ino] = node.etag
        await self.reader.opened(f)
        if f.own is not None:
            self.reader.prefetch_range(f.obj, f.base, f.base + f.size + self._pack_readahead)
        elif self._dir_prefetch and not (self.packs and self.packs.covers(node.key)):
            # (In a packed prefix the walk's next files come with the pack's blocks.)
            self._follow_walk(node)
        return Opened(f.fh, keep)

    async def _open_file(self, node: Node) -> OpenFile:
        """The file's own object, or the range of a pack that holds this version of it."""
        own = ObjectVersion(self.bucket, node.key, node.etag, node.size)
        if self.packs is not None and node.size and self.packs.covers(node.key):
            src = self.packs.source_now(node.key, node.etag)  # looked up when listed
            if src is UNKNOWN:
                src = await self._ns(self.packs.source, node.key, node.etag)
            if src is not None:
                return OpenFile(next(self._fh), node.ino, src.pack, base=src.offset, length=src.size,
                                own=own)
        return OpenFile(next(self._fh), node.ino, own)

    def _follow_walk(self, node: Node) -> None:
        """Opening a directory's files in name order: fetch the next ones before they are asked.
        A walk is taken to begin at a directory's first file: waiting for the second one to
        confirm it made that second file a cold GET in every directory (169 of 2,000 files in
        the bench's walk, each a full S3 round trip for its reader)."""
        pos, after = self.namespace.next_siblings(node.ino, self._dir_prefetch)
        last = self._walks.pop(node.parent, None)
        # The furthest file opened: walkers side by side open in any order, and one behind
        # must not take the walk back (the next opens were then more than two past it, and
        # the walk stopped fetching ahead). The first file begins a walk anew; in a directory
        # walked before, the walk fetches ahead from the second open on (as it always did: a
        # re-walk's first files are often opened side by side, and a batch then fetched them
        # a second time).
        self._walks[node.parent] = pos if pos == 0 or last is None else max(pos, last)
        if len(self._walks) > _WALKS_REMEMBERED:
            self._walks.popitem(last=False)
        if (pos == 0 and last is None) or (last is not None and 0 < pos - last <= 2):
            self.reader.prefetch_objects([ObjectVersion(self.bucket, n.key, n.etag, n.size)
                                          for n in after if not n.is_dir])

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise UnknownHandle(f"file handle {fh} is not open")
        start = time.perf_counter()
        try:
            data = await self.reader.read(f, offset, size)
            self.meter.done(len(data), time.perf_counter() - start)
            return data
        except (ObjectMissing, ObjectChanged):
            if f.own is not None:
                return await self._read_unpacked(f, offset, size)
            # S3 moved on: the next open should see the current listing.
            self.namespace.mark_stale(f.ino)
            self._etag_at_last_open.pop(f.ino, None)
            raise

    async def _read_unpacked(self, f: OpenFile, offset: int, size: int) -> bytes:
        """The pack went away or was replaced: this file's own object has the same bytes."""
        self.packs.pack_failed(f.obj.key)
        self.reader.released(f)
        f.unpack()
        await self.reader.opened(f)
        return await self.read(f.fh, offset, size)

    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            self.reader.released(f)

    def stats(self) -> dict[str, int]:
        snap = self._stats()
        snap["fs.open_files"] = len(self._files)
        return snap

    def stats_json(self) -> bytes:
        return json.dumps(self.stats(), sort_keys=True).encode()

    def mount_json(self) -> bytes:
        """What `tieredfs warmup --replay` checks a replay file against."""
        return json.dumps({"bucket": self.bucket, "prefix": self.namespace.node(ROOT_INO).key,
                           "block_size": self.reader.block_size}).encode()

    def etag(self, ino: int) -> bytes:
        """The version a file's reads are served from (warmup --replay checks it)."""
        node = self.namespace.node(ino)
        if node.is_dir:
            raise IsADirectoryError(node.name)
        return node.etag.encode()


class ReadMeter:
    """FUSE reads counted and timed (stats.py's counters and histogram; none in unit tests)."""

    def __init__(self, counters=None, latency=None):
        registry = Registry()
        self.counters = counters or registry.counters("fs")
        self.latency = latency or registry.histogram("fuse.read")

    def done(self, nbytes: int, seconds: float) -> None:
        self.counters.add("reads")
        self.counters.add("read_bytes", nbytes)
        self.latency.observe(seconds)
