"""Pages the kernel allocated over a run, machine-wide (/proc/vmstat `pgalloc_*`).

Why count them: new memory costs ~0.5 ms of CPU per MiB on this VM (memory.py), so a run
that makes the kernel allocate more pages per byte read pays for it in CPU, and the count,
unlike the CPU time, hardly changes from run to run. It showed that with the mount's
kernel readahead at 4 MiB, four readers made the kernel add pages to the page cache for more
than twice the bytes read: FUSE skips the async part of a readahead while its background
queue is congested, and the pages it had allocated for that part are freed unread
(docs/readahead.md, "The kernel's side").
"""

import mmap
from pathlib import Path

_PAGE = mmap.PAGESIZE  # what pgalloc_* counts in
_VMSTAT = Path("/proc/vmstat")


def allocated_pages() -> int | None:
    """Pages allocated since boot, all zones; None where /proc/vmstat cannot tell."""
    try:
        lines = _VMSTAT.read_text().splitlines()
    except OSError:
        return None
    counts = [int(v) for k, v in (line.split() for line in lines) if k.startswith("pgalloc_")]
    return sum(counts) if counts else None


def per_byte_read(before: int | None, after: int | None, nbytes: int) -> float | None:
    """Bytes of pages allocated per byte read between two `allocated_pages()` readings."""
    if before is None or after is None or nbytes <= 0:
        return None
    return (after - before) * _PAGE / nbytes
