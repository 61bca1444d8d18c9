"""The shared tier (docs/shared-tier.md): a cluster's nodes starting cold on the same file,
and a new node reading what the cluster has already published.

Nodes are daemons on this host, each with its own cache dir; "shared" is one plain
directory on the same disk standing in for an NFS share. S3 bytes and GETs are the
daemons' own counters (rclone's server does not count).
"""

import os
import shutil
import threading
import time
from pathlib import Path

from . import fio
from .context import MiB, Run
from .mounts import TieredMount, drop_tree_cache

CLUSTER_NODES = {"tiny": 2, "quick": 4, "full": 8}


def cluster(run: Run) -> None:
    w, size = "cluster", run.dataset.big_size
    n = CLUSTER_NODES[run.mode.name]
    shared = run.workdir / "shared"
    for tag, extra in (("alone", ()), ("shared", ("--shared-dir", str(shared)))):
        shutil.rmtree(shared, ignore_errors=True)
        seconds, gets, nbytes, shared_stats = _cold_at_once(run, n, tag, extra)
        what = "own caches only" if tag == "alone" else "one shared dir"
        run.record(w, f"{tag}_seconds", f"{n} nodes cold on one {size >> 20} MiB file at once, "
                   f"{what}: time until all done", "s", seconds, s3_gets=gets, s3_bytes=nbytes, shared=shared_stats)
        run.record(w, f"{tag}_s3_bytes", f"{n} nodes, {what}: bytes from S3 ({gets} GETs), x the file", "x",
                   nbytes / size, s3_gets=gets, s3_bytes=nbytes)
    # The shared dir is warm now: a new node's cold read comes from it, against a native
    # read of the shared dir's files.
    drop_tree_cache(shared)
    files = sorted(p for p in shared.rglob("*") if p.is_file() and p.parent.parent.name == "blocks")
    t0 = time.perf_counter()
    native = sum(_read_whole(p) for p in files)
    native_s = time.perf_counter() - t0
    run.record(w, "shared_native", f"the shared dir's {len(files)} block files read natively "
               "(page cache dropped)", "MiB/s", native / MiB / native_s, bytes=native, seconds=native_s)
    with run.tiered(run.fresh_cache("cluster-late"), "--shared-dir", str(shared)).start() as m:
        run.measure(m, w, "late_node", "a new node, cold, from the warm shared dir", "MiB/s",
                    lambda: _fio_mib(m), vs=f"{w}.shared_native")


def _cold_at_once(run: Run, n: int, tag: str, extra: tuple) -> tuple[float, int, int, dict]:
    mounts: list[TieredMount] = []
    try:
        for i in range(n):
            mounts.append(run.tiered(run.fresh_cache(f"cluster-{tag}{i}"), *extra).start())
        before = [m.stats() for m in mounts]
        go = threading.Barrier(n + 1)
        threads = [threading.Thread(target=_read_at, args=(m.path / "big", go)) for m in mounts]
        for t in threads:
            t.start()
        go.wait(60)
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        after = [m.stats() for m in mounts]
    finally:
        for m in mounts:
            m.stop()
    delta = {k: sum(a.get(k, 0) - b.get(k, 0) for a, b in zip(after, before))
             for k in set().union(*after) if k.startswith(("s3.", "shared.", "chain.hits"))}
    return seconds, delta.get("s3.requests.get", 0), delta.get("s3.bytes", 0), \
        {k: v for k, v in sorted(delta.items()) if k.startswith(("shared.", "chain.hits"))}


def _read_at(path: Path, go: threading.Barrier) -> None:
    go.wait(60)
    _read_whole(path)


def _read_whole(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while chunk := os.read(fd, MiB):
            n += len(chunk)
        return n
    finally:
        os.close(fd)


def _fio_mib(m: TieredMount) -> tuple[float, dict]:
    r = fio.run("seq-read-1m", FILE=m.path / "big", INVALIDATE=1)
    return r.mib_s, {"bytes": r.bytes, "seconds": r.seconds, "cpu": r.cpu}
