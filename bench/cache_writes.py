"""Tier 1's fill path alone: LocalTier.put_many of an object's 1 MiB blocks, in batches of 8
from 4 threads, on an empty cache dir on the bench disk; alone, and beside Python threads
that keep the GIL busy (as the FUSE thread and the S3 read loops do in a daemon).

    python -m bench.cache_writes [--busy-threads 1] [--mib 1024] [--dir /var/tmp]

Why beside a busy thread: a thread that let the GIL go for a system call waits up to the
switch interval (5 ms) to get it back while another thread runs Python, so a put costs
about one such wait per call that lets the GIL go, whatever the disk's speed.
"""

import argparse
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.memory import receive_buffer
from tieredfs.stats import Counters
from tieredfs.tiers.blockfiles import BlockFiles
from tieredfs.tiers.cachedir import CacheDir, open_index
from tieredfs.tiers.local import LocalTier

BLOCK = 1 << 20
BATCH = 8
WRITERS = 4


def fill_rate(root: Path, mib: int, busy_threads: int) -> dict:
    """MiB/s and CPU ms per MiB of filling `mib` blocks into a new cache dir under root."""
    cache = CacheDir(root / "cache")
    cache.create()
    tier = LocalTier(cache, open_index(cache, 1 << 32), BlockFiles(cache.file_path, 64),
                     capacity=2 * mib * BLOCK, min_free=0, counters=Counters("local"))
    obj = ObjectVersion("bench", "big", "0" * 32, mib * BLOCK)
    datas = [receive_buffer(BLOCK) for _ in range(BATCH)]  # as blocks arrive from S3
    for d in datas:
        d[:] = os.urandom(BLOCK)

    def put_batch(first: int) -> None:
        tier.put_many([(BlockRef(obj, i, BLOCK), datas[i % BATCH])
                       for i in range(first, min(mib, first + BATCH))])

    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(2000))

    hogs = [threading.Thread(target=busy, daemon=True) for _ in range(busy_threads)]
    for h in hogs:
        h.start()
    try:
        cpu0, t0 = os.times(), time.perf_counter()
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(put_batch, range(0, mib, BATCH)))
        seconds, cpu1 = time.perf_counter() - t0, os.times()
    finally:
        stop.set()
        for h in hogs:
            h.join()
        tier.close()
    fills = tier.counters.get("fills")
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    return {"busy_threads": busy_threads, "blocks": fills, "mib_s": fills / seconds,
            "cpu_ms_per_mib": cpu / max(1, fills) * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--busy-threads", type=int, nargs="*", default=[0, 1])
    p.add_argument("--dir", default="/var/tmp")
    a = p.parse_args()
    for busy in a.busy_threads:
        root = Path(tempfile.mkdtemp(prefix="tieredfs-bench-writes-", dir=a.dir))
        try:
            r = fill_rate(root, a.mib, busy)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"busy Python threads {r['busy_threads']}: {r['mib_s']:,.0f} MiB/s, "
              f"{r['cpu_ms_per_mib']:.2f} ms CPU per MiB ({r['blocks']} blocks, "
              f"{WRITERS} writers, batches of {BATCH})")


if __name__ == "__main__":
    main()
