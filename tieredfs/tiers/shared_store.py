"""The shared tier's blocking operations on one namespace: read and verify a block,
publish blocks, take and drop single-flight leases, append to this node's usage journal.

Worker threads only (any call may hang on a dead NFS server); shared.py bounds them.
Expected conditions never raise from get(): a missing or bad block is a miss. OSErrors of
the directory itself (EROFS, ENOSPC, ESTALE, EIO...) do raise: the caller counts them and
opens its circuit breaker.
"""

import errno
import logging
import os
import threading
import time
from pathlib import Path

from ..blocks import BlockRef
from ..stats import Counters
from .shared_format import (BadBlock, Layout, Perms, create_lease, decode, encode_header, lease_expiry,
                            node_name, read_text, write_atomic)

log = logging.getLogger(__name__)

_MISSING = (errno.ENOENT, errno.ENOTDIR)


class Journal:
    """This node's append-only record of what it published and read, one file per hour so
    the collector can delete old ones whole. Lines: `P <id> <bytes> <time>` (published),
    `H <id> <time>` (read). Written before the renames it describes (see publish)."""

    def __init__(self, layout: Layout, perms: Perms, node: str):
        self.layout, self.perms, self.node = layout, perms, node
        self._hits: dict[str, float] = {}
        self._lock = threading.Lock()

    def path(self, now: float) -> Path:
        return self.layout.journal / f"{self.node}.{time.strftime('%Y%m%d%H', time.gmtime(now))}"

    def note_hit(self, block_id: str) -> None:
        with self._lock:
            if len(self._hits) < 65536:  # bounded; a lost hit only ages a block sooner
                self._hits[block_id] = time.time()

    def append(self, published: list[tuple[str, int]]) -> None:
        now = time.time()
        with self._lock:
            hits, self._hits = self._hits, {}
        lines = [f"P {i} {n} {now:.0f}\n" for i, n in published]
        lines += [f"H {i} {t:.0f}\n" for i, t in hits.items()]
        if not lines:
            return
        fd = os.open(self.path(now), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size == 0:
                self.perms.apply(fd)
            os.write(fd, "".join(lines).encode())
        finally:
            os.close(fd)


class SharedStore:
    def __init__(self, layout: Layout, perms: Perms, counters: Counters, lease_ttl: float):
        self.layout = layout
        self.perms = perms
        self.counters = counters
        self.lease_ttl = lease_ttl
        self.node = node_name()
        self.journal = Journal(layout, perms, self.node)
        self._said: set[str] = set()

    # --- reading ---------------------------------------------------------------------

    def get(self, ref: BlockRef) -> bytes | None:
        path = self.layout.block(ref.id)
        try:
            with open(path, "rb", buffering=0) as f:
                raw = f.read()
        except OSError as e:
            if e.errno in _MISSING:
                return None
            raise
        try:
            _, data = decode(raw, ref)
        except BadBlock as e:
            self._bad(path, ref.id, e)
            return None
        self.journal.note_hit(ref.id)
        return data

    def _bad(self, path: Path, block_id: str, e: BadBlock) -> None:
        self.counters.add("corrupt")
        self.counters.add(f"corrupt_{e.kind}")
        if e.kind not in self._said:
            self._said.add(e.kind)
            log.warning("event=shared_block_bad kind=%s block=%s detail=%r action=refetching "
                        "(said once per kind)", e.kind, block_id, str(e))
        if e.kind != "stale":  # another format's file is another tieredfs version's to keep
            try:
                os.unlink(path)
            except OSError:
                pass

    # --- publishing ------------------------------------------------------------------

    def new_blocks(self, items: list[tuple[BlockRef, bytes]]) -> list[tuple[BlockRef, bytes]]:
        return [(ref, data) for ref, data in items if not self.layout.block(ref.id).exists()]

    def publish(self, todo: list[tuple[BlockRef, bytes]], journaled: bool = False) -> int:
        """Write new blocks (from new_blocks); returns how many were published. Their journal
        lines go before the renames (unless `journaled` already): a crash between the two
        over-counts usage (the collector then finds no file, which is harmless); the other
        order could hide bytes from the quota."""
        if todo and not journaled:
            self.journal.append([(ref.id, self.stored_size(ref, data)) for ref, data in todo])
        done = 0
        for ref, data in todo:
            path = self.layout.block(ref.id)
            try:
                write_atomic(path, data, self.perms, parts=(encode_header(ref, data),))
            except FileNotFoundError:
                self.perms.makedirs(path.parent, self.layout.root)
                write_atomic(path, data, self.perms, parts=(encode_header(ref, data),))
            done += 1
        self.journal.append([])  # hits read meanwhile
        return done

    @staticmethod
    def stored_size(ref: BlockRef, data) -> int:
        return len(encode_header(ref, b"")) + len(data)

    # --- leases (cluster-wide single-flight, best effort) -----------------------------

    def take_lease(self, ref: BlockRef) -> bool:
        """True: this node may fetch the block (it holds the lease, or a dead one was
        taken over). False: a live lease of another node; wait for its publish."""
        path = self.layout.lease(ref.id)
        for _ in range(2):
            try:
                if create_lease(path, self.node, self.lease_ttl, self.perms):
                    return True
            except FileNotFoundError:
                self.perms.makedirs(path.parent, self.layout.root)
                continue
            if self.lease_alive(ref):
                return False
            self.counters.add("lease_takeovers")
            self.drop_lease(ref)
        return True  # lost a race twice: fetch anyway (best effort, never a wait)

    def lease_alive(self, ref: BlockRef) -> bool:
        """A lease file exists and has not expired."""
        path = self.layout.lease(ref.id)
        expiry = lease_expiry(read_text(path), path, self.lease_ttl)
        return expiry is not None and time.time() < expiry

    def drop_lease(self, ref: BlockRef) -> None:
        try:
            os.unlink(self.layout.lease(ref.id))
        except FileNotFoundError:
            pass

    def drop_leases(self, refs: list[BlockRef]) -> None:
        for ref in refs:
            self.drop_lease(ref)

    def poll(self, ref: BlockRef) -> bytes | str:
        """For a node waiting on another's lease: the block if it is there now, else
        'wait' while the lease lives, else 'fetch' (the holder gave up or died)."""
        data = self.get(ref)
        if data is not None:
            return data
        return "wait" if self.lease_alive(ref) else "fetch"

    def prepare(self) -> None:
        self.layout.create(self.perms)

    def flush_journal(self) -> None:
        self.journal.append([])
