"""Workloads read through fio (bench/fio/*.fio): sequential, 4 KiB random, four readers.

Each has its reference rows (native file, no-op FUSE, raw boto3) measured here, in the
same run, and tieredfs cold (empty cache, new daemon), from tier 1 (new daemon, block
files' pages dropped) and from the page cache (re-read on the same mount).
"""

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tieredfs.memory import receive_buffer
from tieredfs.tiers.blockfiles import BlockFiles

from . import fio, raw_s3
from .cpu import CpuSampler
from .folios import mean_folio_kib
from .context import MiB, Run
from .mounts import NullMount, drop_tree_cache

BLOCK_READERS = 4


def _best(fn, n: int, key=lambda r: r.mib_s):
    return max((fn() for _ in range(n)), key=key)


def _mib(r: fio.FioResult) -> tuple[float, dict]:
    return r.mib_s, {"bytes": r.bytes, "seconds": r.seconds, "loops": r.loops, "cpu": r.cpu}


def _iops(r: fio.FioResult) -> tuple[float, dict]:
    return r.iops, {"bytes": r.bytes, "seconds": r.seconds, "cpu": r.cpu}


def nullfs(run: Run, keep_cache: bool = False, files: dict[str, int] | None = None) -> NullMount:
    path, log = run.null_path()
    if files is None:
        files = {"big": run.dataset.big_size, **{f"part{i}": run.dataset.multi_size for i in range(4)}}
    return NullMount(path, files, log, keep_cache).start()


def filled_cache(run: Run, name: str, paths: list[str]) -> Path:
    """A cache dir holding `paths` whole (made by one cold read unless a workload did it)."""
    if name not in run.warm_caches:
        cache = run.fresh_cache(name)
        with run.tiered(cache).start() as m:
            for p in paths:
                fio.run("seq-read-1m", FILE=m.path / p, INVALIDATE=1)
        run.warm_caches[name] = cache
    return run.warm_caches[name]


