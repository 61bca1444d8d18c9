"""Eviction order and capacity of the local tier, without a mount (real LMDB, real files)."""

import errno
import mmap
import os
import threading

import pytest

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.errors import CacheIndexFull
from tieredfs.index import MAIN, SMALL, BlockIndex, map_size_for
from tieredfs.stats import Counters
from tieredfs.tiers import local as local_mod
from tieredfs.tiers import local_upkeep, local_usage
from tieredfs.tiers.blockfiles import BlockFiles
from tieredfs.tiers.cachedir import CacheDir, open_index
from tieredfs.tiers.local import LocalTier

BS = 4096


def ids(n, start=0):
    return [i.to_bytes(16, "big") for i in range(start, start + n)]


@pytest.fixture
def index(tmp_path):
    idx = BlockIndex(tmp_path / "index.lmdb", 1 << 26)
    yield idx
    idx.env.close()


def fill(index, block_ids, capacity, hits=None):
    """Each block its own file here; the ids of the blocks evicted meanwhile."""
    evicted = []
    for b in block_ids:
        evicted += [r.block_id for r in index.make_room(BS, capacity, hits or {})]
        index.insert(b, BS, b"", b, 0)
    return evicted


def test_fifo_order_without_reuse(index):
    blocks = ids(20)
    evicted = fill(index, blocks, 10 * BS)
    assert evicted == blocks[:10]  # oldest first
    assert index.totals()["used_bytes"] == 10 * BS


def test_reused_block_survives_a_scan_that_would_flush_lru(index):
    capacity = 20 * BS
    hot = ids(4, start=1000)
    fill(index, hot, capacity)
    index.apply_hits({b: 1 for b in hot})  # read again after their first use
    scan = ids(200)
    fill(index, scan, capacity)
    for b in hot:
        e = index.lookup(b)
        assert e is not None and e.queue == MAIN, "hot block was flushed by a one-pass scan"
    # An LRU of the same size would keep only the last 20 scanned blocks.
    assert index.totals()["used_bytes"] <= capacity


def test_ghost_readmission_goes_to_main(index):
    capacity = 10 * BS
    fill(index, ids(15), capacity)
    first = ids(1)[0]
    assert index.lookup(first) is None
    fill(index, [first], capacity)
    assert index.lookup(first).queue == MAIN


def test_new_blocks_enter_small_queue(index):
    fill(index, ids(3), 100 * BS)
    assert {index.lookup(b).queue for b in ids(3)} == {SMALL}


def test_blocks_of_one_file_are_counted(index):
    file = b"f" * 16
    for i, b in enumerate(ids(3)):
        index.insert(b, BS, b"", file, i * BS)
    first, second = index.remove(ids(2))
    assert (first.file, first.offset, first.last_in_file) == (file, 0, False)
    assert (second.offset, second.last_in_file) == (BS, False)
    assert index.file_in_use(file)
    assert index.remove(ids(2)) == []  # gone already
    last, = index.remove(ids(1, start=2))
    assert last.last_in_file and not index.file_in_use(file)


def test_remove_and_clear_account_bytes(index):
    fill(index, ids(5), 100 * BS)
    index.remove(ids(2))
    assert index.totals()["blocks"] == 3 and index.totals()["used_bytes"] == 3 * BS
    index.clear()
    assert index.totals() == {"used_bytes": 0, "small_bytes": 0, "main_bytes": 0, "blocks": 0, "ghosts": 0}


def make_tier(path, capacity, min_free=0):
    cache = CacheDir(path)
    cache.create()
    return LocalTier(cache, open_index(cache, 1 << 26), BlockFiles(cache.file_path, 8), capacity=capacity,
                     min_free=min_free, counters=Counters("local"))


def refs(n, key="k", etag="e"):
    obj = ObjectVersion("b", key, etag, n * BS)
    return [BlockRef(obj, i, BS) for i in range(n)]


