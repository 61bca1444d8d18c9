"""A directory of 100,000 entries (issue 18): the first `ls`, and `stat` latency on cached
files while that directory is being listed again.

The endpoint is bench/listserver.py over plain files (100,000 PUTs to moto would take
longer than the benchmark, and rclone reads the whole directory for each 1,000-key page:
~3.5 s a page here). The reference row is plain boto3 listing the same directory, page
after page: the floor for any daemon that lists through boto3. mountpoint-s3 takes 9.8 s
for the first `ls` of such a directory (the issue's measurement, not taken here).
"""

import os
import statistics
import subprocess
import threading
import time

from tieredfs.devserver import wait_until

from .context import Run
from .dataset import client
from .listserver import ListServer

ENTRIES = 100_000
CACHED = 200  # files read into tier 1 before the relisting; their stats are measured
LIST_TTL = 2.0  # seconds; also the kernel's entry timeout, so stats reach the daemon after it
BUCKET = "tieredfs-bench-bigdir"


def big_directory(run: Run) -> None:
    w = "bigdir"
    root = run.workdir / "s3bigdir"
    d = root / BUCKET / "big"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(ENTRIES):
        (d / f"o{i:06d}").write_bytes(b"%06d" % i)
    server = ListServer(root, BUCKET).start()
    try:
        run.record(w, "boto3_list", f"boto3 ListObjectsV2, all {ENTRIES // 1000} pages, one after another",
                   "s", _boto3_list_s(server.url), entries=ENTRIES)
        with run.tiered(run.fresh_cache("bigdir"), "--list-ttl", str(LIST_TTL), bucket=BUCKET,
                        endpoint_url=server.url).start() as m:
            big = m.path / "big"
            t0 = time.perf_counter()
            listed = subprocess.run(["ls", str(big)], capture_output=True, timeout=600, check=True)
            first_ls = time.perf_counter() - t0
            assert listed.stdout.count(b"\n") == ENTRIES
            names = [f"o{i:06d}" for i in range(0, ENTRIES, ENTRIES // CACHED)]
            for name in names:
                with open(big / name, "rb") as f:
                    f.read()
            m.settle()
            stats, relist_s = _stats_while_relisting(m, big, names)
    finally:
        server.stop()
    run.record(w, "first_ls", f"first `ls` of a directory of {ENTRIES:,} (mountpoint-s3: 9.8 s)",
               "s", first_ls, kind="tieredfs", entries=ENTRIES)
    ms = sorted(s * 1000 for s in stats)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else None
    run.record(w, "stat_p99", f"p99 `stat` of listed names while the {ENTRIES:,} are relisted",
               "ms", p99, kind="tieredfs", samples=len(ms),
               median_ms=statistics.median(ms) if ms else None, max_ms=ms[-1] if ms else None,
               relist_seconds=relist_s)


def _boto3_list_s(url: str) -> float:
    s3 = client(url, 1)
    s3.head_bucket(Bucket=BUCKET)  # a connection opened outside the timing
    t0 = time.perf_counter()
    for _ in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="big/", Delimiter="/"):
        pass
    return time.perf_counter() - t0


def _stats_while_relisting(m, big, names: list[str]) -> tuple[list[float], float]:
    """Once the listing and the kernel's entries are stale, an `ls` has the directory listed
    again; stats are taken until that relisting has asked for every page. Each name is
    stat'ed once (a second stat within LIST_TTL is the kernel's answer, not the daemon's):
    the cached files first, then other listed names."""
    time.sleep(LIST_TTL + 0.5)
    lists_before = m.stats().get("s3.requests.list", 0)
    pages = ENTRIES // 1000
    t0 = time.perf_counter()
    ls = threading.Thread(target=subprocess.run, args=(["ls", str(big)],),
                          kwargs={"capture_output": True, "timeout": 600})
    ls.start()
    # The relisting has begun once its first page is asked for.
    wait_until(lambda: m.stats().get("s3.requests.list", 0) > lists_before, 60, interval=0.01)
    others = [f"o{i:06d}" for i in range(7, ENTRIES, 13)]
    samples = []
    for n, name in enumerate(names + others):
        if n % 20 == 0 and m.stats().get("s3.requests.list", 0) >= lists_before + pages:
            break
        s0 = time.perf_counter()
        os.stat(big / name)
        samples.append(time.perf_counter() - s0)
    relist_s = time.perf_counter() - t0
    ls.join()
    return samples, relist_s
