"""S3 keys under the mount prefix, seen as a directory tree.

Each directory is listed lazily (one delimited ListObjectsV2, all pages) the first
time it is needed and again once its listing is older than the TTL. A refresh makes
one attempt (`refresh_dir`); if it fails, the last listing stays in use and is retried
a few seconds later: an outage must neither hide files whose blocks are cached nor
hold their readers for a whole read deadline.

Inode numbers are stable for a (parent, name, kind, ETag) while the kernel holds the
inode, also across a deletion and re-creation; a new version is a new inode. Memory
follows the kernel: once it forgets a directory, that directory's listing and every name
under it are freed, and a name gone from S3 is freed once the kernel forgets it
(docs/namespace.md, "Memory").

Keys that cannot be a path are skipped with one log line each (docs/namespace.md):
empty components (`a//b`, `/a`), `.` and `..`, NUL, names over 255 bytes. When a key
is both a file and a prefix (`a` and `a/b`), the directory wins.
"""

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from .errors import BackendUnavailable, ObjectMissing
from .packindex import RESERVED
from .tiers.s3 import ListedObject, Listing

if TYPE_CHECKING:
    from .listings_store import ListingStore

log = logging.getLogger(__name__)

ROOT_INO = 1
NAME_MAX = 255
STALE_RETRY = 5.0  # seconds a listing that S3 failed to refresh is used before trying again


@dataclass(slots=True)  # one per name listed: a bucket may have millions
class Node:
    ino: int
    parent: int
    name: bytes
    is_dir: bool
    key: str  # object key for a file, prefix ending in "/" for a directory ("" for a bucket root)
    size: int = 0
    mtime_ns: int = 0
    etag: str = ""
    lookups: int = 0  # references the kernel holds (FUSE lookup count)


@dataclass
class _Dir:
    children: dict[bytes, int] = field(default_factory=dict)
    # Every (name, is_dir, ETag) ever listed here: a key deleted and re-created keeps its inode.
    known: dict[tuple[bytes, bool, str], int] = field(default_factory=dict)
    listed_at: float | None = None
    # Held by the one worker thread listing this directory, never by the trio thread.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Built with each listing, off the namespace lock, and replaced whole (never changed in
    # place): a readdir snapshot is this list, and open() finds its position in O(1).
    order: list[Node] = field(default_factory=list)
    position: dict[int, int] = field(default_factory=dict)
    epoch: int = 0  # bumped when the listing is dropped: a listing begun before is discarded


def unusable(component: str) -> str | None:
    """Why one key component cannot be a file name under the mount, or None if it can."""
    if component == "":
        return "empty path component (as in a//b or /a)"
    if component in (".", ".."):
        return f"{component!r} path component (it would name another directory)"
    if "\0" in component:
        return "NUL character in the name"
    try:
        size = len(component.encode("utf-8"))
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if size > NAME_MAX:
        return f"name of {size} bytes, over the {NAME_MAX}-byte limit"
    return None


