"""The write-behind cache fill under a cache disk that stops answering.

A hung disk cannot be made on demand here, so the tier below is a stand-in whose put()
blocks until the test lets it go (the one stand-in in this file); everything else is the
real Filler running under trio.
"""

import threading
import time

import trio

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.stats import Counters
from tieredfs.tiers.filler import Filler

BS = 1024
OBJ = ObjectVersion("b", "k", "e", 64 * BS)


class HungDisk:
    """Stand-in for a cache disk whose writes block until released."""

    name = "local"

    def __init__(self):
        self.released = threading.Event()
        self.stored: dict[str, bytes] = {}

    def put(self, ref, data):
        self.released.wait(30)
        self.stored[ref.id] = bytes(data)

    def put_many(self, items):
        for ref, data in items:
            self.put(ref, data)


def ref(i: int) -> BlockRef:
    return BlockRef(OBJ, i, BS)


async def release_and_drain(disk: HungDisk, filler: Filler) -> None:
    """Let the disk answer again, then wait until everything queued is written."""
    disk.released.set()
    with trio.fail_after(10):
        await filler.flush()
        while filler.gauges()["chain.fill_queue_bytes"]:
            await trio.sleep(0.01)


def test_a_stalled_cache_disk_costs_one_bounded_wait_then_reads_go_on():
    disk = HungDisk()
    counters = Counters("chain")
    filler = Filler([disk], max_bytes=4 * BS, max_wait=0.5, writers=2,
                    limiter=trio.CapacityLimiter(4), counters=counters)
    waits = []

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(filler.run)
            for i in range(4):  # fills the queue; the writers take what is queued and hang
                await filler.offer(ref(i), bytes([i]) * BS)
            assert filler.pending(ref(0)) == bytes([0]) * BS  # served while unwritten
            for i in range(4, 8):
                start = time.monotonic()
                await filler.offer(ref(i), bytes([i]) * BS)
                waits.append(time.monotonic() - start)
            await release_and_drain(disk, filler)
            nursery.cancel_scope.cancel()

    trio.run(main)
    # The first fetch waited about max_wait for a disk that finished nothing; the rest did not wait.
    # (Counted, not timed: the later offers did not wait at all; 5 s only detects a hang.)
    assert 0.4 < waits[0] < 5 and all(w < 5 for w in waits[1:]), waits
    assert counters.get("fill_waits") == 1
    assert counters.get("fill_congested") == 1
    assert counters.get("fill_skipped") == 4
    # What was queued before the stall was written once the disk came back.
    assert sorted(disk.stored) == sorted(ref(i).id for i in range(4))


def test_a_slow_disk_that_keeps_writing_gets_every_block():
    """Backpressure, not skipping, while writes still finish (the default: cache all that is read)."""

    class SlowDisk(HungDisk):
        def put(self, ref, data):
            time.sleep(0.02)
            self.stored[ref.id] = bytes(data)

    disk = SlowDisk()
    counters = Counters("chain")
    filler = Filler([disk], max_bytes=2 * BS, max_wait=0.5, writers=1,
                    limiter=trio.CapacityLimiter(4), counters=counters)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(filler.run)
            async with trio.open_nursery() as fetches:  # 40 fetches at once, 2 blocks of room
                for i in range(40):
                    fetches.start_soon(filler.offer, ref(i), bytes([i]) * BS)
            await filler.flush()
            while filler.gauges()["chain.fill_queue_bytes"]:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    # 40 writes of 20 ms: some fetches waited far longer than max_wait, yet nothing was skipped.
    assert counters.get("fill_skipped") == 0 and counters.get("fill_congested") == 0
    assert len(disk.stored) == 40


def test_every_writer_takes_work_while_the_others_are_busy():
    """Blocks queued while writers are busy go to the idle ones: the writers write at once."""

    class CountingDisk(HungDisk):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()
            self.busy = self.most_busy = 0

        def put_many(self, items):
            with self.lock:
                self.busy += 1
                self.most_busy = max(self.most_busy, self.busy)
            try:
                super().put_many(items)
            finally:
                with self.lock:
                    self.busy -= 1

    disk = CountingDisk()
    filler = Filler([disk], max_bytes=64 * BS, max_wait=5, writers=4,
                    limiter=trio.CapacityLimiter(4), counters=Counters("chain"))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(filler.run)
            with trio.fail_after(10):
                for i in range(4):  # one block at a time, each once the writers before it hang
                    await filler.offer(ref(i), bytes([i]) * BS)
                    while disk.busy < i + 1:
                        await trio.sleep(0.01)
            await release_and_drain(disk, filler)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert disk.most_busy == 4
    assert sorted(disk.stored) == sorted(ref(i).id for i in range(4))
