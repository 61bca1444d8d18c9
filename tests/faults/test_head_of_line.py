"""Scenario 12: no head-of-line blocking (issue 18, point 1).

While S3 stalls the GETs of 48 readers of cold files (O_DIRECT: each read is one
synchronous FUSE request, held by the daemon until S3 answers), what the daemon can
answer without S3 still answers at once: an O_DIRECT read of a file in tier 1, the lookup
of a name already listed, and the listing of a listed directory. Two bounds were in the
way: the daemon's FUSE task pool (32), and the kernel's max_background (12), which the
daemon raises through fusectl.
"""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tieredfs.devserver import wait_until
from tieredfs.fusectl import CONNECTIONS

from kit import BS, FAST, K, proxy, random_files, record, timed, via_proxy  # noqa: F401

pytestmark = pytest.mark.faults
READERS = 48
STALL = 12.0  # seconds each stalled GET hangs before the proxy resets it
ANSWER_BOUND = 2.0  # the bound; the stall holds the cold readers for STALL


def read_direct(path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def test_reads_the_cache_can_serve_do_not_wait_behind_stalled_s3(bucket, put, proxy, via_proxy):
    hot = random_files(put, "hot", [4 * BS, 4 * BS, 4 * BS])
    cold = random_files(put, "cold", [2 * BS + i for i in range(READERS)])
    # One stalled GET waits for the stall (no read timeout first, no deadline before it).
    mnt = via_proxy(bucket, "--s3-read-timeout", "30", "--read-deadline", "60", "--list-ttl", "300")
    hot_keys = sorted(hot)
    dev = os.stat(mnt.path).st_dev
    knob = CONNECTIONS / str((os.major(dev) << 20) | os.minor(dev)) / "max_background"
    # The kernel keeps at most max_background O_DIRECT reads at the daemon (12 by default):
    # beyond that they queue in the kernel, where no daemon can answer them.
    assert knob.exists(), "fusectl is not mounted: run scripts/dev.sh (it mounts it)"
    # Raised once the mount answers, a moment after it appears.
    assert wait_until(lambda: int(knob.read_text()) > READERS, 20), knob.read_text()
    assert read_direct(mnt.path / hot_keys[0], 4 * BS) == hot[hot_keys[0]]  # now in tier 1
    os.listdir(mnt.path / "cold")  # listed; the readers' names are known
    mnt.settle()

    proxy.add("stall", seconds=STALL)
    with ThreadPoolExecutor(READERS) as pool:
        start = time.monotonic()
        readers = {k: pool.submit(read_direct, mnt.path / k, 2 * BS) for k in cold}
        # Every S3 slot is taken by a stalled GET; the other readers queue in the daemon.
        assert wait_until(lambda: proxy.counts()["requests.GET"] >= 1 + 16, 20)
        time.sleep(0.5)  # the last readers' requests reach the daemon
        cached, cached_s = timed(read_direct, mnt.path / hot_keys[0], 4 * BS)
        # A name the kernel has not seen, in a directory listed by the lookup above.
        st, stat_s = timed(os.stat, mnt.path / hot_keys[1])
        names, list_s = timed(os.listdir, mnt.path / "hot")
        waiting = sum(not f.done() for f in readers.values())
        proxy.clear()
        results = {k: f.result(timeout=STALL + 60) for k, f in readers.items()}
        readers_s = time.monotonic() - start
    assert cached == hot[hot_keys[0]]
    assert not isinstance(st, OSError) and st.st_size == 4 * BS
    assert sorted(names) == [k.split("/")[1] for k in hot_keys]
    assert waiting == READERS  # measured while every cold reader was still held by S3
    assert all(results[k] == cold[k][:2 * BS] for k in cold)
    record("12 no head-of-line blocking", readers_held=READERS, stall_s=STALL,
           cached_read_s=cached_s, stat_s=stat_s, listdir_s=list_s, cold_readers_done_s=readers_s)
    assert cached_s < ANSWER_BOUND and stat_s < ANSWER_BOUND and list_s < ANSWER_BOUND, \
        (cached_s, stat_s, list_s)