def place_of(tier, ref):
    """The file holding a block: its object's, or a segment for a small whole object."""
    return tier.cache.file_path(tier.index.locate(bytes.fromhex(ref.id)).file)


def du(path):
    """Disk space the cache's files take (their holes not counted)."""
    total = 0
    for d, _, files in os.walk(path / "blocks"):
        for f in files:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass  # evicted while we walked
    return total


def test_concurrent_fills_never_exceed_capacity(tmp_path):
    capacity = 32 * BS
    tier = make_tier(tmp_path, capacity)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], du(tmp_path))

    watcher = threading.Thread(target=watch)
    watcher.start()
    all_refs = refs(200) + refs(200, key="k2")  # two files, their blocks freed by punching holes

    def writer(part):
        for r in part:
            tier.put(r, os.urandom(BS))

    threads = [threading.Thread(target=writer, args=(all_refs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert tier.index.totals()["used_bytes"] <= capacity
    # A sparse file full of holes may need a block for its extent tree (ext4): 4 KiB per file.
    slack = 2 * 4096
    assert du(tmp_path) <= capacity + slack
    # Bytes being written are reserved first, and evicted ones freed before that returns.
    assert peak[0] <= capacity + 8 * BS + slack
    assert tier.counters.get("punch_errors") == 0
    tier.close()


def test_get_verifies_and_drops_corrupt_block(tmp_path):
    tier = make_tier(tmp_path, 100 * BS)
    r = refs(1)[0]
    data = os.urandom(BS)
    tier.put(r, data)
    assert tier.get(r) == data
    path = place_of(tier, r)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert tier.get(r) is None
    assert tier.counters.get("corrupt") == 1
    assert not path.exists() and tier.index.lookup(bytes.fromhex(r.id)) is None  # its only block
    tier.close()


def test_blocks_of_one_object_share_a_file_and_free_their_holes(tmp_path):
    tier = make_tier(tmp_path, 4 * BS)
    six = refs(6)
    datas = [os.urandom(BS) for _ in six]
    for r, data in zip(six, datas):
        tier.put(r, data)
    path = tier.cache.file_path(six[0].file)
    assert [p.name for p in (tmp_path / "blocks").rglob("*") if p.is_file()] == [path.name]
    assert path.stat().st_size == 6 * BS
    assert path.stat().st_blocks * 512 <= 4 * BS  # the two evicted blocks are holes
    assert [tier.get(r) for r in six] == [None, None] + datas[2:]
    assert tier.counters.get("corrupt") == 0  # a hole is not corruption: not indexed
    tier.index.remove([bytes.fromhex(r.id) for r in six])  # as `cache check --drop` would
    tier.close()


def test_a_read_racing_an_eviction_is_a_miss_not_corruption(tmp_path):
    tier = make_tier(tmp_path, 100 * BS)
    r = refs(2)[0]
    tier.put(r, os.urandom(BS))
    assert tier.get(r) is not None  # its checksums are now kept in memory
    removed = tier.index.remove([bytes.fromhex(r.id)])
    tier.files.punch(r.file, 0, BS)  # evicted as the read below was on its way
    tier._drop(bytes.fromhex(r.id), "checksum mismatch")
    assert removed and tier.counters.get("corrupt") == 0
    tier.close()


def test_reads_within_one_use_are_not_reuse(tmp_path, monkeypatch):
    tier = make_tier(tmp_path, 100 * BS)
    r = refs(1)[0]
    tier.put(r, os.urandom(BS))
    for _ in range(8):  # e.g. the kernel's pieces of one block
        tier.get(r)
    assert tier.usage.take() == {}
    monkeypatch.setattr(local_usage, "CORRELATION_WINDOW", 0.0)
    tier.get(r)
    assert tier.usage.take() == {bytes.fromhex(r.id): 1}
    tier.close()


def disk_full_from(limit: int):
    """os.pwritev of a disk that fills at byte `limit` of the file: a short write up to it,
    then ENOSPC, as the kernel does. ENOSPC cannot be had on demand here: simulated."""
    real_pwritev = os.pwritev

    def pwritev(fd, buffers, offset):
        if offset >= limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        room, fitting = limit - offset, []
        for b in buffers:
            fitting.append(memoryview(b)[:room])
            room -= len(fitting[-1])
        return real_pwritev(fd, [b for b in fitting if len(b)], offset)

    return pwritev


def test_a_failed_write_gives_its_space_back(tmp_path, monkeypatch):
    tier = make_tier(tmp_path, 100 * BS)
    first, second = refs(2)
    tier.put(first, os.urandom(BS))
    monkeypatch.setattr(os, "pwritev", disk_full_from(BS + BS // 2))
    tier.put(second, os.urandom(BS))
    assert tier.counters.get("disk_full") == 1
    path = tier.cache.file_path(first.file)
    assert path.stat().st_blocks * 512 <= BS  # the half-written block is a hole again
    assert tier.get(second) is None and tier.get(first) is not None
    tier.close()


def test_a_batch_is_stored_together_and_each_block_once(tmp_path):
    tier = make_tier(tmp_path, 100 * BS)
    a, b = refs(3, key="a"), refs(2, key="b")
    datas = {r.id: os.urandom(BS) for r in a + b}
    tier.put(a[0], datas[a[0].id])
    batch = [(r, datas[r.id]) for r in (b[1], a[0], a[2], b[0], a[1], a[2])]  # a cached one, a repeat
    tier.put_many(batch)
    assert tier.counters.get("fills") == 1 + 4
    assert all(tier.get(r) == datas[r.id] for r in a + b)
    assert len([p for p in (tmp_path / "blocks").rglob("*") if p.is_file()]) == 2
    tier.close()


def test_a_batch_bigger_than_the_cache_is_stored_block_by_block(tmp_path):
    tier = make_tier(tmp_path, 4 * BS)
    six = refs(6)
    tier.put_many([(r, os.urandom(BS)) for r in six])
    assert tier.counters.get("fills") == 6 and tier.counters.get("evictions") == 2
    assert tier.index.totals()["used_bytes"] == 4 * BS
    tier.close()


def test_an_error_in_a_batch_keeps_the_blocks_written_before_it(tmp_path, monkeypatch):
    tier = make_tier(tmp_path, 100 * BS)
    three = refs(3)
    monkeypatch.setattr(os, "pwritev", disk_full_from(2 * BS + BS // 2))
    tier.put_many([(r, os.urandom(BS)) for r in three])
    assert tier.counters.get("fills") == 2 and tier.counters.get("disk_full") == 1
    assert [tier.get(r) is not None for r in three] == [True, True, False]
    assert tier.room.reserved == 0 and tier.room.filling == {}
    tier.close()


def test_min_free_lowers_capacity(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    # The disk is "full" for us; 1 GiB over what is free: other processes share the disk.
    tier = make_tier(tmp_path, 100 * BS, min_free=free + (1 << 30))
    r = refs(1)[0]
    tier.put(r, os.urandom(BS))
    assert tier.get(r) is None
    assert tier.counters.get("declined") == 1
    tier.close()


def test_unreadable_index_is_moved_aside(tmp_path):
    cache = CacheDir(tmp_path)
    cache.create()
    cache.index.mkdir()
    (cache.index / "data.mdb").write_bytes(b"\xde\xad" * 8192)
    earlier = tmp_path / "index.lmdb.corrupt-1"  # moved aside by an earlier start
    earlier.mkdir()
    idx = open_index(cache, 1 << 26)
    assert idx.totals()["blocks"] == 0
    asides = [p for p in tmp_path.iterdir() if p.name.startswith("index.lmdb.corrupt-")]
    assert len(asides) == 1 and asides[0] != earlier  # only the last one is kept
    assert (asides[0] / "data.mdb").read_bytes() == b"\xde\xad" * 8192
    idx.env.close()


def test_sweep_removes_orphans_only(tmp_path, monkeypatch):
    tier = make_tier(tmp_path, 100 * BS)
    kept = refs(1)[0]
    tier.put(kept, os.urandom(BS))
    kept_path = place_of(tier, kept)
    orphan = kept_path.with_name("ab" * 16)  # e.g. a block file of format 3, by its block id
    orphan.write_bytes(b"x")
    temp = kept_path.with_name(kept.id + ".tmp-1-2")  # format 3 wrote temp files
    temp.write_bytes(b"y")
    old_layout = kept_path.parent / "cd"  # blocks/ab/cd/<id>, as caches before format 3 had
    old_layout.mkdir()
    (old_layout / ("cd" * 16)).write_bytes(b"z")
    filling = kept_path.with_name("ef" * 16)  # a fill writing its first block: not yet indexed
    filling.write_bytes(b"w")
    tier.room.filling["ef" * 16] = 1
    monkeypatch.setattr(local_upkeep, "_ORPHAN_AGE", -1.0)
    assert tier.sweep_dir(kept_path.parent) == 3
    assert kept_path.exists() and filling.exists() and not orphan.exists() and not temp.exists()
    assert not old_layout.exists()
    tier.close()


def test_an_index_of_an_older_format_starts_empty(tmp_path, caplog):
    import lmdb  # only to write an index as the previous format did: no format key

    cache = CacheDir(tmp_path)
    cache.create()
    env = lmdb.open(str(cache.index), map_size=1 << 26, max_dbs=5, subdir=True)
    blocks = env.open_db(b"blocks")
    with env.begin(write=True) as txn:
        txn.put(b"x" * 16, b"old entry", db=blocks)
    env.close()
    index = open_index(cache, 1 << 26)
    try:
        assert index.totals()["blocks"] == 0
        assert not list(tmp_path.glob("index.lmdb.*"))  # nothing to investigate: not kept
        assert "event=cache_index_format_changed" in caplog.text
        assert "is of format 1, this version uses 4" in caplog.text
    finally:
        index.env.close()


def test_consecutive_blocks_of_a_batch_are_written_in_one_system_call(tmp_path, monkeypatch):
    """In a busy daemon every call that lets the GIL go costs a wait to get it back."""
    tier = make_tier(tmp_path, 100 * BS)
    calls = []
    real_pwritev = os.pwritev

    def counting(fd, buffers, offset):  # a spy: the real write, counted
        calls.append(len(buffers))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counting)
    blocks = refs(6)
    datas = [mmap.mmap(-1, BS) for _ in blocks]  # page-aligned, as blocks from S3 are
    for d in datas:
        d[:] = os.urandom(BS)
    tier.put_many([(r, d) for r, d in zip(blocks, datas) if r.index != 3])  # runs 0-2 and 4-5
    assert calls == [3, 2]
    assert all(tier.get(r) == bytes(d) for r, d in zip(blocks, datas) if r.index != 3)
    tier.close()


@pytest.mark.parametrize("block_size", [4 << 20, 64 << 20])
def test_the_map_holds_a_full_cache_of_large_blocks(tmp_path, block_size):
    """Issue 18: ~2 KiB per block was the estimate, but a 4 MiB block has 2 KiB of chunk sums
    alone (64 MiB: 32 KiB), in overflow pages. A cache of 400 blocks, filled twice over
    (eviction, ghosts), fits the map sized for it; the old estimate's map does not."""
    blocks = 400
    sums = bytes(8 * (block_size // (16 << 10)))

    def fill_twice(map_size):
        idx = BlockIndex(tmp_path / f"i{map_size}", map_size)
        try:
            for i in range(2 * blocks):
                idx.make_room(block_size, blocks * block_size, {})
                idx.insert(i.to_bytes(16, "big"), block_size, sums, (i % 7).to_bytes(16, "big"), 0)
            return idx.totals()["blocks"]
        finally:
            idx.env.close()

    assert fill_twice(map_size_for(blocks * block_size, block_size, least=0)) == blocks
    with pytest.raises(CacheIndexFull):
        fill_twice(blocks * 2048)


def test_an_index_that_fails_is_a_miss_and_a_declined_fill(tmp_path, caplog, monkeypatch):
    """Every LMDB call failing (here: its environment closed under the tier, a real
    lmdb.Error): lookups miss, fills are declined, the sweep removes nothing, stats still
    answer; counted, and logged once."""
    tier = make_tier(tmp_path, 100 * BS)
    cached, new = refs(2)
    tier.put(cached, os.urandom(BS))
    tier.index._sums.clear()  # the in-memory sums would answer without LMDB
    tier.index.env.close()
    assert tier.get(cached) is None and tier.get_part(cached, 0, 100) is None
    assert tier.peek(cached) is local_mod.Peek.ABSENT
    tier.put(new, os.urandom(BS))
    monkeypatch.setattr(local_upkeep, "_ORPHAN_AGE", -1.0)
    assert tier.sweep_dir(tier.cache.file_path(cached.file).parent) == 0
    assert tier.cache.file_path(cached.file).exists()
    assert "local.used_bytes" not in tier.gauges()
    assert tier.counters.get("index_errors") >= 4
    assert caplog.text.count("event=cache_index_errors") == 1
    tier.files.close_all()


def small_objects(n: int, first: int = 1000):
    """n whole objects of odd sizes (none a multiple of a page), one block each."""
    objs = [ObjectVersion("b", f"small/{i}", "e", first + 37 * i) for i in range(n)]
    return [BlockRef(o, 0, BS) for o in objs], [os.urandom(o.size) for o in objs]


def block_files(path):
    return [p for p in (path / "blocks").rglob("*") if p.is_file()]


def test_small_whole_objects_share_a_segment_read_after_a_restart_and_evicted_alone(tmp_path):
    tier = make_tier(tmp_path, 100 * BS)
    small, datas = small_objects(12)
    tier.put_many(list(zip(small[:6], datas[:6])))
    tier.put_many(list(zip(small[6:], datas[6:])))
    (segment,) = block_files(tmp_path)  # one file for the twelve, not one each
    assert {place_of(tier, r) for r in small} == {segment}
    tier.close()
    tier = make_tier(tmp_path, 100 * BS)  # a restart: the places come from the index
    assert [bytes(tier.get(r)) for r in small] == datas
    assert [bytes(tier.get_part(r, 10, 20)) for r in small] == [d[10:20] for d in datas]
    taken = tier.index.remove([bytes.fromhex(small[3].id)])
    allocated = segment.stat().st_blocks
    with tier.room.lock:
        tier.room.free(taken[0])  # a hole where it was (its whole page); the others stay
    assert tier.get(small[3]) is None and segment.exists()
    assert segment.stat().st_blocks * 512 == allocated * 512 - 4096
    assert [bytes(tier.get(r)) for i, r in enumerate(small) if i != 3] == datas[:3] + datas[4:]
    for removed in tier.index.remove([bytes.fromhex(r.id) for r in small]):
        with tier.room.lock:
            tier.room.free(removed)
    assert not segment.exists()  # with its last object
    tier.close()


def test_a_padded_write_into_a_segment_leaves_what_lies_beyond_it(tmp_path):
    """O_DIRECT writes a short object padded to a page; in an object's own file the padding
    is cut off, in a segment it must not be: a later object may already be written there
    (four cache writers place and write their batches concurrently)."""
    from tieredfs.tiers.local_writes import Placed, write_blocks

    files = BlockFiles(lambda name: tmp_path / name, 8)
    first, later = os.urandom(1000), os.urandom(3000)
    write_blocks(files, [(Placed("b" * 32, "s" * 32, 4096, len(later), shared=True), later)])
    write_blocks(files, [(Placed("a" * 32, "s" * 32, 0, len(first), shared=True), first)])
    assert bytes(files.read("s" * 32, 0, 1000, wait=True)) == first
    assert bytes(files.read("s" * 32, 4096, 3000, wait=True)) == later
    files.close_all()
