"""`tieredfs cache info|clear|check`: looking after a cache dir from outside the daemon.

LMDB allows several processes on one environment, so these work next to a running
daemon; `clear` still refuses then unless forced, since it throws away a warm cache.
"""

import json
import os
import shutil
import time
from pathlib import Path

from .errors import CacheError, CacheLocked
from .index import BlockIndex
from .tiers.blockfiles import BlockFiles
from .tiers.cachedir import CacheDir
from .tiers.local import chunk_sums
from .tiers.local_room import free_space

_MAP_SIZE = 1 << 30


def _open(path: Path) -> tuple[CacheDir, BlockIndex]:
    cache = CacheDir(path)
    if not cache.index.exists():
        raise CacheError(f"{path} is not a tieredfs cache dir (no index.lmdb)")
    return cache, BlockIndex(cache.index, _MAP_SIZE)


def info(path: Path) -> dict:
    cache, index = _open(path)
    try:
        totals = index.totals()
        oldest = index.oldest_insert()
    finally:
        index.env.close()
    out = {"cache_dir": str(path), **totals,
           "oldest_block_age_s": round(time.time() - oldest, 1) if oldest else None,
           "daemon": cache.holder()}
    mnt = cache.holder_mountpoint()
    if mnt:
        try:
            stats = json.loads(os.getxattr(mnt, "user.tieredfs.stats"))
            hits, misses = stats.get("local.hits", 0), stats.get("local.misses", 0)
            out["hit_ratio_since_start"] = round(hits / (hits + misses), 4) if hits + misses else None
            out["capacity_bytes"] = stats.get("local.capacity_bytes")  # None until it made room
        except OSError:
            out["hit_ratio_since_start"] = None
    return out


def clear(path: Path, force: bool) -> int:
    """Drop every block; returns how many index entries were dropped."""
    cache, index = _open(path)
    try:
        holder = cache.holder()
        if holder and not force:
            raise CacheLocked(f"cache dir {path} is in use by {holder}: unmount first or use --force")
        count = index.totals()["blocks"]
        index.clear()
        index.sync()
    finally:
        index.env.close()
    for sub in cache.blocks.iterdir() if cache.blocks.exists() else ():
        shutil.rmtree(sub, ignore_errors=True)
    return count


def check(path: Path, drop: bool) -> dict:
    """Verify every block against its checksum; optionally drop the bad ones."""
    cache, index = _open(path)
    files = BlockFiles(cache.file_path, 16)
    bad: list[bytes] = []
    checked = 0
    try:
        for block_id, entry in index.entries():
            checked += 1
            try:
                data = files.read(entry.file.hex(), entry.offset, entry.length, wait=True)
            except OSError:
                bad.append(block_id)
                continue
            if len(data) != entry.length or chunk_sums(data) != entry.chunk_sums:
                bad.append(block_id)
        removed = index.remove(bad) if drop and bad else []
        index.sync()
        for r in removed:
            try:
                free_space(cache, files, r)
            except OSError:
                pass  # the space comes back with the file's last block
    finally:
        files.close_all()
        index.env.close()
    return {"checked": checked, "corrupt": len(bad), "dropped": len(bad) if drop else 0,
            "corrupt_ids": [b.hex() for b in bad[:20]]}
