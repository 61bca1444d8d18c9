"""Tier 1's read path without a mount (real LMDB, real files): consecutive blocks read in one
system call and each verified alone, and the trio thread's calls that never wait for a lock
a worker holds (issue 19, warm reads)."""

import os
import threading

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.stats import Counters
from tieredfs.tiers.blockfiles import BlockFiles
from tieredfs.tiers.cachedir import CacheDir, open_index
from tieredfs.tiers.local import LocalTier
from tieredfs.tiers.local_usage import Usage

BS = 64 * 1024
HANG = 30  # seconds: only a hang takes this long


def make_tier(path):
    cache = CacheDir(path)
    cache.create()
    return LocalTier(cache, open_index(cache, 1 << 26), BlockFiles(cache.file_path, 8),
                     capacity=1 << 30, min_free=0, counters=Counters("local"))


def cached(tier, n, size=None):
    obj = ObjectVersion("b", "k", "e", size or n * BS)
    refs = [BlockRef(obj, i, BS) for i in range(n)]
    datas = [os.urandom(r.length) for r in refs]
    tier.put_many(list(zip(refs, datas)))
    return refs, datas


def counting_preadv(monkeypatch):
    calls = []
    real = os.preadv

    def preadv(fd, bufs, offset, *flags):
        calls.append(len(bufs))
        return real(fd, bufs, offset, *flags)

    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def test_consecutive_blocks_are_read_in_one_system_call_per_mib(tmp_path, monkeypatch):
    tier = make_tier(tmp_path)
    refs, datas = cached(tier, 21, size=20 * BS + 100)  # a short last block too
    calls = counting_preadv(monkeypatch)
    got = tier.get_many(refs[::-1])  # in any order
    assert [bytes(g) for g in got] == datas[::-1]
    assert calls == [16, 5]  # 16 blocks of 64 KiB make 1 MiB
    assert tier.counters.get("hits") == 21
    tier.close()


def test_a_bad_block_in_a_run_is_dropped_alone(tmp_path):
    tier = make_tier(tmp_path)
    refs, datas = cached(tier, 4)
    path = tier.cache.file_path(refs[0].file)
    with open(path, "r+b") as f:
        f.seek(2 * BS + 7)
        byte = f.read(1)
        f.seek(2 * BS + 7)
        f.write(bytes([byte[0] ^ 1]))
    got = tier.get_many(refs)
    assert [None if g is None else bytes(g) for g in got] == [datas[0], datas[1], None, datas[3]]
    assert tier.counters.get("corrupt") == 1
    assert tier.index.locate(bytes.fromhex(refs[2].id)) is None  # dropped: S3 refills it
    tier.close()


def test_a_file_cut_short_serves_only_the_blocks_it_still_holds(tmp_path):
    tier = make_tier(tmp_path)
    refs, datas = cached(tier, 4)
    os.truncate(tier.cache.file_path(refs[0].file), BS + BS // 2)
    got = tier.get_many(refs)
    assert bytes(got[0]) == datas[0] and got[1:] == [None, None, None]
    assert tier.counters.get("corrupt") == 3
    tier.close()


def test_a_missing_file_is_a_miss_for_each_of_its_blocks(tmp_path):
    tier = make_tier(tmp_path)
    refs, _ = cached(tier, 3)
    os.unlink(tier.cache.file_path(refs[0].file))
    assert tier.get_many(refs) == [None, None, None]
    assert tier.counters.get("corrupt") == 3
    tier.close()


def in_thread(fn):
    """fn() in another thread, which must finish (a call that waited for the lock this
    thread holds would not)."""
    result = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(HANG)
    assert not t.is_alive(), "the call waited for a lock held elsewhere"
    return result[0]


def test_a_read_that_may_not_wait_does_not_wait_for_the_descriptor_lock(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * BS)
    files = BlockFiles(lambda name: tmp_path / name, limit=4)
    assert files.read("f", 0, 10, wait=True) == b"x" * 10  # open, pages in memory
    assert files.read("f", 0, 10, wait=False) == b"x" * 10
    with files._lock:  # as a worker thread holding it would
        assert in_thread(lambda: files.read("f", 0, 10, wait=False)) is None
    assert files.read("f", 0, 10, wait=False) == b"x" * 10
    files.close_all()


def test_a_release_that_could_not_wait_is_settled_by_the_next_holder(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * BS)
    files = BlockFiles(lambda name: tmp_path / name, limit=4)
    handle = files._acquire("f", may_open=True)
    with files._lock:
        in_thread(lambda: files._release(handle, wait=False))
        assert handle.users == 1  # queued, not lost
    files.forget("f")  # the next holder settles it: the descriptor is closed, no reader holds it
    assert handle.users == 0
    try:
        os.fstat(handle.fd)
        closed = False
    except OSError:
        closed = True
    assert closed


def test_a_hit_on_the_trio_thread_does_not_wait_for_the_usage_lock():
    usage = Usage()
    with usage._lock:
        assert in_thread(lambda: usage.hit(b"a" * 16, may_flush=False)) is False
    assert usage.take() == {}  # that hit went unrecorded; only eviction order can suffer
    usage.hit(b"a" * 16, may_flush=False)
    assert usage.take() == {b"a" * 16: 1}


def test_a_checksum_lookup_does_not_wait_for_the_lock_of_the_kept_sums(tmp_path):
    tier = make_tier(tmp_path)
    refs, datas = cached(tier, 1)
    block_id = bytes.fromhex(refs[0].id)
    tier.index._sums.clear()
    with tier.index._sums_lock:
        found = in_thread(lambda: tier.index.locate(block_id))
    assert found is not None and found[0] == BS
    assert block_id not in tier.index._sums  # not kept this time
    tier.index.locate(block_id)
    assert block_id in tier.index._sums
    tier.close()
