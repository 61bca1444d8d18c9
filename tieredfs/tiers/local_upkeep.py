"""Tier 1's background upkeep: orphans (files none of whose blocks is indexed, left by a
crash between the bytes and the index entry) swept one fan-out directory at a time,
never at start-up (service.py paces it).
"""

import os
import shutil
import time
from pathlib import Path

from ..errors import CacheError

_ORPHAN_AGE = 60.0  # a file this young may be a fill whose index entry is being written


def sweep_dir(tier, subdir: Path) -> int:
    """Remove orphans from one fan-out directory of `tier` (a LocalTier), and directories in
    it: those are the older two-level layout's, all of them orphans."""
    removed = 0
    now = time.time()
    try:
        names = os.listdir(subdir)
    except OSError:
        return 0
    for name in names:
        path = subdir / name
        try:
            if now - path.stat().st_mtime < _ORPHAN_AGE:
                continue
            if path.is_dir():
                removed += sum(len(files) for _, _, files in os.walk(path))
                shutil.rmtree(path)
            elif _remove_orphan(tier, path):
                removed += 1
        except (OSError, ValueError):
            continue
        except CacheError as e:
            tier.index_failed(e)  # whether a file is an orphan cannot be known: keep them
            break
    tier.counters.add("orphans_swept", removed)
    return removed


def _remove_orphan(tier, path: Path) -> bool:
    name = path.name
    with tier.room.lock:  # no fill may start writing into it meanwhile
        if len(name) == 32 and (name in tier.room.filling or tier.index.file_in_use(bytes.fromhex(name))):
            return False
        path.unlink()
        return True


def fanout_dirs(blocks: Path) -> list[Path]:
    try:
        return [blocks / a for a in sorted(os.listdir(blocks))]
    except OSError:
        return []
