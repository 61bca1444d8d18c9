"""The buffer pool: a buffer is reused only once no view of it is left (whichever thread drops
the last one), at most `keep` bytes wait for reuse, and trim() gives back what sat unused."""

import gc
import threading

from tieredfs.memory import PAGE, BufferPool, address

M = 1024 * 1024


def test_a_buffer_is_reused_only_after_its_last_view_is_gone():
    pool = BufferPool(keep=4 * M)
    first = pool.take(M)
    where = address(first)
    first[:5] = b"hello"
    part = first[:5]
    del first
    other = pool.take(M)  # a slice still holds the first buffer: this one is another
    assert address(other) != where
    assert bytes(part) == b"hello"
    del part
    again = pool.take(M)
    assert address(again) == where
    assert pool.counters.snapshot() == {"memory.pool_new": 2, "memory.pool_reused": 1}


def test_a_take_that_may_not_wait_never_waits_for_the_pools_lock():
    """The trio thread's take (a begun GET's buffer): with the lock held by another thread,
    or no buffer of the size free, it is a new heap buffer at once, of the right size."""
    pool = BufferPool(keep=4 * M)
    pooled = pool.take(M)
    del pooled  # one free buffer of 1 MiB
    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with pool._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert held.wait(10)
        busy = pool.take(M, wait=False)
        assert len(busy) == M and address(busy) % PAGE == 0
        assert pool.counters.get("pool_reused") == 0  # not the free one: that needed the lock
    finally:
        release.set()
        holder.join()
    assert address(pool.take(M, wait=False)) is not None and pool.counters.get("pool_reused") == 1
    fresh = pool.take(2 * M, wait=False)  # none free of this size: not mapped here
    assert len(fresh) == 2 * M and pool.counters.get("pool_new") == 1


def test_buffers_are_page_aligned_and_exactly_the_size_asked():
    pool = BufferPool(keep=4 * M)
    for n in (64 * 1024, M, M + 1, 300_001):
        view = pool.take(n)
        assert len(view) == n and address(view) % PAGE == 0
        view[-1:] = b"x"  # writable to its last byte


def test_small_buffers_are_not_pooled():
    pool = BufferPool(keep=4 * M)
    view = pool.take(4096)
    assert len(view) == 4096
    del view
    assert pool.counters.snapshot() == {}
    assert pool.gauges()["memory.pool_free_bytes"] == 0


def test_at_most_keep_bytes_wait_for_reuse():
    pool = BufferPool(keep=3 * M)
    views = [pool.take(M) for _ in range(8)]
    assert pool.gauges() == {"memory.pool_free_bytes": 0, "memory.pool_lent_bytes": 8 * M}
    del views
    assert pool.gauges() == {"memory.pool_free_bytes": 3 * M, "memory.pool_lent_bytes": 0}


def test_views_dropped_in_other_threads_come_back():
    pool = BufferPool(keep=64 * M)
    views = [pool.take(M) for _ in range(32)]
    addresses = {address(v) for v in views}

    def drop(mine):
        mine.clear()

    threads = [threading.Thread(target=drop, args=(views[i::4],)) for i in range(4)]
    del views
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.gauges()["memory.pool_free_bytes"] == 32 * M
    again = [pool.take(M) for _ in range(32)]
    assert {address(v) for v in again} == addresses


def test_trim_gives_back_what_no_take_needed_since_the_last_trim():
    pool = BufferPool(keep=16 * M)
    views = [pool.take(M) for _ in range(6)]
    del views
    assert pool.trim() == 0  # just returned: the first trim only starts the count
    busy = [pool.take(M) for _ in range(2)]  # 2 of the 6 were needed since
    assert pool.trim() == 4 * M
    assert pool.gauges()["memory.pool_free_bytes"] == 0
    del busy
    assert pool.trim() == 0
    assert pool.trim() == 2 * M


def test_a_buffer_freed_by_the_garbage_collector_comes_back():
    pool = BufferPool(keep=4 * M)

    class Node:
        pass

    node = Node()
    node.buffer, node.me = pool.take(M), node  # a cycle: only the collector frees it
    where = address(node.buffer)
    del node
    gc.collect()
    assert pool.gauges() == {"memory.pool_free_bytes": M, "memory.pool_lent_bytes": 0}
    assert address(pool.take(M)) == where


def test_trim_gives_back_the_heap_pages_small_blocks_left():
    """Small files' blocks come from malloc, whose heap gives back only its top: in a new
    process (its own heap), 96 MiB of 32 KiB buffers freed in an order that leaves the top
    in use stay resident until trim() returns the free pages in between."""
    import subprocess
    import sys

    script = """
import ctypes, ctypes.util
from tieredfs.memory import BufferPool, tune_malloc
tune_malloc()
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
pool = BufferPool(keep=0)
bufs = [pool.take(32 * 1024) for _ in range(3072)]
for b in bufs:
    b[:] = b"x" * len(b)
keep = bufs[-1]  # the top of the heap stays in use
del bufs[:-1]
before = rss()
pool.trim()
print(before, rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 64 * 1024, (before, after)  # kB: most of the 96 MiB went back
