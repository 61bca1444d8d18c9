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

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import BackendUnavailable, ObjectMissing
from .packindex import RESERVED
from .tiers.s3 import Listing

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
    lock: threading.Lock = field(default_factory=threading.Lock)
    order: list[int] | None = None  # children's inodes in name order, built when first asked
    position: dict[int, int] = field(default_factory=dict)


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
    def __init__(self, root_prefix: str, list_dir: Callable[[str], Listing], ttl: float,
                 mount_time_ns: int, clock: Callable[[], float] = time.monotonic,
                 refresh_dir: Callable[[str], Listing] | None = None,
                 on_listed: Callable[[str, bool], None] | None = None):
        self._list_dir = list_dir
        self._on_listed = on_listed  # (prefix, shows the packs' reserved dir): docs/packs.md
        self._refresh_dir = refresh_dir or list_dir
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[int, Node] = {ROOT_INO: Node(ROOT_INO, ROOT_INO, b"", True, root_prefix,
                                                       mtime_ns=mount_time_ns)}
        self._dirs: dict[int, _Dir] = {ROOT_INO: _Dir()}
        self._next_ino = ROOT_INO + 1
        self._mount_time_ns = mount_time_ns
        self._skipped: set[str] = set()

    @property
    def ttl(self) -> float:
        return self._ttl

    @ttl.setter
    def ttl(self, seconds: float) -> None:  # a SIGHUP's new list-ttl
        self._ttl = seconds

    # --- queries (blocking: may list S3) -------------------------------------------

    def node(self, ino: int) -> Node:
        with self._lock:
            try:
                return self._nodes[ino]
            except KeyError:
                raise ObjectMissing(f"inode {ino} is unknown") from None

    def lookup(self, parent: int, name: bytes) -> Node:
        """The entry, handed to the kernel: it holds a reference until it forgets it."""
        d = self._fresh_dir(parent)
        with self._lock:
            ino = d.children.get(name)
            if ino is None:
                raise ObjectMissing(f"no entry {name!r}")
            node = self._nodes[ino]
            node.lookups += 1
            return node

    def children(self, ino: int) -> list[Node]:
        d = self._fresh_dir(ino)
        with self._lock:
            return [self._nodes[i] for _, i in sorted(d.children.items())]

    def next_siblings(self, ino: int, count: int) -> tuple[int, list[Node]]:
        """(position of `ino` in its directory's name order, the next `count` entries).

        From the listing already held: never lists S3, so it is cheap enough for open().
        """
        with self._lock:
            node = self._nodes.get(ino)
            d = self._dirs.get(node.parent) if node is not None else None
            if d is None or node.ino == ROOT_INO:
                return -1, []
            if d.order is None:
                d.order = [i for _, i in sorted(d.children.items())]
                d.position = {i: n for n, i in enumerate(d.order)}
            pos = d.position.get(ino, -1)
            if pos < 0:
                return -1, []
            return pos, [self._nodes[i] for i in d.order[pos + 1:pos + 1 + count]]

    # --- the kernel's references ----------------------------------------------------------

    def remember(self, node: Node) -> None:
        """The kernel took a reference other than through lookup (a readdirplus entry)."""
        with self._lock:
            node.lookups += 1
            # A snapshot taken at opendir may hold a name freed since: it is known again.
            self._nodes.setdefault(node.ino, node)

    def forget(self, inode_counts) -> list[int]:
        """The kernel dropped `count` references to each inode. Returns the inodes it no
        longer knows; what nothing else needs is freed."""
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

    def _unreferenced(self, node: Node) -> None:
        """A node the kernel no longer knows. A directory's listing goes (the kernel forgot
        everything below it); the node itself goes unless a current listing names it."""
        if node.is_dir and self._drop_listing(node.ino):
            return
        parent = self._dirs.get(node.parent)
        if parent is None or parent.children.get(node.name) != node.ino:
            self._free(node)

    def _drop_listing(self, ino: int) -> bool:
        """Free a directory's listing and all below it; True if some name below is still
        held by the kernel (it should not be: a child pins its parent), and so kept."""
        d = self._dirs[ino]
        held = {}
        for identity, child_ino in d.known.items():
            child = self._nodes.get(child_ino)
            if child is None:
                continue
            if child.lookups or (child.is_dir and self._drop_listing(child_ino)):
                held[identity] = child_ino
            else:
                self._nodes.pop(child_ino, None)
                self._dirs.pop(child_ino, None)
        d.children, d.known, d.order, d.position, d.listed_at = {}, held, None, {}, None
        return bool(held)

    def _free(self, node: Node) -> None:
        self._nodes.pop(node.ino, None)
        self._dirs.pop(node.ino, None)
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
            d = self._dirs.get(ino if node is None or node.is_dir else node.parent)
            if d is not None:
                d.listed_at = None

    # --- listing -------------------------------------------------------------------------

    def _fresh_dir(self, ino: int) -> _Dir:
        node = self.node(ino)
        if not node.is_dir:
            raise NotADirectoryError(node.name)
        d = self._dirs[ino]
        if self._is_fresh(d):
            return d
        with d.lock:  # one listing per directory at a time; others wait for its result
            if not self._is_fresh(d):
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
                self._apply(node, listing)
                d.listed_at = self._clock()
        return d

    def _is_fresh(self, d: _Dir) -> bool:
        return d.listed_at is not None and self._clock() - d.listed_at < self._ttl

    def _apply(self, parent: Node, listing: Listing) -> None:
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
        with self._lock:
            self._replace_children(parent.ino, entries)

    def _replace_children(self, parent: int, entries: dict) -> None:
        d = self._dirs.get(parent)
        if d is None:
            return  # freed meanwhile: the kernel forgot this directory
        children = {}
        for name, (is_dir, key, size, mtime_ns, etag) in entries.items():
            # A new version is a new inode, as a file renamed over another: the kernel keeps
            # the old size for files still open on the old version instead of cutting them.
            ino = d.known.get((name, is_dir, etag))
            if ino is None:
                node = Node(self._next_ino, parent, name, is_dir, key)
                self._next_ino += 1
                self._nodes[node.ino] = node
                d.known[(name, is_dir, etag)] = node.ino
                if is_dir:
                    self._dirs[node.ino] = _Dir()
            else:
                node = self._nodes[ino]
            node.size, node.mtime_ns, node.etag = size, mtime_ns, etag
            children[name] = node.ino
        gone = set(d.children.values()) - set(children.values())
        d.children = children
        d.order = None
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