class Namespace:
    """Blocking methods (`lookup`, `children` with wait=True, `reap`) may list S3 or do O(n)
    work and run in worker threads; the rest is quick and safe on the trio thread. The
    namespace lock is only ever held for a moment: listings are built outside it and
    swapped in."""

    def __init__(self, root_prefix: str, list_dir: Callable[[str], Listing], ttl: float,
                 mount_time_ns: int, clock: Callable[[], float] = time.monotonic,
                 refresh_dir: Callable[[str], Listing] | None = None,
                 on_listed: Callable[[str, bool], None] | None = None,
                 store: "ListingStore | None" = None,
                 list_tree: Callable[[str, int], list[ListedObject] | None] | None = None):
        self._list_dir = list_dir
        self._list_tree = list_tree  # every key under a prefix, if at most so many (or None)
        self._store = store  # listings kept across restarts (listings_store.py), or None
        self._on_listed = on_listed  # (prefix, shows the packs' reserved dir): docs/packs.md
        self._refresh_dir = refresh_dir or list_dir
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[int, Node] = {ROOT_INO: Node(ROOT_INO, ROOT_INO, b"", True, root_prefix,
                                                       mtime_ns=mount_time_ns)}
        self._dirs: dict[int, _Dir] = {ROOT_INO: _Dir()}
        self._inos = itertools.count(ROOT_INO + 1)  # next() is atomic: listings run in threads
        self._mount_time_ns = mount_time_ns
        self._skipped: set[str] = set()
        self._unreaped: list[_Dir] = []  # listings the kernel forgot, their names still to free

    @property
    def ttl(self) -> float:
        return self._ttl

    @ttl.setter
    def ttl(self, seconds: float) -> None:  # a SIGHUP's new list-ttl
        self._ttl = seconds

    # --- queries ----------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        with self._lock:
            try:
                return self._nodes[ino]
            except KeyError:
                raise ObjectMissing(f"inode {ino} is unknown") from None

    def lookup(self, parent: int, name: bytes, wait: bool = True, stale: bool = False) -> Node | None:
        """The entry, handed to the kernel: it holds a reference until it forgets it.
        With wait=False, None when answering needs S3 (a worker thread then asks again);
        stale=True takes a listing older than the TTL too."""
        d = self._fresh_dir(parent) if wait else self._usable_dir(parent, stale)
        if d is None:
            return None
        with self._lock:
            ino = d.children.get(name)
            if ino is None:
                raise ObjectMissing(f"no entry {name!r}")
            node = self._nodes[ino]
            node.lookups += 1
            return node

    def children(self, ino: int, wait: bool = True, stale: bool = False) -> list[Node] | None:
        """The entries in name order; the list is never changed afterwards (a snapshot).
        With wait=False, None when answering needs S3."""
        d = self._fresh_dir(ino) if wait else self._usable_dir(ino, stale)
        return None if d is None else d.order

    def next_siblings(self, ino: int, count: int) -> tuple[int, list[Node]]:
        """(position of `ino` in its directory's name order, the next `count` entries).

        From the listing already held: never lists S3, so it is cheap enough for open().
        """
        with self._lock:
            node = self._nodes.get(ino)
            d = self._dirs.get(node.parent) if node is not None else None
            if d is None or node.ino == ROOT_INO:
                return -1, []
            order, pos = d.order, d.position.get(ino, -1)
        if pos < 0:
            return -1, []
        return pos, order[pos + 1:pos + 1 + count]

    # --- the kernel's references ----------------------------------------------------------

    def remember(self, node: Node) -> None:
        """The kernel took a reference other than through lookup (a readdirplus entry)."""
        with self._lock:
            node.lookups += 1
            # A snapshot taken at opendir may hold a name freed since: it is known again.
            self._nodes.setdefault(node.ino, node)

    def forget(self, inode_counts) -> list[int]:
        """The kernel dropped `count` references to each inode. Returns the inodes it no
        longer knows; what nothing else needs is freed. A forgotten directory's listing is
        detached at once; the names under it are freed by `reap`, in a worker thread."""
        unknown = []
        with self._lock:
            for ino, count in inode_counts:
                node = self._nodes.get(ino)
                if node is None or ino == ROOT_INO or node.lookups == 0:
                    continue
                node.lookups = max(0, node.lookups - count)
                if node.lookups == 0:
                    unknown.append(ino)
                    self._unreferenced(node)
        return unknown

    def unreaped(self) -> bool:
        return bool(self._unreaped)

    def reap(self, chunk: int = 2000) -> None:
        """Worker thread: free the names of forgotten listings, a chunk per lock hold."""
        while True:
            with self._lock:
                if not self._unreaped:
                    return
                d = self._unreaped.pop()
                for _ in range(min(chunk, len(d.known))):
                    _, child_ino = d.known.popitem()
                    child = self._nodes.get(child_ino)
                    if child is None or child.lookups:
                        continue  # a name the kernel still holds stays until it forgets it
                    del self._nodes[child_ino]
                    sub = self._dirs.pop(child_ino, None)
                    if sub is not None:
                        self._detach(sub)
                if d.known:
                    self._unreaped.append(d)

    def _unreferenced(self, node: Node) -> None:
        """A node the kernel no longer knows. A directory's listing goes (the kernel forgot
        everything below it); the node itself goes unless a current listing names it."""
        if node.is_dir:
            d = self._dirs.get(node.ino)
            if d is not None and d.known:
                self._dirs[node.ino] = _Dir(epoch=d.epoch + 1)
                self._detach(d)
        parent = self._dirs.get(node.parent)
        if parent is None or parent.children.get(node.name) != node.ino:
            self._free(node)

    def _detach(self, d: _Dir) -> None:
        """O(1) under the lock: the listing is no longer used; `reap` frees its names."""
        d.epoch += 1
        d.listed_at = None
        d.children, d.order, d.position = {}, [], {}
        self._unreaped.append(d)

    def _free(self, node: Node) -> None:
        self._nodes.pop(node.ino, None)
        sub = self._dirs.pop(node.ino, None)
        if sub is not None and sub.known:
            self._detach(sub)
        parent = self._dirs.get(node.parent)
        identity = (node.name, node.is_dir, node.etag)
        if parent is not None and parent.known.get(identity) == node.ino:
            del parent.known[identity]

    def gauges(self) -> dict[str, int]:
        with self._lock:
            return {"namespace.nodes": len(self._nodes),
                    "namespace.listed_dirs": sum(d.listed_at is not None for d in self._dirs.values())}

    def mark_stale(self, ino: int) -> None:
        """Forget a directory's listing so the next lookup sees S3's current state."""
        with self._lock:
            node = self._nodes.get(ino)
            dir_ino = ino if node is None or node.is_dir else node.parent
            d, dir_node = self._dirs.get(dir_ino), self._nodes.get(dir_ino)
            if d is not None:
                if self._store is not None and dir_node is not None:
                    self._store.forget(dir_node.key)  # nor may the copy kept on disk answer
                d.listed_at = None

    # --- listing -------------------------------------------------------------------------

    def _dir(self, ino: int) -> _Dir:
        with self._lock:
            node = self._nodes.get(ino)
            if node is None:
                raise ObjectMissing(f"inode {ino} is unknown")
            if not node.is_dir:
                raise NotADirectoryError(node.name)
            return self._dirs[ino]

    def listed(self, ino: int) -> bool:
        """Whether a listing of this directory exists, fresh or not."""
        return self._dir(ino).listed_at is not None

    def fresh(self, ino: int) -> bool:
        return self._is_fresh(self._dir(ino))

    def restore(self, ino: int) -> bool:
        """Worker thread: give a directory without a listing the one kept on disk (by this
        daemon or one before it), as old as it is: fresh for the rest of its TTL, else stale,
        to be refreshed (docs/namespace.md, "Listings kept across restarts"). Whether the
        directory now has a listing."""
        if self._store is None:
            return False
        d = self._dir(ino)
        with d.lock:
            if d.listed_at is None:
                node = self.node(ino)
                epoch = d.epoch
                kept = self._store.load(node.key)
                if kept is None:
                    return False
                listing, age = kept
                # A clock set back since makes it look younger than it is: stale, to be sure.
                self._apply(node, d, epoch, listing, age if 0 <= age else self._ttl)
        return d.listed_at is not None

    def _usable_dir(self, ino: int, stale: bool = False) -> _Dir | None:
        """The listing if it may answer now: fresh, or stale while another request is
        listing the directory again (requests do not queue behind a big relisting), or
        stale when the caller says so."""
        d = self._dir(ino)
        if self._is_fresh(d) or (d.listed_at is not None and (stale or d.lock.locked())):
            return d
        return None

    def _fresh_dir(self, ino: int) -> _Dir:
        d = self._usable_dir(ino)
        if d is not None:
            return d
        d = self._dir(ino)
        with d.lock:  # one listing per directory at a time
            if not self._is_fresh(d):
                node = self.node(ino)
                epoch = d.epoch
                started = time.time()
                try:
                    listing = (self._list_dir if d.listed_at is None else self._refresh_dir)(node.key)
                except BackendUnavailable as e:
                    if d.listed_at is None:
                        raise
                    # S3 is unreachable: names we listed before still lead to cached blocks.
                    d.listed_at = self._clock() - self._ttl + min(self._ttl, STALE_RETRY)
                    log.warning("event=listing_failed prefix=%r error=%r action=serving_last_listing "
                                "retry_in=%.0fs", node.key, str(e), min(self._ttl, STALE_RETRY))
                    return d
                self._apply(node, d, epoch, listing)
                if self._store is not None:
                    self._store.save(node.key, listing, started)
        return d

    def list_tree(self, ino: int, max_keys: int) -> list[int]:
        """Worker thread: list every key under directory `ino` in one flat listing, if there
        are at most `max_keys` (a few LIST pages), and give each directory below it that has
        no listing yet the one a delimited LIST of it would have given. A walker of a tree
        then finds every directory listed, instead of waiting for one LIST per directory (184
        for the bench's 2,000 files). The directories below `ino` (each covered now), or []
        when the tree is bigger or cannot be listed flat here."""
        if self._list_tree is None:
            return []
        root = self.node(ino)
        started = time.time()
        objects = self._list_tree(root.key, max_keys)
        if objects is None:
            return []
        listings = _tree_listings(root.key, objects)
        covered, todo = [], [ino]
        while todo:
            for child in self.children(todo.pop(), wait=False, stale=True) or ():
                if not child.is_dir:
                    continue
                covered.append(child.ino)
                todo.append(child.ino)
                listing = listings.get(child.key)
                d = self._dir(child.ino)
                if listing is None or d.listed_at is not None or not d.lock.acquire(blocking=False):
                    continue  # listed already, or being listed by a request right now
                try:
                    if d.listed_at is None:
                        self._apply(child, d, d.epoch, listing)
                        if self._store is not None:
                            self._store.save(child.key, listing, started)
                finally:
                    d.lock.release()
        return covered

    def _is_fresh(self, d: _Dir) -> bool:
        return d.listed_at is not None and self._clock() - d.listed_at < self._ttl

    def _apply(self, parent: Node, d: _Dir, epoch: int, listing: Listing, age: float = 0.0) -> None:
        plen = len(parent.key)
        entries: dict[bytes, tuple[bool, str, int, int, str]] = {}
        packed = False
        for prefix in listing.prefixes:
            if prefix[plen:-1] == RESERVED:
                packed = True  # packs and their index: not files of the dataset
                continue
            name = self._checked(prefix[plen:-1], prefix, "; every key under this prefix is hidden")
            if name is not None:
                entries[name] = (True, prefix, 0, self._mount_time_ns, "")
        for obj in listing.objects:
            component = obj.key[plen:]
            if component == "":
                continue  # the directory marker of `parent` itself
            name = self._checked(component, obj.key, "")
            if name is None:
                continue
            if name in entries:
                self._skip(obj.key, "a directory of the same name hides it")
                continue
            entries[name] = (False, obj.key, obj.size, obj.mtime_ns, obj.etag)
        if self._on_listed is not None:
            self._on_listed(parent.key, packed)
        self._replace_children(parent.ino, d, epoch, entries, age)

    def _replace_children(self, parent: int, d: _Dir, epoch: int, entries: dict, age: float) -> None:
        """Build the new listing outside the namespace lock (O(n)); swap it in under the
        lock with work only for the names that came or went."""
        children: dict[bytes, int] = {}
        order: list[Node] = []
        for name in sorted(entries):
            is_dir, key, size, mtime_ns, etag = entries[name]
            # A new version is a new inode, as a file renamed over another: the kernel keeps
            # the old size for files still open on the old version instead of cutting them.
            ino = d.known.get((name, is_dir, etag))
            node = self._nodes.get(ino) if ino is not None else None
            if node is None:
                node = Node(next(self._inos), parent, name, is_dir, key)
            node.size, node.mtime_ns, node.etag = size, mtime_ns, etag
            children[name] = node.ino
            order.append(node)
        old = d.children
        came = [n for n in order if old.get(n.name) != n.ino]
        gone = [ino for name, ino in old.items() if children.get(name) != ino]
        position = {n.ino: i for i, n in enumerate(order)}
        with self._lock:
            if self._dirs.get(parent) is not d or d.epoch != epoch:
                return  # the kernel forgot this directory meanwhile: the listing is not kept
            for node in came:
                # New, or listed before and freed or about to be: known (again) either way.
                self._nodes.setdefault(node.ino, node)
                d.known[(node.name, node.is_dir, node.etag)] = node.ino
                if node.is_dir and node.ino not in self._dirs:
                    self._dirs[node.ino] = _Dir()
            d.children, d.order, d.position = children, order, position
            d.listed_at = self._clock() - age
            for ino in gone:
                node = self._nodes.get(ino)
                if node is not None and node.lookups == 0:
                    self._unreferenced(node)  # a deleted or replaced version nobody holds

    def _checked(self, component: str, key: str, consequence: str) -> bytes | None:
        problem = unusable(component)
        if problem is not None:
            self._skip(key, problem + consequence)
            return None
        return component.encode("utf-8")

    def _skip(self, key: str, why: str) -> None:
        if key not in self._skipped and len(self._skipped) < 100_000:
            self._skipped.add(key)
            log.warning("event=key_skipped key=%r reason=%r", key[:300], why)


def _tree_listings(root: str, objects: list[ListedObject]) -> dict[str, Listing]:
    """Each directory under `root` (a prefix ending in "/"), with the listing a delimited
    LIST of it gives: its objects and its subdirectories' prefixes."""
    listings: dict[str, Listing] = {}
    subdirs: dict[str, set[str]] = {}
    for obj in objects:
        rel = obj.key[len(root):]
        listings.setdefault(root + rel[:rel.rfind("/") + 1], Listing([], [])).objects.append(obj)
        start = 0
        while (slash := rel.find("/", start)) >= 0:
            subdirs.setdefault(root + rel[:start], set()).add(root + rel[:slash + 1])
            start = slash + 1
    for prefix, dirs in subdirs.items():
        listings.setdefault(prefix, Listing([], [])).prefixes.extend(sorted(dirs))
    return listings
