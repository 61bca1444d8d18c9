"""Tier 1's fills on disk: where each block goes, and a batch of blocks written by file and
offset, one descriptor per file and one system call per run of consecutive blocks
(tiers/local.py reserves the room and indexes what was written).

A block goes into its object version's file, at its offset in the object; a small whole
object is appended to a segment shared with others (Segments). Which place a block got is
in its index entry, and reads go there.
"""

import itertools
import threading
import uuid
from dataclasses import dataclass

from ..blocks import BlockRef
from ..memory import in_pages
from .blockfiles import BlockFiles

SEGMENT_OBJECT_MAX = 256 * 1024  # a whole object up to this size is appended to a segment
SEGMENT_BYTES = 64 << 20  # a segment takes objects until it reaches this size


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a block's bytes are: a file (32-hex name) and an offset in it."""

    id: str
    file: str
    start: int
    length: int
    shared: bool = False  # in a segment: other objects follow it in the file


class Segments:
    """Places for small whole objects, appended to shared files (segments) at page-aligned
    offsets (O_DIRECT), a new segment every SEGMENT_BYTES and at each start.

    Why: a file per object made the filesystem create an inode per small file read. On
    this VM's ext4 (no journal) that is a search past every inode freed in the last minutes:
    up to a third of the daemon's CPU in a cold walk of small files right after caches had
    been deleted (docs/performance-notes.md, round 6). A segment is one inode for thousands
    of objects, one descriptor for reading them, and its blocks are evicted as any others
    (a punched hole; the file goes with its last block)."""

    def __init__(self, limit: int = SEGMENT_BYTES):
        self.limit = limit
        self._lock = threading.Lock()  # the cache writers place their batches concurrently
        self._name = ""
        self._next = 0

    def place(self, refs: list[BlockRef]) -> list[Placed]:
        out = []
        with self._lock:
            for ref in refs:
                if not takes(ref):
                    out.append(Placed(ref.id, ref.file, ref.start, ref.length))
                    continue
                room = in_pages(ref.length)
                if not self._name or self._next + room > self.limit:
                    self._name, self._next = uuid.uuid4().hex, 0
                out.append(Placed(ref.id, self._name, self._next, ref.length, shared=True))
                self._next += room
        return out


def takes(ref: BlockRef) -> bool:
    """A small object's only block goes into a segment."""
    return ref.index == 0 and 0 < ref.length == ref.obj.size <= SEGMENT_OBJECT_MAX


def write_blocks(files: BlockFiles, todo: list[tuple[Placed, bytes]]) -> tuple[list, OSError | None]:
    """Write blocks (sorted by file and offset); stop at the first error. The blocks of the
    run on disk whole before the error are kept; the space of the rest is given back (part
    of it may be on disk). Returns (blocks written, the error or None)."""
    written = []
    for file, group in itertools.groupby(todo, key=lambda item: item[0].file):
        with files.writer(file) as w:
            for run in consecutive(list(group)):
                start = run[0][0].start
                try:
                    w.write(start, [data for _, data in run], shared=run[0][0].shared)
                except OSError as e:
                    on_disk = getattr(e, "failed_at", start)
                    whole = [(r, d) for r, d in run if r.start + len(d) <= on_disk]
                    written.extend(whole)
                    lost = run[len(whole)][0].start
                    end = run[-1][0].start + len(run[-1][1])
                    try:
                        files.punch(file, lost, in_pages(end - lost))  # its own last page too
                    except OSError:
                        pass
                    return written, e
                written.extend(run)
    return written, None


def consecutive(items: list[tuple[Placed, object]]) -> list[list]:
    """(place, x) pairs sorted by file and offset, in runs of one file where each block
    starts where the one before it ends."""
    runs: list[list] = []
    for place, x in items:
        last = runs[-1][-1][0] if runs else None
        if last is not None and last.file == place.file and last.start + last.length == place.start:
            runs[-1].append((place, x))
        else:
            runs.append([(place, x)])
    return runs
