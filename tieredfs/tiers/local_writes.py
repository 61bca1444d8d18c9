"""Tier 1's fills on disk: a batch of blocks written by file and offset, one descriptor per
file and one system call per run of consecutive blocks (tiers/local.py reserves the room
and indexes what was written).
"""

import itertools

from ..blocks import BlockRef
from .blockfiles import BlockFiles


def write_blocks(files: BlockFiles, todo: list[tuple[BlockRef, bytes]]) -> tuple[list, OSError | None]:
    """Write blocks (sorted by file and offset); stop at the first error. The blocks of the
    run on disk whole before the error are kept; the space of the rest is given back (part
    of it may be on disk). Returns (blocks written, the error or None)."""
    written = []
    for file, group in itertools.groupby(todo, key=lambda item: item[0].file):
        with files.writer(file) as w:
            for run in consecutive(list(group)):
                start = run[0][0].start
                try:
                    w.write(start, [data for _, data in run])
                except OSError as e:
                    on_disk = getattr(e, "failed_at", start)
                    whole = [(r, d) for r, d in run if r.start + len(d) <= on_disk]
                    written.extend(whole)
                    lost = run[len(whole)][0].start
                    end = run[-1][0].start + len(run[-1][1])
                    try:
                        files.punch(file, lost, end - lost)
                    except OSError:
                        pass
                    return written, e
                written.extend(run)
    return written, None


def consecutive(items: list[tuple[BlockRef, object]]) -> list[list]:
    """(ref, x) pairs sorted by file and offset, in runs of one file where each block starts
    where the one before it ends."""
    runs: list[list] = []
    for ref, x in items:
        last = runs[-1][-1][0] if runs else None
        if last is not None and last.file == ref.file and last.start + last.length == ref.start:
            runs[-1].append((ref, x))
        else:
            runs.append([(ref, x)])
    return runs
