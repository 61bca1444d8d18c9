"""The daemon's own cost of a 4 KiB random read from tier 1, without FUSE: Reader.read down
through the readahead engine, the chain and the local tier, on the trio thread, with the
block files' pages in memory (the path `rand4k` takes with tier 1's files in the page cache).

    python -m bench.read_path [--reads 50000] [--mib 256] [--dir /var/tmp] [--profile]

The rand4k row's gap to the no-op FUSE fs is the kernel round trip plus this; if this is
a small part of the gap, shaving it cannot close the gap.
"""

import argparse
import cProfile
import os
import pstats
import random
import shutil
import tempfile
import time
from pathlib import Path

import trio

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.memory import receive_buffer
from tieredfs.readahead import MemoryBudget, ReadaheadEngine, ReadaheadSettings
from tieredfs.reader import OpenFile, Reader
from tieredfs.stats import Registry
from tieredfs.tiers.blockfiles import BlockFiles
from tieredfs.tiers.chain import TierChain
from tieredfs.tiers.filler import Filler
from tieredfs.tiers.local import CacheDir, LocalTier, open_index
from tieredfs.tiers.s3 import S3Backend, S3Tier

BLOCK = 1 << 20
READ = 4096


def filled_tier(root: Path, obj: ObjectVersion, registry: Registry) -> LocalTier:
    cache = CacheDir(root / "cache")
    cache.create()
    tier = LocalTier(cache, open_index(cache, 1 << 32), BlockFiles(cache.file_path, 64),
                     capacity=2 * obj.size, min_free=0, counters=registry.counters("local"))
    block = receive_buffer(BLOCK)
    block[:] = os.urandom(BLOCK)
    refs = [BlockRef(obj, i, BLOCK) for i in range(obj.size // BLOCK)]
    for i in range(0, len(refs), 8):
        tier.put_many([(ref, block) for ref in refs[i:i + 8]])
    for ref in refs:  # written with O_DIRECT: read once so the pages are in memory
        assert tier.get(ref) is not None
    return tier


def build_reader(tier: LocalTier, registry: Registry) -> Reader:
    """The daemon's wiring (service.Daemon.build_fs), with an S3 tier no read reaches."""
    disk = trio.CapacityLimiter(32)
    filler = Filler([tier], max_bytes=32 << 20, max_wait=2.0, writers=4, limiter=disk,
                    counters=registry.counters("chain"))
    unused = S3Backend("bench", endpoint_url="http://127.0.0.1:9", region=None, max_requests=1,
                       connect_timeout=0.1, read_timeout=0.1, max_attempts=1, deadline=1.0,
                       counters=registry.counters("s3"))
    chain = TierChain([tier], S3Tier(unused), filler, disk_limiter=disk,
                      s3_limiter=trio.CapacityLimiter(16), max_span=16,
                      counters=registry.counters("chain"))
    counters = registry.counters("readahead")
    engine = ReadaheadEngine(chain, ReadaheadSettings(BLOCK, 2, 64, 16, BLOCK),
                             MemoryBudget(64 << 20, counters), trio.CapacityLimiter(12), counters)
    return Reader(chain, BLOCK, engine)


WARM_READS = 2000  # before timing: descriptors open, checksums in memory


async def time_reads(reader: Reader, obj: ObjectVersion, reads: int, profile: bool) -> float:
    f = OpenFile(fh=1, ino=2, obj=obj)
    await reader.opened(f)
    rng = random.Random(1)
    offsets = [rng.randrange(obj.size // READ) * READ for _ in range(WARM_READS + reads)]
    for offset in offsets[:WARM_READS]:
        await reader.read(f, offset, READ)
    offsets = offsets[WARM_READS:]
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    for offset in offsets:
        await reader.read(f, offset, READ)
    seconds = time.perf_counter() - t0
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return seconds / reads * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=50000)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--profile", action="store_true", help="cProfile the timed reads (slower)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tieredfs-read-path-", dir=args.dir))
    try:
        registry = Registry()
        obj = ObjectVersion("bench", "big", "0" * 32, args.mib * BLOCK)
        reader = build_reader(filled_tier(root, obj, registry), registry)
        us = trio.run(time_reads, reader, obj, args.reads, args.profile)
        inline = registry.snapshot().get("chain.part_reads_inline", 0)
        print(f"{us:.2f} us per 4 KiB read ({inline} of {WARM_READS + args.reads} served on the "
              "trio thread)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
