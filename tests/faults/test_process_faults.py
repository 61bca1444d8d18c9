"""Scenarios 6-7: the daemon killed mid-work, and its cache disk full or damaged behind its back.

tests/test_cache.py already covers damage to an idle cache, a full disk before reads
and three kills; these add what happens *while* readers and fills are running.
"""

import errno
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import tieredfs_cmd
from kit import BS, FAST, K, proxy, random_files, read_uncached, record, timed, via_proxy  # noqa: F401 (fixtures)
from tieredfs.devserver import wait_until
from test_cache import block_files

pytestmark = pytest.mark.faults


class Readers:
    """Threads re-reading `files` until stopped; every completed read is checked at once."""

    def __init__(self, mnt, files: dict[str, bytes], threads: int = 4):
        self.mnt, self.files = mnt, files
        self.stop = threading.Event()
        self.ok = self.errors = 0
        self.wrong: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, seed: int):
        keys = sorted(self.files)
        random.Random(seed).shuffle(keys)
        while not self.stop.is_set():
            for k in keys:
                try:
                    got = read_uncached(self.mnt.path / k)
                except OSError:
                    with self._lock:
                        self.errors += 1
                    continue
                with self._lock:
                    if got == self.files[k]:
                        self.ok += 1
                    else:
                        self.wrong.append(k)


def cache_check(cache_dir) -> subprocess.CompletedProcess:
    return subprocess.run(tieredfs_cmd("cache", "check", "--cache-dir", str(cache_dir)),
                          capture_output=True, text=True, timeout=60)


