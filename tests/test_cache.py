"""Tier 1 through a real mount: hits, restarts, corruption, capacity, scans, crashes.

GETs are counted on the S3 server. Reads that must reach the daemon first drop the
kernel's page cache for that file (posix_fadvise), since a page-cache hit never
reaches the local tier at all.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from conftest import fill_up, read_uncached, tieredfs_cmd
from tieredfs.tiers.local_usage import CORRELATION_WINDOW

K = 1024
BS = 64 * K
SMALL = ("--block-size", "64K")


def gets(s3server) -> int:
    return s3server.counts().get("GET", 0)


def block_files(cache_dir):
    """Tier 1's files: one per object, holding its blocks."""
    return [p for p in (cache_dir / "blocks").rglob("*") if p.is_file()]


def daemon_block_files(m) -> list[str]:
    """The block files the daemon has open, as /proc shows them."""
    fds = f"/proc/{m.pid}/fd"
    targets = []
    for fd in os.listdir(fds):
        try:
            targets.append(os.readlink(f"{fds}/{fd}"))
        except FileNotFoundError:
            pass
    return [t for t in targets if t.startswith(str(m.cache_dir / "blocks"))]


@pytest.fixture
def dataset(put):
    return {f"d/f{i}.bin": put(f"d/f{i}.bin", os.urandom(3 * BS + 100 * i)) for i in range(4)}


def verify_all(mnt, dataset):
    for key, data in dataset.items():
        assert read_uncached(mnt.path / key) == data, key
    mnt.settle()