def sequential(run: Run) -> None:
    w, ds, reps = "seq", run.dataset, run.mode.repeats
    native = ds.root / "big"
    seq = lambda path, inv=1: fio.run(  # noqa: E731
        "seq-read-1m", FILE=path, INVALIDATE=inv, loops=1 if inv else pc_loops)
    # A page-cache read of the file takes ~10 ms: read it again and again for ~2 GiB.
    pc_loops = max(1, min(64, (2 << 30) // ds.big_size))
    r = _best(lambda: seq(native), reps)
    run.record(w, "native", "native file, page cache dropped", "MiB/s", *_mib(r))
    r = _best(lambda: seq(native, 0), reps)
    run.record(w, "native_pc", "native file, in page cache", "MiB/s", *_mib(r))
    run.record("folio", "native", "native file in page cache: folio size of its average byte",
               "KiB", mean_folio_kib(native))
    with nullfs(run) as null:
        r = _best(lambda: seq(null.path / "big"), reps)
    run.record(w, "nullfs", "no-op pyfuse3 fs", "MiB/s", *_mib(r))
    with nullfs(run, keep_cache=True) as null:
        seq(null.path / "big")
        r = _best(lambda: seq(null.path / "big", 0), reps)
    run.record(w, "nullfs_pc", "no-op pyfuse3 fs, in page cache", "MiB/s", *_mib(r),
               vs=f"{w}.native_pc")
    best = raw_s3.best_ranged_read(run.s3_url, "big", ds.big_size, list(run.mode.boto_grid),
                                   run.endpoint.pid)
    run.record(w, "boto3", f"boto3 ranged GETs, {best['threads']} threads x "
               f"{best['chunk'] >> 20} MiB (best)", "MiB/s", best["mib_s"],
               bytes=best["bytes"], seconds=best["seconds"], trials=best["trials"], cpu=best["cpu"])

    run.record(w, "diskwrite", f"the cache disk: an object's 1 MiB blocks written as tier 1 does, "
               f"{BLOCK_READERS} threads", "MiB/s",
               *write_block_files(run.workdir / "diskwrite", ds.big_size))
    cache = run.fresh_cache("big")
    with run.tiered(cache).start() as m:
        run.measure(m, w, "cold", "tieredfs cold (S3)", "MiB/s",
                    lambda: _mib(seq(m.path / "big")), vs=f"{w}.boto3")
        run.measure(m, w, "page_cache", "tieredfs re-read, page cache", "MiB/s",
                    lambda: _mib(_best(lambda: seq(m.path / "big", 0), reps)),
                    vs=f"{w}.native_pc")
        run.record("folio", "tieredfs", "tieredfs file in page cache: folio size of its average "
                   "byte", "KiB", mean_folio_kib(m.path / "big"))
    run.warm_caches["big"] = cache
    with run.tiered(run.fresh_cache("big-nowait"), "--cache-fill-wait", "0").start() as m:
        run.measure(m, w, "cold_nowait", "tieredfs cold, never waiting for the cache disk "
                    "(--cache-fill-wait 0)", "MiB/s", lambda: _mib(seq(m.path / "big")),
                    vs=f"{w}.boto3")
    drop_tree_cache(cache / "blocks")
    run.record(w, "blockfiles", f"tier 1's files read directly, 1 MiB blocks, {BLOCK_READERS} threads, "
               "page cache dropped", "MiB/s", *read_block_files(cache / "blocks"))
    run.measure_best(lambda: run.remount_tier1(cache), w, "tier1",
                     "tieredfs tier 1 (page cache dropped; best of new daemons)", "MiB/s",
                     lambda m: _mib(seq(m.path / "big")), vs=f"{w}.native")


def write_block_files(root: Path, size: int) -> tuple[float, dict]:
    """The ceiling of a cold read that caches everything when the disk is slower than the
    network: `size` bytes as one object's 1 MiB blocks, written the way tier 1 writes them
    (a few threads, each block at its offset of one new file, from page-aligned buffers)."""
    files = BlockFiles(lambda name: root / name[:2] / name, 1)
    data = receive_buffer(MiB)
    data[:] = os.urandom(MiB)
    with CpuSampler() as sampler:  # as raw_s3.ranged_read: the whole stretch is the writes
        t0 = time.perf_counter()
        with ThreadPoolExecutor(BLOCK_READERS) as pool:
            list(pool.map(lambda i: files.write_at("ab" * 16, i * MiB, data), range(size // MiB)))
        seconds = time.perf_counter() - t0
    shutil.rmtree(root)
    return size / MiB / seconds, {"bytes": size, "seconds": seconds, "cpu": sampler.result}


def read_block_files(blocks: Path) -> tuple[float, dict]:
    """Tier 1's files read directly as tier 1 reads them: 1 MiB blocks, a few at a time."""
    files = sorted(p for p in blocks.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    n = 0
    with ThreadPoolExecutor(BLOCK_READERS) as pool:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                n += sum(pool.map(lambda off: len(os.pread(fd, MiB, off)), range(0, size, MiB)))
            finally:
                os.close(fd)
    seconds = time.perf_counter() - t0
    return n / MiB / seconds, {"bytes": n, "seconds": seconds, "files": len(files)}


def random_4k(run: Run) -> None:
    w, ds, t = "rand4k", run.dataset, run.mode.fio_runtime
    rand = lambda path, direct=1: fio.run(  # noqa: E731
        "randread-4k", FILE=path, DIRECT=direct, INVALIDATE=direct, RUNTIME=t)
    native = ds.root / "big"
    run.record(w, "native", "native file, O_DIRECT (disk)", "IOPS", *_iops(rand(native)))
    fio.run("seq-read-1m", FILE=native, INVALIDATE=0)
    run.record(w, "native_pc", "native file, in page cache", "IOPS", *_iops(rand(native, 0)))
    with nullfs(run) as null:
        run.record(w, "nullfs", "no-op pyfuse3 fs, O_DIRECT", "IOPS",
                   *_iops(rand(null.path / "big")))

    cache = filled_cache(run, "big", ["big"])
    with run.remount_tier1(cache) as m:
        run.measure(m, w, "tier1", "tieredfs tier 1, O_DIRECT", "IOPS",
                    lambda: _iops(rand(m.path / "big")), vs=f"{w}.nullfs")
        # Again: the pages of tier 1's files read by the first run are now in memory, so most
        # reads are served without a worker thread (docs/cache.md).
        run.measure(m, w, "tier1_warm", "tieredfs tier 1, O_DIRECT, its files in the page cache",
                    "IOPS", lambda: _iops(rand(m.path / "big")), vs=f"{w}.nullfs")
        fio.run("seq-read-1m", FILE=m.path / "big", INVALIDATE=0)
        run.measure(m, w, "page_cache", "tieredfs, in page cache", "IOPS",
                    lambda: _iops(rand(m.path / "big", 0)), vs=f"{w}.native_pc")
    with run.tiered(run.fresh_cache("rand-cold")).start() as m:
        run.measure(m, w, "cold", "tieredfs from cold (S3, filling tier 1), O_DIRECT", "IOPS",
                    lambda: _iops(rand(m.path / "big")), vs=f"{w}.nullfs")


def multi_reader(run: Run) -> None:
    w, reps = "multi4", run.mode.repeats
    multi = lambda d: fio.run("multi-seq-4jobs", DIR=d, INVALIDATE=1)  # noqa: E731
    run.record(w, "native", "native files, page cache dropped", "MiB/s",
               *_mib(_best(lambda: multi(run.dataset.root / "multi"), reps)))
    with nullfs(run) as null:
        run.record(w, "nullfs", "no-op pyfuse3 fs", "MiB/s",
                   *_mib(_best(lambda: multi(null.path), reps)))
    cache = run.fresh_cache("multi")
    with run.tiered(cache).start() as m:
        run.measure(m, w, "cold", "tieredfs cold (S3)", "MiB/s",
                    lambda: _mib(multi(m.path / "multi")), vs="seq.boto3")
    run.measure_best(lambda: run.remount_tier1(cache), w, "tier1",
                     "tieredfs tier 1 (page cache dropped; best of new daemons)", "MiB/s",
                     lambda m: _mib(multi(m.path / "multi")), vs=f"{w}.native")



MANY_READERS = 200


def many_readers(run: Run) -> None:
    """Memory with many files open and read at once: the RSS target holds "whatever the
    number of open files". Each reader opens its own handle on one of the four files, waits
    until all are open, then reads its own stretch sequentially (cold cache)."""
    w, size = "open200", run.dataset.multi_size
    span = max(MiB, min(8 * MiB, size // 4))
    jobs = [(f"multi/part{i % 4}", (i // 4) * MiB % (size - span + 1)) for i in range(MANY_READERS)]

    def read_all(root: Path) -> tuple[float, dict]:
        everyone_open = threading.Barrier(len(jobs))

        def one(job) -> int:
            rel, offset = job
            with open(root / rel, "rb", buffering=0) as f:
                everyone_open.wait(60)
                f.seek(offset)
                n = 0
                while n < span and (chunk := f.read(MiB)):
                    n += len(chunk)
                return n

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            n = sum(pool.map(one, jobs))
        seconds = time.perf_counter() - t0
        return n / MiB / seconds, {"bytes": n, "seconds": seconds, "readers": len(jobs)}

    with run.tiered(run.fresh_cache("open200")).start() as m:
        run.measure(m, w, "cold", f"tieredfs cold, {MANY_READERS} files open and read at once",
                    "MiB/s", lambda: read_all(m.path))