def test_kill_9_five_times_under_reads_and_fills(bucket, put, mount_factory):
    files = random_files(put, "k", [5 * BS + i * K for i in range(16)])
    # A cache of 16 blocks for 96 blocks of data: fills and evictions never stop.
    mnt = mount_factory(bucket, *FAST, "--cache-size", str(16 * BS))
    ok = 0
    rng = random.Random(6)  # kill times are seeded: a failure can be replayed
    for round_ in range(5):
        with Readers(mnt, files, threads=6) as readers:
            time.sleep(rng.uniform(0.4, 1.2))
            mnt.kill()
        assert readers.wrong == [], (round_, readers.wrong)
        ok += readers.ok
        with pytest.raises(OSError):  # a dead mount answers ENOTCONN, never stale bytes
            read_uncached(mnt.path / "k/f0.bin")
        if round_ % 2:  # `tieredfs umount`, then a mount
            umount = subprocess.run(tieredfs_cmd("umount", str(mnt.path)), capture_output=True, text=True)
            assert umount.returncode == 0, umount.stderr
            assert not os.path.ismount(mnt.path) and os.listdir(mnt.path) == []
        mnt.start()  # over the dead mount in even rounds: the daemon detaches it
        for k, v in files.items():
            assert read_uncached(mnt.path / k) == v, (round_, k)
    mnt.stop()
    check = cache_check(mnt.cache_dir)
    report = json.loads(check.stdout)
    assert check.returncode == 0 and report["corrupt"] == 0 and report["checked"] > 0, check.stdout
    assert not os.path.ismount(mnt.path)
    total = sum(map(len, files.values()))
    record("6 kill -9 x5", kills=5, reads_ok_before_kills=ok, wrong=len(readers.wrong),
           files_verified_after_each=len(files), cache_blocks_checked=report["checked"],
           cache_blocks_corrupt=report["corrupt"], bytes_verified=ok * total // len(files) + 5 * total)


def vandalize(cache_dir, stop: threading.Event, rng: random.Random) -> int:
    """Flip, truncate, delete or overwrite random block files until stopped."""
    done = 0
    while not stop.is_set():
        victims = block_files(cache_dir)
        if not victims:
            time.sleep(0.01)
            continue
        p = rng.choice(victims)
        try:
            how = rng.randrange(4)
            if how == 0:
                raw = bytearray(p.read_bytes())
                raw[rng.randrange(len(raw))] ^= 0x40
                p.write_bytes(bytes(raw))
            elif how == 1:
                os.truncate(p, p.stat().st_size // 3)
            elif how == 2:
                p.unlink()
            else:
                p.write_bytes(os.urandom(p.stat().st_size))
            done += 1
        except (OSError, ValueError):
            pass  # the daemon dropped or evicted it first
        time.sleep(0.005)
    return done


def test_cache_files_damaged_while_being_read(bucket, put, mount_factory):
    files = random_files(put, "v", [3 * BS + i for i in range(8)])
    mnt = mount_factory(bucket, *FAST)
    box = {}
    stop = threading.Event()
    vandal = threading.Thread(target=lambda: box.update(n=vandalize(mnt.cache_dir, stop, random.Random(1))))
    with Readers(mnt, files) as readers:
        vandal.start()
        time.sleep(4)
        stop.set()
        vandal.join()
    assert readers.wrong == [] and readers.errors == 0 and readers.ok > len(files)
    stats = mnt.stats()
    assert stats["local.corrupt"] > 0 and box["n"] > 0
    for k, v in files.items():
        assert read_uncached(mnt.path / k) == v
    record("7a cache files damaged during reads", damaged=box["n"], detected=stats["local.corrupt"],
           reads_ok=readers.ok, wrong=len(readers.wrong),
           bytes_verified=readers.ok * sum(map(len, files.values())) // len(files))


def test_cache_disk_fills_up_during_reads_then_frees(bucket, put, mount_factory, tiny_tmpfs):
    files = random_files(put, "d", [4 * BS + i for i in range(8)])  # 2 MiB, in a 12 MiB tmpfs
    mnt = mount_factory(bucket, *FAST, "--cache-size", str(24 * BS), cache_dir=tiny_tmpfs / "cache")
    filler = tiny_tmpfs / "filler"
    # The cache looks at the disk at most once a second, when it makes room (the working set
    # is larger than the cache, so it keeps making room). Whether the disk runs out under a
    # write (disk_full), leaves a fill no room (declined) or is seen first (room made by
    # evicting) depends on when that look falls, so the test waits for the look itself.
    disk_free = lambda: mnt.stats().get("local.disk_free_bytes", 0)
    with Readers(mnt, files) as readers:
        assert wait_until(lambda: disk_free() > 8 << 20, 10), "the cache never looked at its disk"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass  # the cache disk is full now
        # Full, but for what the cache frees by evicting and has not filled again yet.
        assert wait_until(lambda: disk_free() < 2 << 20, 10), "the cache never saw its disk full"
        time.sleep(1)  # reads go on against the full disk
        full = mnt.stats()
        filler.unlink()
        assert wait_until(lambda: disk_free() > 8 << 20, 10), "the cache never saw the space again"
        time.sleep(0.5)
    after = mnt.stats()
    assert readers.wrong == [] and readers.errors == 0 and readers.ok > len(files)
    assert after["local.capacity_bytes"] == 24 * BS
    assert after["local.fills"] > full["local.fills"], "no fills after the disk had room again"
    record("7b cache disk full during reads", reads_ok=readers.ok, wrong=len(readers.wrong),
           disk_full=full.get("local.disk_full", 0), declined=full.get("local.declined", 0),
           fills_after_freeing=after["local.fills"] - full["local.fills"],
           capacity_when_full=full["local.capacity_bytes"])


def test_sigterm_lets_a_read_waiting_on_s3_finish_then_unmounts(bucket, put, via_proxy, proxy):
    data = put("slow.bin", os.urandom(40 * BS))  # over the small-file size: not fetched at open
    mnt = via_proxy(bucket)
    fd = os.open(mnt.path / "slow.bin", os.O_RDONLY)
    try:
        proxy.add("latency", seconds=1.0)  # every GET from now on is answered 1 s late
        gets = proxy.counts()["requests.GET"]
        result = {}
        reader = threading.Thread(target=lambda: result.update(got=timed(os.pread, fd, BS, 0)))
        reader.start()
        assert wait_until(lambda: proxy.counts()["requests.GET"] > gets, 30)  # the read waits on S3
        os.kill(mnt.pid, signal.SIGTERM)
        reader.join(60)
        assert not reader.is_alive(), "a read in flight hung across SIGTERM"
        got, seconds = result["got"]
        assert got == data[:BS], got  # drained: the read in flight got its bytes
        assert mnt.proc.wait(30) == 0 and not os.path.ismount(mnt.path)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(OSError) as after:  # the mount is gone: the open file cannot read on
            os.pread(fd, BS, 30 * BS)
        assert after.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the kernel answers FLUSH on a closed connection with ENOTCONN
