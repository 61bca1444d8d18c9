"""The chain's gathering of tier-1 lookups into shared worker-thread hops (UpperBatches),
with real trio and real threads; the lookup is a plain function standing for tier 1."""

import threading

import trio
import trio.testing

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.stats import Counters
from tieredfs.tiers.chain import UpperBatches

K = 1024


def refs_of(key: str, size: int, block_size: int = 64 * K) -> list[BlockRef]:
    obj = ObjectVersion("b", key, "e", size)
    return [BlockRef(obj, i, block_size) for i in range(-(-size // block_size))]


class Lookup:
    """Answers each ref with its id (None for keys named miss*), noting each call's refs."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, refs):
        self.release.wait(30)
        self.calls.append([r.obj.key for r in refs])
        return [None if r.obj.key.startswith("miss") else r.id for r in refs]


def batches(lookup):
    return UpperBatches(lookup, trio.CapacityLimiter(4), Counters("chain"))


async def gather(upper, groups):
    results = {}

    async def one(name, refs):
        results[name] = await upper.lookup(refs)

    async with trio.open_nursery() as nursery:
        for name, refs in groups.items():
            nursery.start_soon(one, name, refs)
    return results


def test_small_lookups_of_one_pass_share_one_hop():
    lookup = Lookup()
    groups = {f"f{i}": refs_of(f"f{i}", 40 * K) for i in range(8)}
    groups["miss"] = refs_of("miss", 10 * K)
    results = trio.run(gather, batches(lookup), groups)
    assert len(lookup.calls) == 1 and sorted(lookup.calls[0]) == sorted(groups)
    for name, refs in groups.items():
        want = [None] * len(refs) if name == "miss" else [r.id for r in refs]
        assert results[name] == want, name


def test_large_lookups_each_get_their_own_hop():
    """A sequential reader's prefetches (MiBs each) are read side by side, not one after the
    other in one thread."""
    lookup = Lookup()
    groups = {f"big{i}": refs_of(f"big{i}", 4 << 20, 1 << 20) for i in range(3)}
    groups["small"] = refs_of("small", 8 * K)
    results = trio.run(gather, batches(lookup), groups)
    assert sorted(len(c) for c in lookup.calls) == [1, 4, 4, 4]
    assert all(results[n] == [r.id for r in refs] for n, refs in groups.items())


def test_a_cancelled_first_requester_still_answers_the_others():
    lookup = Lookup()
    lookup.release.clear()  # the hop waits until the first requester has been cancelled
    upper = batches(lookup)
    mine, theirs = refs_of("a", 4 * K), refs_of("b", 4 * K)
    got = {}

    async def main():
        with trio.fail_after(30):
            await requests()

    async def requests():
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def first_requester():
                with first:
                    got["a"] = await upper.lookup(mine)

            async def second_requester():
                got["b"] = await upper.lookup(theirs)

            nursery.start_soon(first_requester)
            nursery.start_soon(second_requester)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()
            lookup.release.set()

    trio.run(main)
    assert got["b"] == [r.id for r in theirs]
    assert len(lookup.calls) == 1