def test_second_read_and_restart_make_no_gets(bucket, dataset, mount_factory, s3server):
    m = mount_factory(bucket, *SMALL)
    verify_all(m, dataset)
    s3server.reset_counts()
    verify_all(m, dataset)
    assert gets(s3server) == 0
    assert m.stats()["local.hits"] >= len(dataset) * 3
    m.restart()
    s3server.reset_counts()
    verify_all(m, dataset)
    assert gets(s3server) == 0
    assert m.stats()["local.hits"] >= len(dataset) * 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_block_files_are_refetched(bucket, dataset, mount_factory, s3server, damage):
    m = mount_factory(bucket, *SMALL)
    verify_all(m, dataset)
    files = block_files(m.cache_dir)
    blocks = m.stats()["local.blocks"]
    assert len(files) == len(dataset)  # one file per object
    for p in files:
        if damage == "flip":  # a bit in every block
            raw = bytearray(p.read_bytes())
            for start in range(0, len(raw), BS):
                raw[start + min(BS, len(raw) - start) // 2] ^= 0x01
            p.write_bytes(bytes(raw))
        elif damage == "truncate":  # the first block cut short, the others gone
            os.truncate(p, BS // 2)
        else:
            p.unlink()
    if damage == "delete":
        # A kept-open file is asked whether it still has a name once a second (blockfiles.py):
        # until then its bytes, still the right ones, may be served.
        time.sleep(1.1)
    s3server.reset_counts()
    verify_all(m, dataset)
    assert m.stats()["local.corrupt"] == blocks
    # Every block came again from S3, once (consecutive misses may share one GET).
    assert s3server.counts()["GET_BYTES"] == sum(len(v) for v in dataset.values())
    assert "event=cache_block_corrupt" in m.log.read_text()


def test_deleted_index_starts_empty(bucket, dataset, mount_factory, s3server):
    m = mount_factory(bucket, *SMALL)
    verify_all(m, dataset)
    m.stop()
    shutil.rmtree(m.cache_dir / "index.lmdb")
    m.start()
    s3server.reset_counts()
    verify_all(m, dataset)
    assert gets(s3server) > 0 and m.stats()["local.blocks"] > 0


def test_capacity_is_a_hard_limit(bucket, put, mount_factory):
    cap = 16 * BS
    data = {f"big{i}": put(f"big{i}", os.urandom(12 * BS)) for i in range(4)}  # 3x the cache
    m = mount_factory(bucket, *SMALL, "--cache-size", str(cap), "--cache-min-free", "0",
                      "--cache-open-files", "4")
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            total = 0
            for p in block_files(m.cache_dir):
                try:
                    total += p.stat().st_blocks * 512  # allocated: evicted blocks are holes
                except FileNotFoundError:
                    pass
            peak[0] = max(peak[0], total)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        readers = [threading.Thread(target=lambda k=k: read_uncached(m.path / k)) for k in data]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    finally:
        stop.set()
        watcher.join()
    for k, v in data.items():
        assert read_uncached(m.path / k) == v
    m.settle()
    stats = m.stats()
    assert stats["local.used_bytes"] <= cap
    assert stats["local.evictions"] > 0
    # The watcher sums the files one after another, so it may count a block freed in one file
    # and then written into another; a file full of holes may also take a 4 KiB block for its
    # extent tree (ext4).
    assert peak[0] <= cap + BS + len(data) * 4096
    # Block files kept open between reads: at most --cache-open-files, and none of them
    # evicted (an open descriptor of an unlinked file would hold its space past the cap).
    held = daemon_block_files(m)
    assert len(held) <= 4
    assert not [p for p in held if p.endswith("(deleted)")]


def test_hot_set_survives_a_scan(bucket, put, mount_factory, s3server):
    hot = put("hot.bin", os.urandom(4 * BS))
    scan = put("scan.bin", os.urandom(64 * BS))  # 4x the cache
    m = mount_factory(bucket, *SMALL, "--cache-size", str(16 * BS), "--cache-min-free", "0")
    for _ in range(2):  # two separate uses, so the blocks count as re-used
        assert read_uncached(m.path / "hot.bin") == hot
        m.settle()
        time.sleep(CORRELATION_WINDOW + 0.2)
    assert read_uncached(m.path / "scan.bin") == scan
    m.settle()
    s3server.reset_counts()
    assert read_uncached(m.path / "hot.bin") == hot
    # With plain LRU the scan would have evicted all of hot.bin: 4 GETs here.
    assert gets(s3server) == 0


def test_single_flight(bucket, put, mount_factory, s3server):
    data = put("one.bin", os.urandom(BS))
    m = mount_factory(bucket, *SMALL)
    os.listdir(m.path)
    s3server.reset_counts()
    barrier = threading.Barrier(16)
    results = [None] * 16

    def reader(i):
        barrier.wait()
        results[i] = read_uncached(m.path / "one.bin")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == data for r in results)
    assert gets(s3server) == 1


def test_second_daemon_on_same_cache_dir_is_refused(bucket, put, mount_factory, tmp_path):
    put("x", b"x")
    m = mount_factory(bucket)
    other = tmp_path / "other"
    other.mkdir()
    proc = subprocess.run(tieredfs_cmd("mount", f"s3://{bucket}", str(other), "--endpoint-url",
                                       m.endpoint, "--cache-dir", str(m.cache_dir), "--foreground"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"in use by tieredfs pid {m.pid}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.ismount(other)


def test_cache_on_a_full_disk_still_serves_correct_bytes(bucket, put, mount_factory, tiny_tmpfs):
    data = {f"f{i}": put(f"f{i}", os.urandom(6 * BS + i)) for i in range(4)}  # 1.5 MiB
    m = mount_factory(bucket, *SMALL, "--cache-min-free", "0", cache_dir=tiny_tmpfs / "cache")
    # Leave the cache about 512 KiB of the 12 MiB tmpfs, so it runs out of space mid-way.
    st = os.statvfs(tiny_tmpfs)
    with open(tiny_tmpfs / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 512 * K))
    for _ in range(2):
        for k, v in data.items():
            assert read_uncached(m.path / k) == v
        m.settle()
    stats = m.stats()
    assert stats["local.fills"] > 0
    assert stats.get("local.disk_full", 0) + stats.get("local.declined", 0) + stats.get("local.evictions", 0) > 0


def test_kill_during_fills_then_restart_serves_correct_bytes(bucket, put, mount_factory):
    data = {f"k/f{i}": put(f"k/f{i}", os.urandom(5 * BS + i)) for i in range(12)}
    m = mount_factory(bucket, *SMALL)
    for round_ in range(3):
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                for k in data:
                    try:
                        read_uncached(m.path / k)
                    except OSError:
                        return  # the daemon is gone

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3 + 0.2 * round_)
        m.kill()
        stop.set()
        for t in threads:
            t.join()
        m.restart()
        for k, v in data.items():
            assert read_uncached(m.path / k) == v, (round_, k)
    proc = subprocess.run(tieredfs_cmd("cache", "check", "--cache-dir", str(m.cache_dir)),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cache_cli(bucket, dataset, mount_factory):
    m = mount_factory(bucket, *SMALL)
    verify_all(m, dataset)
    run = lambda *a: subprocess.run(tieredfs_cmd("cache", *a, "--cache-dir", str(m.cache_dir)),
                                    capture_output=True, text=True)
    info = run("info")
    assert info.returncode == 0 and '"blocks": 15' in info.stdout and f"pid {m.pid}" in info.stdout
    assert '"hit_ratio_since_start"' in info.stdout
    assert json.loads(info.stdout)["capacity_bytes"] == m.stats()["local.capacity_bytes"] > 15 * BS
    refused = run("clear")
    assert refused.returncode == 1 and "in use by" in refused.stderr
    with open(block_files(m.cache_dir)[0], "r+b") as victim:  # one block of one object
        victim.write(b"garbage")
    check = run("check")
    assert check.returncode == 1 and '"corrupt": 1' in check.stdout
    assert run("check", "--drop").returncode == 0
    assert run("check").returncode == 0
    m.stop()
    cleared = run("clear")
    assert cleared.returncode == 0 and "dropped 14 blocks" in cleared.stdout
    assert block_files(m.cache_dir) == []


def test_cache_dir_on_a_completely_full_disk_serves_from_s3(bucket, put, mount_factory, tiny_tmpfs):
    data = put("a.bin", os.urandom(3 * BS))
    fill_up(tiny_tmpfs)
    m = mount_factory(bucket, *SMALL, cache_dir=tiny_tmpfs / "cache")
    assert read_uncached(m.path / "a.bin") == data
    assert "event=cache_unusable" in m.log.read_text()


def test_small_random_reads_verify_the_chunks_they_read(bucket, put, mount_factory, s3server):
    data = put("r.bin", os.urandom(8 * 64 * K))  # 512 KiB: blocks of 256 KiB, chunks of 16 KiB
    m = mount_factory(bucket, "--block-size", "256K", "--small-file-threshold", "64K")
    assert read_uncached(m.path / "r.bin") == data
    m.settle()
    victim = block_files(m.cache_dir)[0]
    raw = bytearray(victim.read_bytes())
    raw[100 * K] ^= 0xFF  # in the seventh 16 KiB chunk (second 64 KiB piece) of one block
    victim.write_bytes(bytes(raw))
    s3server.reset_counts()
    fd = os.open(m.path / "r.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off in (300 * K, 20 * K, 400 * K, 100 * K, 356 * K):  # every piece, random order
            assert os.pread(fd, 4096, off) == data[off:off + 4096], off
    finally:
        os.close(fd)
    stats = m.stats()
    assert stats["local.corrupt"] == 1  # the damaged chunk was caught by a 4 KiB read
    assert s3server.counts()["GET"] == 1  # and only that block came again from S3


def test_small_reads_of_cached_pages_skip_the_worker_thread(bucket, put, mount_factory):
    """A 4 KiB read whose block file is open and in the page cache is served on the FUSE
    thread; only the first read of each block (which opens its file) goes to a worker."""
    data = put("w.bin", os.urandom(4 * BS))
    m = mount_factory(bucket, *SMALL, "--small-file-threshold", "4K")
    assert read_uncached(m.path / "w.bin") == data
    m.settle()
    before = m.stats()
    fd = os.open(m.path / "w.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        for i in range(40):
            off = (i * 7919 * 4096) % (len(data) - 4096) // 4096 * 4096
            assert os.preadv(fd, [buf := bytearray(4096)], off) == 4096 and buf == data[off:off + 4096]
    finally:
        os.close(fd)
    stats = m.stats()
    threaded = stats.get("chain.part_reads_threaded", 0) - before.get("chain.part_reads_threaded", 0)
    inline = stats.get("chain.part_reads_inline", 0) - before.get("chain.part_reads_inline", 0)
    assert threaded <= 4 and inline >= 36, (threaded, inline)


def test_a_warm_read_of_many_blocks_refetches_only_a_damaged_one(bucket, put, mount_factory, s3server):
    """A sequential re-read from tier 1 whose prefetches span many blocks (read by tier 1
    in calls of 1 MiB, each block verified alone): the right bytes, and a damaged block in
    the middle of a call comes again from S3, alone."""
    data = put("seq.bin", os.urandom(40 * BS + 123))  # 41 blocks of 64 KiB: 3 read calls
    m = mount_factory(bucket, *SMALL, "--small-file-threshold", "4K")
    assert read_uncached(m.path / "seq.bin") == data
    m.settle()
    (victim,) = block_files(m.cache_dir)
    with open(victim, "r+b") as f:
        f.seek(21 * BS + 5)  # block 21: inside the second call
        byte = f.read(1)
        f.seek(21 * BS + 5)
        f.write(bytes([byte[0] ^ 0x80]))
    fd = os.open(victim, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    before = m.stats()
    s3server.reset_counts()
    assert read_uncached(m.path / "seq.bin") == data
    stats = m.stats()
    assert stats["local.corrupt"] - before.get("local.corrupt", 0) == 1
    assert s3server.counts()["GET_BYTES"] == BS
    assert stats["local.hits"] - before.get("local.hits", 0) >= 40


def test_small_files_from_tier_1_share_worker_thread_hops(bucket, put, mount_factory, s3server):
    """A walk's next files are read from tier 1 together: fewer thread hops than files."""
    files = {f"w/d{d}/f{i:02d}": put(f"w/d{d}/f{i:02d}", os.urandom(3000 + 97 * i))
             for d in range(3) for i in range(10)}
    m = mount_factory(bucket, *SMALL)
    for key, want in sorted(files.items()):
        assert read_uncached(m.path / key) == want, key
    m.settle()
    m.restart()  # a new daemon: nothing held in memory, block files not open
    s3server.reset_counts()
    for key, want in sorted(files.items()):
        assert read_uncached(m.path / key) == want, key
    stats = m.stats()
    assert s3server.counts().get("GET", 0) == 0
    # Small files share segment files in tier 1: the first hop's reads bring their neighbours
    # into memory too (the kernel reads ahead in the segment), then read on the event loop.
    assert 0 < stats["chain.upper_hops"] < stats["chain.upper_lookups_threaded"]
    assert stats["chain.upper_hops"] <= len(files) // 10
