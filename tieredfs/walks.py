"""Directory walks: the next small files of a directory, fetched before they are opened.

When files of one directory are opened in name order, the filesystem asks for the next few
small ones (`prefetch`). Each is fetched whole through the tier chain (so it lands in the
tiers above S3), at most once while remembered, and its blocks are also held in memory
until the file is opened (`take`): read back from tier 1 instead, each open cost a worker
thread's round trip and a disk read (tier 1 writes with O_DIRECT, so its blocks are not in
the page cache). Held bytes come out of the readahead budget, at most half of it; when
that is full, newer files are only cached, not held. A held file not opened within
HOLD_SECONDS is let go (an idle daemon holds nothing).

A walk of a packed directory (docs/packs.md) reads its pack: opening a packed file fetches
the pack's chunks from there into the tiers, and holds their blocks in memory (`PackWalk`).
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
BUDGET_WAIT = 1.0  # seconds a pack chunk's fetch waits for room in the budget, at most


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
        self._fetching = 0  # bytes of the objects being fetched, to be held

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
        wanted = [obj for obj in objs if 0 < obj.size <= self.small_object]
        todo = [obj for obj in wanted if obj not in self._walked]
        if 2 * len(todo) < len(wanted):
            return  # more than half are still ahead: topped up later, several in one go
        batch = []
        # Only what can be held: a file fetched and not held was read back from tier 1 by its
        # reader (a worker thread's trip and a disk read more than fetching it then). 8
        # readers of 169 directories side by side, each directory visited every 169 files,
        # had 40% of their files read twice.
        room = self.budget.limit // _HOLD_SHARE - self.held - self._fetching
        for obj in todo:
            if obj.size > room or not self.budget.try_take(obj.size):
                break
            room -= obj.size
            self._walked[obj] = None
            if len(self._walked) > _REMEMBERED_OBJECTS:
                self._forget(next(iter(self._walked)), remember=False)
            batch.append(obj)
        if batch:
            # One task and one claim for the batch: its tier 1 lookups share one worker
            # thread's hop, and its S3 GETs go side by side. Per object, the task, the claim
            # and the hop were a third of the trio thread's time in a warm walk.
            refs = [BlockRef(obj, i, self.block_size)
                    for obj in batch for i in range(block_count(obj.size, self.block_size))]
            self._fetching += sum(obj.size for obj in batch)
            self._nursery.start_soon(self._fetch, batch, self.chain.claim(refs))

    async def _fetch(self, objs: list[ObjectVersion], claim: Claim) -> None:
        held = [False] * len(objs)
        try:
            found = await self.chain.complete_each(claim, self._slots)
            at = 0
            for k, obj in enumerate(objs):
                blocks = found[at:at + block_count(obj.size, self.block_size)]
                at += len(blocks)
                failed = next((b for b in blocks if isinstance(b, Exception)), None)
                if failed is not None:
                    self._failed(obj, failed)
                    continue
                self.counters.add("walk_prefetched_bytes", obj.size)
                held[k] = self._hold(obj, blocks)
        except Exception as e:
            self._failed(objs[0], e)
        finally:
            self.chain.release(claim)
            self._fetching -= sum(obj.size for obj in objs)
            for obj, kept in zip(objs, held):
                if not kept:
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
    """A packed directory's walk (docs/packs.md): opening a packed file fetches the aligned
    chunks of its pack from the file on (one ranged GET each, each at most once while
    remembered), and the blocks fetched are held in memory for the files in them.

    Chunks are aligned to the readahead size, so walkers that open files all over a pack
    (8 readers, directories in any order) ask for the same chunks, not overlapping ranges
    that leave gaps to be filled by small GETs. Held blocks are served on the trio thread
    (`held`): from tier 1 each file's read cost a worker thread's round trip and a disk read
    of its part of the block. They are at most half the readahead budget, least recently
    read let go first, and not past HOLD_SECONDS unread (an idle daemon holds nothing)."""

    def __init__(self, chain: TierChain, budget, slots: trio.CapacityLimiter, counters: Counters,
                 *, block_size: int, failed: Callable[[ObjectVersion, Exception], None]):
        self.chain = chain
        self.budget = budget
        self._slots = slots
        self.counters = counters
        self.block_size = block_size
        self._failed = failed
        self._nursery: trio.Nursery | None = None
        self._claimed: OrderedDict[tuple[ObjectVersion, int, int], None] = OrderedDict()
        self._held: OrderedDict[tuple[ObjectVersion, int], tuple[bytes, float]] = OrderedDict()
        self.held_bytes = 0

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._let_go_of_old)

    def held(self, refs: list[BlockRef]) -> list | None:
        """On the trio thread: the blocks if all are held, else None."""
        out = []
        for r in refs:
            entry = self._held.get((r.obj, r.index))
            if entry is None:
                return None
            out.append(entry[0])
        now = trio.current_time()
        for r in refs:
            key = (r.obj, r.index)
            self._held[key] = (self._held[key][0], now)
            self._held.move_to_end(key)
        self.counters.add("pack_held_hits")
        return out

    def prefetch(self, obj: ObjectVersion, start: int, end: int) -> None:
        """The aligned chunks of `obj` that [start, end) touches; a chunk is the largest power
        of two of blocks within end - start (the readahead past a file)."""
        if self._nursery is None or not self.chain.upper:
            return
        bs = self.block_size
        n = block_count(end - start, bs)
        chunk = 1 << (n.bit_length() - 1) if n else 1
        for c in range(start // bs // chunk, (block_count(min(end, obj.size), bs) - 1) // chunk + 1):
            key = (obj, c, chunk)
            if key in self._claimed:
                continue
            first, last = c * chunk, min(block_count(obj.size, bs), (c + 1) * chunk)
            refs = [BlockRef(obj, i, bs) for i in range(first, last)
                    if (obj, i) not in self._held]
            nbytes = sum(r.length for r in refs)
            if nbytes > self.budget.limit:
                return  # it would never fit: the files' reads fetch what they need
            self._claimed[key] = None
            while len(self._claimed) > _REMEMBERED_OBJECTS:
                self._claimed.popitem(last=False)
            if refs:
                # Claimed now even when the budget has no room for it yet (the fetch then
                # waits for room): the files' reads join it. Unclaimed, each read fetched its
                # own block, and the chunk's GET, made later, was split around them (13
                # instead of 7 GETs for the bench's 2,000 packed files, 8 readers).
                reserved = self._make_room(nbytes)
                if not reserved:
                    self.counters.add("pack_budget_waits")
                self._nursery.start_soon(self._fetch, key, self.chain.claim(refs), nbytes, reserved)

    def _make_room(self, nbytes: int) -> bool:
        """Take `nbytes` of the budget, letting go of held blocks (oldest first) if need be."""
        while not self.budget.try_take(nbytes):
            if not self._held:
                return False
            self._drop(next(iter(self._held)))
        return True

    async def _fetch(self, key: tuple, claim: Claim, nbytes: int, reserved: bool) -> None:
        obj = key[0]
        kept = 0
        try:
            with trio.move_on_after(BUDGET_WAIT):
                while not reserved:
                    await self.budget.freed()
                    reserved = self._make_room(nbytes)
            if not reserved:
                # Budget held elsewhere (idle streams give theirs back after 10 s): the
                # waiting readers fetch their own blocks, as a later open may the chunk.
                self._claimed.pop(key, None)
                return
            blocks = await self.chain.complete(claim, self._slots)
            self.counters.add("pack_prefetched_bytes", nbytes)
            now = trio.current_time()
            for ref, data in zip(claim.refs, blocks):
                # The walk is ahead of its readers: the least recently read go first.
                while self._held and self.held_bytes + len(data) > self.budget.limit // _HOLD_SHARE:
                    self._drop(next(iter(self._held)))
                if (obj, ref.index) in self._held or len(data) > self.budget.limit // _HOLD_SHARE:
                    continue
                self._held[(obj, ref.index)] = (data, now)
                self.held_bytes += len(data)
                kept += len(data)
        except Exception as e:
            self._failed(obj, e)
        finally:
            self.chain.release(claim)
            if reserved:
                self.budget.give_back(nbytes - kept)

    def _drop(self, key: tuple[ObjectVersion, int]) -> None:
        data, _ = self._held.pop(key)
        self.held_bytes -= len(data)
        self.budget.give_back(len(data))

    async def _let_go_of_old(self) -> None:
        while True:
            await trio.sleep(HOLD_SECONDS / 2)
            too_old = trio.current_time() - HOLD_SECONDS
            for key in [k for k, (_, used) in self._held.items() if used < too_old]:
                self._drop(key)
