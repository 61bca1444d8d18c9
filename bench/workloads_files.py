"""Workloads about files and mounts rather than bandwidth: many small files (8 reader
threads, files/s), time to first byte, mount-ready time, restart with a large cache,
and mounting a bucket of many objects.
"""

import os
import statistics
import time
from pathlib import Path

from . import cpu, raw_s3
from .context import KiB, Run
from .dataset import BUCKET, read_tree
from .mounts import drop_file_cache, drop_tree_cache
from .servers import RcloneEndpoint
from .workloads import filled_cache, nullfs

THREADS = 8


def files_per_s(root: Path, rels: list[str]) -> tuple[float, dict]:
    """Read every file with THREADS readers: files/s, and what was read."""
    with cpu.CpuSampler() as used:  # the row's daemon and S3 server, when watched
        t0 = time.perf_counter()
        n = read_tree(root, rels, THREADS)
        seconds = time.perf_counter() - t0
    return len(rels) / seconds, {"bytes": n, "seconds": seconds, "files": len(rels),
                                 "cpu": used.result}


def small_files(run: Run) -> None:
    w, ds = "small", run.dataset
    rels = [p for p, _ in ds.small]

    for rel in rels:
        drop_file_cache(ds.root / rel)
    run.record(w, "native", f"native files, {THREADS} threads, page cache dropped", "files/s",
               *files_per_s(ds.root, rels))
    run.record(w, "native_pc", f"native files, {THREADS} threads, in page cache", "files/s",
               *files_per_s(ds.root, rels))
    # The same sizes through the no-op pyfuse3 fs (flat names): what FUSE and pyfuse3 alone
    # cost per file (lookup, open, read, release), the floor under every tieredfs row below.
    sizes = {f"s{i}": size for i, (_, size) in enumerate(ds.small)}
    with nullfs(run, files=sizes) as null:
        run.record(w, "nullfs", f"no-op pyfuse3 fs, same sizes, {THREADS} threads", "files/s",
                   *files_per_s(null.path, list(sizes)))
    n, seconds = raw_s3.small_gets(run.s3_url, rels, THREADS)
    run.record(w, "boto3", f"boto3 GET per file, {THREADS} threads", "files/s",
               len(rels) / seconds, bytes=n, seconds=seconds, files=len(rels))
    cache = run.fresh_cache("small")
    with run.tiered(cache).start() as m:
        run.measure(m, w, "cold", "tieredfs cold (S3, incl. listings)", "files/s",
                    lambda: files_per_s(m.path, rels), vs=f"{w}.boto3")
        run.measure(m, w, "page_cache", "tieredfs re-read, page cache", "files/s",
                    lambda: files_per_s(m.path, rels), vs=f"{w}.native_pc")
    with run.remount_tier1(cache) as m:
        run.measure(m, w, "tier1", "tieredfs tier 1 (incl. listings)", "files/s",
                    lambda: files_per_s(m.path, rels), vs=f"{w}.native")


def _spread(rels: list[str], n: int) -> list[str]:
    """n files from different directories, so each first byte also pays for a listing."""
    seen, out = set(), []
    for rel in rels:
        if (d := os.path.dirname(rel)) not in seen:
            seen.add(d)
            out.append(rel)
    return (out + [r for r in rels if r not in out])[:n]


def _first_byte_ms(root: Path, rels: list[str]) -> tuple[float, dict]:
    times = []
    for rel in rels:
        t0 = time.perf_counter()
        fd = os.open(root / rel, os.O_RDONLY)
        os.read(fd, 4 * KiB)
        times.append((time.perf_counter() - t0) * 1000)
        os.close(fd)
    return statistics.median(times), {"samples": len(times), "max_ms": max(times)}


def first_byte(run: Run) -> None:
    w, ds = "ttfb", run.dataset
    rels = _spread([p for p, _ in ds.small], run.mode.ttfb_files)
    for rel in rels:
        drop_file_cache(ds.root / rel)
    run.record(w, "native", "native file, open + 4 KiB read, page cache dropped", "ms",
               *_first_byte_ms(ds.root, rels))
    run.record(w, "boto3", "boto3 4 KiB ranged GET, open connection", "ms",
               raw_s3.first_byte_ms(run.s3_url, rels), samples=len(rels))
    cache = run.fresh_cache("ttfb")
    with run.tiered(cache).start() as m:
        run.measure(m, w, "cold", "tieredfs cold: listing(s) + GET", "ms",
                    lambda: _first_byte_ms(m.path, rels), vs=f"{w}.boto3")
    with run.remount_tier1(cache) as m:
        run.measure(m, w, "tier1", "tieredfs tier 1: listing(s) + local hit", "ms",
                    lambda: _first_byte_ms(m.path, rels), vs=f"{w}.native")


