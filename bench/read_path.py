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
from tieredfs.config import Config
from tieredfs.memory import receive_buffer
from tieredfs.reader import OpenFile, Reader
from tieredfs.service import Daemon

BLOCK = 1 << 20
READ = 4096


def daemon_on(root: Path) -> Daemon:
    """The daemon's own wiring (service.Daemon), its S3 endpoint one that no read reaches."""
    return Daemon(Config(bucket="bench", endpoint_url="http://127.0.0.1:9", cache_dir=root / "cache",
                         cache_min_free=0, block_size=BLOCK))


def fill(daemon: Daemon, obj: ObjectVersion) -> None:
    block = receive_buffer(BLOCK)
    block[:] = os.urandom(BLOCK)
    refs = [BlockRef(obj, i, BLOCK) for i in range(obj.size // BLOCK)]
    for i in range(0, len(refs), 8):
        daemon.local.put_many([(ref, block) for ref in refs[i:i + 8]])
    for ref in refs:  # written with O_DIRECT: read once so the pages are in memory
        assert daemon.local.get(ref) is not None


WARM_READS = 2000  # before timing: descriptors open, checksums in memory


async def time_reads(daemon: Daemon, obj: ObjectVersion, reads: int, profile: bool) -> float:
    fs, _ = daemon.build_fs()  # limiters belong to the trio run
    reader: Reader = fs.reader
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
        daemon = daemon_on(root)
        try:
            obj = ObjectVersion("bench", "big", "0" * 32, args.mib * BLOCK)
            fill(daemon, obj)
            us = trio.run(time_reads, daemon, obj, args.reads, args.profile)
            inline = daemon.registry.snapshot().get("chain.part_reads_inline", 0)
        finally:
            daemon.close()
        print(f"{us:.2f} us per 4 KiB read ({inline} of {WARM_READS + args.reads} served on the "
              "trio thread)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
