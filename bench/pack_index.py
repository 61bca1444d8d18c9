"""python -m bench.pack_index [N]: size and load time of a pack index of N entries (default
1,000,000), with paths like a dataset's (dNN/dNN/fNNNNNNN.jpg) and MD5 ETags.

Load = open the SQLite file in place and answer the first lookup, as a mount does after
downloading it; then the mean of 10,000 random lookups.
"""

import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

from tieredfs.packindex import Entry, Pack, PackIndex, write_index


def main(n: int) -> dict:
    packs = [Pack(f"data/.tieredfs/packs/20260101T000000-abcdef12-{i:05d}.pack",
                  hashlib.md5(str(i).encode()).hexdigest(), 64 << 20) for i in range(n // 2000 + 1)]
    entries = [Entry(f"d{i % 100:02d}/d{i // 100 % 100:02d}/f{i:07d}.jpg",
                     hashlib.md5(i.to_bytes(8, "little")).hexdigest(), 30_000, packs[i // 2000],
                     (i % 2000) * 30_000, random.getrandbits(63)) for i in range(n)]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        path = Path(tmp) / "index.sqlite"
        t0 = time.perf_counter()
        write_index(path, "data/", entries)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = PackIndex(path)
        assert index.lookup(entries[n // 2].path) == entries[n // 2]
        load_s = time.perf_counter() - t0
        sample = random.sample(entries, min(n, 10_000))
        t0 = time.perf_counter()
        for e in sample:
            index.lookup(e.path)
        lookup_us = (time.perf_counter() - t0) / len(sample) * 1e6
        index.close()
        result = {"entries": n, "bytes": path.stat().st_size, "write_s": write_s, "load_s": load_s,
                  "lookup_us": lookup_us}
    print(f"{n:,} entries: {result['bytes'] / (1 << 20):.1f} MiB, written in {write_s:.1f} s, "
          f"loaded in {load_s * 1000:.1f} ms, {lookup_us:.1f} µs per lookup")
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