def _ready_s(start_mount, n: int) -> tuple[float, dict, int]:
    """Best of n: seconds from spawning the daemon to a mount that answers; and peak RSS.
    The best, like the throughput rows, because a busy machine only ever adds time.
    Each try's ready and stop (unmount until the daemon exited) times go to the JSON."""
    trials, rss = {"ready": [], "stop": []}, 0
    for _ in range(n):
        with start_mount() as m:
            rss = max(rss, m.peak_rss_bytes())
        trials["ready"].append(m.ready_seconds)
        trials["stop"].append(m.stop_seconds)
    return min(trials["ready"]), trials, rss


def mount_ready(run: Run) -> None:
    w, n = "mount", max(3, run.mode.repeats)
    best, times, _ = _ready_s(lambda: nullfs(run), n)
    run.record(w, "nullfs", "no-op pyfuse3 fs (python start + mount)", "s", best, trials=times)
    best, times, rss = _ready_s(lambda: run.tiered(run.fresh_cache("ready-empty")).start(), n)
    run.record(w, "empty", "tieredfs, empty cache", "s", best, trials=times,
               kind="tieredfs", peak_rss_bytes=rss, vs=f"{w}.nullfs")
    cache = filled_cache(run, "big", ["big"])
    best, times, rss = _ready_s(lambda: run.tiered(cache).start(), n)
    run.record(w, "warm", f"tieredfs, cache of {run.dataset.big_size >> 20} MiB", "s", best,
               trials=times, kind="tieredfs", peak_rss_bytes=rss, vs=f"{w}.nullfs")


def restart(run: Run) -> None:
    """Mount-ready with ~100,000 cached blocks: 4 KiB blocks filled from a prefix of `big`."""
    w, bs = "restart", 4 * KiB
    blocks = min(run.mode.restart_blocks or 100_000, run.dataset.big_size // bs)
    cache = run.fresh_cache("restart")
    with run.tiered(cache, "--block-size", "4K", "--readahead-max", "1M").start() as m:
        t0 = time.perf_counter()
        # Creating 100,000 files (one per small object) can outrun this disk, and the fill then skips blocks
        # (docs/readahead.md); what is measured is the restart, so read again what is missing.
        for _ in range(3):
            drop_file_cache(m.path / "big")
            _read_prefix(m.path / "big", blocks * bs)
            m.settle()
            if m.stats().get("local.blocks", 0) >= blocks:
                break
        fill_s = time.perf_counter() - t0
        cached = m.stats().get("local.blocks", 0)
    drop_tree_cache(cache)
    best, times, rss = _ready_s(
        lambda: run.tiered(cache, "--block-size", "4K", "--readahead-max", "1M").start(), 3)
    run.record(w, "ready", f"tieredfs restart, {cached:,} cached 4 KiB blocks", "s", best,
               kind="tieredfs", trials=times, peak_rss_bytes=rss, cached_blocks=cached,
               fill_seconds=fill_s)
    with run.remount_tier1(cache, "--block-size", "4K", "--readahead-max", "1M") as m:
        run.measure(m, w, "first_read", "first 4 KiB after restart", "ms",
                    lambda: _first_byte_ms(m.path, ["big"]))


def _read_prefix(path: Path, size: int) -> None:
    with open(path, "rb", buffering=0) as f:
        while size > 0 and (chunk := f.read(min(1 << 20, size))):
            size -= len(chunk)


def big_bucket(run: Run) -> None:
    """Mount-ready for a bucket of many objects: the namespace is listed lazily.

    rclone only sees buckets that exist when it starts, so this bucket gets its own
    rclone (moto would need 100,000 uploads: too slow for a benchmark)."""
    w, n = "bigbucket", run.mode.bucket_objects or 100_000
    if run.endpoint.kind != "rclone":
        run.record(w, "ready", f"bucket of {n:,} objects: skipped (needs --server rclone)", "s", None)
        return
    bucket = BUCKET + "-many"
    root = run.workdir / "s3many"
    for i in range(n):
        d = root / bucket / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"o{i:06d}").write_bytes(b"x")
    endpoint = RcloneEndpoint(root).start()
    try:
        best, times, rss = _ready_s(lambda: run.tiered(
            run.fresh_cache("many"), bucket=bucket, endpoint_url=endpoint.url).start(), 3)
    finally:
        endpoint.stop()
    run.record(w, "ready", f"tieredfs, bucket of {n:,} objects", "s", best, trials=times,
               kind="tieredfs", peak_rss_bytes=rss, objects=n)
