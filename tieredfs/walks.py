"""Directory walks: the next small files of a directory, fetched before they are opened.

When files of one directory are opened in name order, the filesystem asks for the next few
small ones (`prefetch`). Each is fetched whole through the tier chain (so it lands in the
tiers above S3), at most once while remembered, and its blocks are also held in memory
until the file is opened (`take`): read back from tier 1 instead, each open cost a worker
thread's round trip and a disk read (tier 1 writes with O_DIRECT, so its blocks are not in
the page cache). Held bytes come out of the readahead budget, at most half of it; when
that is full, newer files are only cached, not held. A held file not opened within
HOLD_SECONDS is let go (an idle daemon holds nothing).

A walk of a packed directory (docs/packs.md) reads its pack in order: opening a packed file
fetches the pack's next blocks into the tiers (`PackWalk`), not held in memory.
"""

import logging
from collections import OrderedDict
from typing import Callable

import trio

from .blocks import BlockRef, ObjectVersion, block_count
from .stats import Counters
from .tiers.chain import Claim, TierChain

log = logging.getLogger(__name__)

_REMEMBERED_OBJECTS = 4096  # objects prefetched by directory walks, not yet opened
_HOLD_SHARE = 2  # held bytes: at most the readahead budget / this
HOLD_SECONDS = 10.0


class WalkPrefetch:
    def __init__(self, chain: TierChain, budget, slots: trio.CapacityLimiter, counters: Counters,
                 *, block_size: int, small_object: int, failed: Callable[[ObjectVersion, Exception], None]):
        self.chain = chain
        self.budget = budget  # readahead.MemoryBudget
        self._slots = slots
        self.counters = counters
        self.block_size = block_size
        self.small_object = small_object
        self._failed = failed
        self._nursery: trio.Nursery | None = None
        # Objects prefetched and not yet opened -> (their blocks, when held) while held, else None.
        self._walked: OrderedDict[ObjectVersion, tuple[list, float] | None] = OrderedDict()
        self.held = 0  # bytes of blocks held (taken from the budget)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._let_go_of_old)

    def take(self, obj: ObjectVersion) -> list | None:
        """At open: the object's blocks if a walk holds them (the caller takes their budget
        bytes over), else None. Either way it is no longer awaited."""
        if obj not in self._walked:
            return None
        entry = self._walked.pop(obj)
        self.counters.add("walk_used_bytes", obj.size)
        if entry is None:
            return None
        self.held -= obj.size
        return entry[0]

    def prefetch(self, objs: list[ObjectVersion]) -> None:
        """Fetch these small objects whole into the tiers above S3, budget permitting."""
        if self._nursery is None or not self.chain.upper:
            return  # nowhere to keep them but memory, and that is what the budget is for
        for obj in objs:
            if not 0 < obj.size <= self.small_object or obj in self._walked:
                continue
            if not self.budget.try_take(obj.size):
                return
            self._walked[obj] = None
            if len(self._walked) > _REMEMBERED_OBJECTS:
                self._forget(next(iter(self._walked)), remember=False)
            refs = [BlockRef(obj, i, self.block_size) for i in range(block_count(obj.size, self.block_size))]
            self._nursery.start_soon(self._fetch, obj, self.chain.claim(refs))

    async def _fetch(self, obj: ObjectVersion, claim: Claim) -> None:
        held = False
        try:
            blocks = await self.chain.complete(claim, self._slots)
            self.counters.add("walk_prefetched_bytes", obj.size)
            held = self._hold(obj, blocks)
        except Exception as e:
            self._failed(obj, e)
        finally:
            self.chain.release(claim)
            if not held:
                self.budget.give_back(obj.size)

    def _hold(self, obj: ObjectVersion, blocks: list) -> bool:
        """Keep the blocks for the object's open, if it is still awaited and the held bytes
        stay within their share. When full, the newest are not held rather than the oldest
        let go: 8 readers walking 169 directories side by side come back to a directory
        after every other, so the oldest are the next ones opened."""
        if obj not in self._walked or self.held + obj.size > self.budget.limit // _HOLD_SHARE:
            return False  # opened while in flight (it joined this fetch), forgotten, or no room
        self._walked[obj] = (blocks, trio.current_time())
        self.held += obj.size
        return True

    def _forget(self, obj: ObjectVersion, remember: bool) -> None:
        """Let go of an object's held blocks; still remembered as fetched if `remember` (it
        is in tier 1: a walk need not fetch it again)."""
        entry = self._walked.pop(obj, None)
        if remember:
            self._walked[obj] = None
        if entry is not None:
            self.held -= obj.size
            self.budget.give_back(obj.size)
            self.counters.add("walk_dropped_bytes", obj.size)

    async def _let_go_of_old(self) -> None:
        while True:
            await trio.sleep(HOLD_SECONDS / 2)
            too_old = trio.current_time() - HOLD_SECONDS
            for obj in [o for o, entry in self._walked.items() if entry is not None and entry[1] < too_old]:
                self._forget(obj, remember=True)


class PackWalk:
    """The blocks of a pack past a packed file being opened, fetched into the tiers above S3,
    each at most once while remembered."""

    def __init__(self, chain: TierChain, budget, slots: trio.CapacityLimiter, counters: Counters,
                 *, block_size: int, failed: Callable[[ObjectVersion, Exception], None]):
        self.chain = chain
        self.budget = budget
        self._slots = slots
        self.counters = counters
        self.block_size = block_size
        self._failed = failed
        self._nursery: trio.Nursery | None = None
        self._claimed: OrderedDict[tuple[ObjectVersion, int], None] = OrderedDict()

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def prefetch(self, obj: ObjectVersion, start: int, end: int) -> None:
        """The blocks of `obj` covering [start, end), or, when the first of them are on their
        way already, a whole range's worth past those."""
        if self._nursery is None or not self.chain.upper:
            return
        bs = self.block_size
        first, last = start // bs, block_count(min(end, obj.size), bs)
        todo = [i for i in range(first, last) if (obj, i) not in self._claimed]
        if todo and todo[0] > first:
            if len(todo) < (last - first) // 2:
                return  # over half the range is on its way: top up later, in one whole request
            # Claimed one block per open, a walk cost one GET per block.
            last = min(block_count(obj.size, bs), todo[0] + last - first)
            todo = [i for i in range(todo[0], last) if (obj, i) not in self._claimed]
        refs = [BlockRef(obj, i, bs) for i in todo]
        nbytes = sum(r.length for r in refs)
        if not refs or not self.budget.try_take(nbytes):
            return
        for r in refs:
            self._claimed[(obj, r.index)] = None
        while len(self._claimed) > _REMEMBERED_OBJECTS:
            self._claimed.popitem(last=False)
        self._nursery.start_soon(self._fetch, obj, self.chain.claim(refs), nbytes)

    async def _fetch(self, obj: ObjectVersion, claim: Claim, nbytes: int) -> None:
        try:
            await self.chain.complete(claim, self._slots)
            self.counters.add("pack_prefetched_bytes", nbytes)
        except Exception as e:
            self._failed(obj, e)
        finally:
            self.chain.release(claim)
            self.budget.give_back(nbytes)
