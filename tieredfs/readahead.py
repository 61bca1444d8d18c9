"""Readahead: per-open-file sequential detection and prefetch, under one global memory budget.

Each open file has a `Stream`. A read close to where the last one ended is sequential:
the window (blocks kept fetched ahead of the reader) doubles from `min_window` up to
`max_window`; a read elsewhere is random: the window closes and what was buffered for the
old position is dropped. Prefetch goes through the tier chain in requests of
`request_blocks` blocks (one ranged GET each when the blocks are cold), so prefetched
blocks also land in the tiers above S3, and a demand read of a block being prefetched
joins that fetch (the chain's single-flight).

Prefetched bytes are held in memory until read. Bytes in flight or held, over all files,
never exceed the budget: a prefetch that cannot take its bytes is not issued (counted as
`budget_denied`) and is tried again at the file's next read. Each sequential stream may
hold at most a fair share of the budget (budget / sequential streams, at least one
request), so many readers all make progress and none starves the others.

Demand reads are not limited by the budget: what they fetch at once is bounded by the S3
slots. A stream not read for `idle_seconds` gives back what it holds (`age_out`).

Directory walks (walks.py) share the budget: the small files they fetch ahead are held
here until opened.
"""

import logging
from dataclasses import dataclass, field

import trio

from .blocks import BlockRef, ObjectVersion, assemble, block_count
from .errors import TieredError
from .stats import Counters
from .tiers.chain import Claim, TierChain
from .walks import PackWalk, WalkPrefetch

log = logging.getLogger(__name__)

# A read starting within this many of its own sizes of the last one's end is sequential
# even before a window is open.
_SEQUENTIAL_SLACK = 4


class MemoryBudget:
    """Bytes that prefetch may have in flight or buffered, shared by every open file."""

    def __init__(self, limit: int, counters: Counters):
        self.limit = limit
        self.used = 0
        self.counters = counters
        self._freed = trio.Event()  # set (and replaced) whenever bytes are given back

    def try_take(self, n: int) -> bool:
        if self.used + n > self.limit:
            self.counters.add("budget_denied")
            return False
        self.used += n
        self.counters.max("budget_peak_bytes", self.used)
        return True

    def give_back(self, n: int) -> None:
        self.used -= n
        if n:
            self._freed.set()
            self._freed = trio.Event()

    async def freed(self) -> None:
        """Until bytes are next given back."""
        await self._freed.wait()


@dataclass
class Stream:
    """Readahead state of one open file."""

    obj: ObjectVersion
    blocks: int
    next_index: int = 0  # the block after the furthest one read
    last_end: int = 0  # byte offset where the furthest sequential read ended
    window: int = 0  # blocks to keep fetched ahead of next_index
    issued: int = 0  # prefetch has been issued for blocks below this
    held: int = 0  # budget bytes this stream holds (in flight + buffered)
    position: int = 0  # bumped on every random jump: older prefetches are not kept
    buffered: dict[int, bytes] = field(default_factory=dict)
    served: set[int] = field(default_factory=set)  # blocks reads have finished, lately
    kept: set[int] = field(default_factory=set)  # buffered blocks a demand read fetched
    scopes: set = field(default_factory=set)
    closed: bool = False
    last_read: float = 0.0  # trio clock of the last read: an idle stream gives its budget back


@dataclass(frozen=True)
class ReadaheadSettings:
    block_size: int
    min_window: int  # blocks
    max_window: int  # blocks
    request_blocks: int  # blocks per prefetch request
    small_object: int  # bytes: objects up to this size are fetched whole on first read
    idle_seconds: float = 10.0  # a stream not read for this long drops what it holds


class ReadaheadEngine:
    def __init__(self, chain: TierChain, settings: ReadaheadSettings, budget: MemoryBudget,
                 prefetch_slots: trio.CapacityLimiter, counters: Counters):
        self.chain = chain
        self.s = settings
        self.budget = budget
        self._slots = prefetch_slots
        self.counters = counters
        self._nursery: trio.Nursery | None = None
        self._sequential: set[int] = set()  # ids of streams with an open window
        self.walks = WalkPrefetch(chain, budget, prefetch_slots, counters,
                                  block_size=settings.block_size, small_object=settings.small_object,
                                  failed=self._failed)
        self.pack_walks = PackWalk(chain, budget, prefetch_slots, counters,
                                   block_size=settings.block_size, failed=self._failed)
        self._streams: dict[int, Stream] = {}  # every open file's, by id

    def start(self, nursery: trio.Nursery) -> None:
        """Prefetch tasks run in the mount's nursery, so unmount cancels them."""
        self._nursery = nursery
        self.walks.start(nursery)
        self.pack_walks.start(nursery)
        nursery.start_soon(self._age_out_idle)

    # --- idle streams --------------------------------------------------------------------------

    async def _age_out_idle(self) -> None:
        while True:
            await trio.sleep(self.s.idle_seconds / 2)
            self.age_out(trio.current_time())

    def age_out(self, now: float) -> None:
        """Streams not read since `now - idle_seconds` let go of their prefetches and their
        window: open files that stopped reading must not deny the budget to the others. A
        stream read again starts its window anew."""
        for st in self._streams.values():
            if (st.held or st.window) and now - st.last_read >= self.s.idle_seconds:
                self.counters.add("idle_streams_aged")
                for scope in list(st.scopes):
                    scope.cancel()
                st.position += 1  # prefetches still finishing are not kept
                st.window = 0
                st.issued = st.next_index
                self._sequential.discard(id(st))
                self._drop(st, set(st.buffered))

    # --- the Reader's hooks -----------------------------------------------------------------

    async def opened(self, f) -> None:
        # A packed file is a range of its pack: its stream starts and ends with the range.
        st = f.stream = Stream(f.obj, block_count(f.base + f.size, self.s.block_size),
                               next_index=f.base // self.s.block_size, last_end=f.base,
                               last_read=trio.current_time())
        self._streams[id(st)] = st
        blocks = self.walks.take(f.obj)
        if blocks is not None:
            # The stream takes the blocks and their share of the budget over; held for its
            # reads, not prefetch of its own (neither used nor wasted when they go).
            st.held += f.obj.size
            st.buffered = dict(enumerate(blocks))
            st.kept = set(st.buffered)

    def released(self, f) -> None:
        st: Stream = f.stream
        st.closed = True
        self._streams.pop(id(st), None)
        for scope in list(st.scopes):
            scope.cancel()
        self._drop(st, set(st.buffered))
        self._sequential.discard(id(st))

    async def read(self, f, refs: list[BlockRef], offset: int, size: int) -> bytes | memoryview:
        st: Stream = f.stream
        st.last_read = trio.current_time()
        start = self._follow(st, offset, offset + size, refs[0].index, refs[-1].index)
        small = st.obj.size <= self.s.small_object
        if st.window and not small:
            # Issued before the demand fetch, so a cold demand block rides in a whole request
            # (one GET for several blocks) that this read then joins.
            self._schedule(st, start)
        elif len(refs) == 1 and not small and refs[0].index not in st.buffered:
            # A random read within one block: only the part asked for is read and verified.
            ref = refs[0]
            end = min(offset + size, ref.start + ref.length)
            return await self.chain.get_part(ref, offset - ref.start, end - ref.start)
        return assemble(refs, await self._gather(st, refs, offset + size), offset, size)

    # --- access pattern ------------------------------------------------------------------------

    def _follow(self, st: Stream, offset: int, end: int, first: int, last: int) -> int:
        """Update the window from where this read falls; return where prefetch may start.

        A read is sequential if it starts near where the last one ended: within the open
        window, or within a few of its own sizes. The kernel's own readahead sends several
        reads at once and they arrive out of order, so a read a little ahead of or behind is
        still sequential, and the blocks it skipped are prefetched with it. Judged in bytes,
        not blocks: two random 4 KiB reads that land in one block are not a stream.
        """
        reach = max(st.window * self.s.block_size, _SEQUENTIAL_SLACK * (end - offset))
        if abs(offset - st.last_end) <= reach:
            start = min(first, st.next_index)
            if last >= st.next_index:
                st.window = min(self.s.max_window, max(self.s.min_window, st.window * 2))
                self.counters.max("window_peak_blocks", st.window)
                self._sequential.add(id(st))
            st.next_index = max(st.next_index, last + 1)
            st.last_end = max(st.last_end, end)
            return start
        self.counters.add("random_reads")
        st.window = 0
        self._sequential.discard(id(st))
        st.next_index = st.issued = last + 1
        st.last_end = end
        st.position += 1
        if st.buffered:
            self._drop(st, set(st.buffered))
        return first

    # --- demand path ---------------------------------------------------------------------------

    async def _gather(self, st: Stream, refs: list[BlockRef], end: int) -> list[bytes]:
        # A read that ends inside its last block leaves the rest of it to a later read: the
        # block stays buffered for that one. (A fifth of the kernel's reads with 4 readers
        # are not block-aligned; each such block was read twice, the second time from the
        # cache write queue or tier 1.)
        last = refs[-1]
        unfinished = last if end < last.start + last.length else None
        self._note_served(st, refs if unfinished is None else refs[:-1])
        wanted = refs
        if st.obj.size <= self.s.small_object and st.issued < st.blocks:
            # A small object is read whole on first touch: one GET instead of one per block.
            wanted = [BlockRef(st.obj, i, self.s.block_size) for i in range(st.blocks)]
            st.issued = st.blocks
        have = {r.index: st.buffered.get(r.index) if r is unfinished else self._take(st, r.index)
                for r in wanted}
        missing = [r for r in wanted if have[r.index] is None]
        if wanted[0].index <= st.issued <= wanted[-1].index:
            # This read fetches the blocks from st.issued on itself (prefetch had no share
            # left for them): a prefetch issued later must not claim them again, and find
            # them in tier 1 by then.
            st.issued = wanted[-1].index + 1
        if missing:
            for r, data in zip(missing, await self.chain.get_many(missing)):
                have[r.index] = data
        asked = {r.index for r in refs}
        for r in wanted:
            if r.index not in asked or (r is unfinished and st.window and r.index not in st.served):
                # Kept for a stream only, and only if no read has finished the block already
                # (the kernel's reads arrive in any order).
                self._keep(st, r.index, have[r.index])
        return [have[r.index] for r in refs]

    def _note_served(self, st: Stream, refs: list[BlockRef]) -> None:
        """Remember which blocks reads have finished (read to their end), so a prefetch that
        brings one back later does not hold it for a read that will not come. Noted when
        asked, not when answered: the reader may be waiting on that very prefetch. Only
        blocks a window behind the reader are remembered (prefetch keeps none further
        behind)."""
        st.served.update(r.index for r in refs)
        if len(st.served) > 2 * max(st.window, _SEQUENTIAL_SLACK) + len(refs):
            behind = st.next_index - st.window
            st.served = {i for i in st.served if i >= behind}

    def _take(self, st: Stream, index: int) -> bytes | None:
        data = st.buffered.pop(index, None)
        if data is not None:
            self._release(st, len(data))
            if not self._was_kept(st, index):
                self.counters.add("used_bytes", len(data))
        return data

    def _keep(self, st: Stream, index: int, data: bytes) -> None:
        """Hold a block a demand read fetched for a later read, if the budget allows. It
        is not prefetch: neither used nor wasted prefetch when it goes."""
        if not st.closed and index not in st.buffered and self.budget.try_take(len(data)):
            st.held += len(data)
            st.buffered[index] = data
            st.kept.add(index)

    def _was_kept(self, st: Stream, index: int) -> bool:
        if index in st.kept:
            st.kept.discard(index)
            return True
        return False

    def _drop(self, st: Stream, indexes: set[int]) -> None:
        for index in indexes:
            data = st.buffered.pop(index, None)
            if data is not None:
                self._release(st, len(data))
                if not self._was_kept(st, index):
                    self.counters.add("wasted_bytes", len(data))

    def _release(self, st: Stream, n: int) -> None:
        st.held -= n
        self.budget.give_back(n)

    # --- prefetch ------------------------------------------------------------------------------

    def _fair_share(self) -> int:
        request = self.s.request_blocks * self.s.block_size
        return max(request, self.budget.limit // max(1, len(self._sequential)))

    def _schedule(self, st: Stream, first: int) -> None:
        """Issue prefetch requests up to the window, as far as budget and fair share allow."""
        if self._nursery is None:
            return
        start = max(st.issued, first)
        end = min(st.blocks, st.next_index + st.window)
        share = self._fair_share()
        # Requests small enough that a stream's share holds two: with one request in flight
        # per stream (4 readers of a 64 MiB budget, 16 MiB requests), each reader waits out
        # every GET.
        per_request = max(1, min(self.s.request_blocks, share // (2 * self.s.block_size)))
        while start < end:
            if start in st.served:  # read ahead of the prefetch: fetched, or being fetched
                start += 1
                continue
            stop = min(end, start + per_request)
            if stop - start < per_request <= st.window and stop < st.blocks:
                return  # a wide window tops up in whole requests, not one block per read
            # The bytes first: with the budget spent, most reads of 4 readers end here, and
            # the block addresses (two hashes each) would be made for nothing.
            nbytes = min(stop * self.s.block_size, st.obj.size) - start * self.s.block_size
            if st.held + nbytes > share or not self.budget.try_take(nbytes):
                return
            refs = [BlockRef(st.obj, i, self.s.block_size) for i in range(start, stop)]
            st.held += nbytes
            st.issued = stop
            # Claimed now, so this read's own demand fetch, issued next, joins it.
            self._nursery.start_soon(self._prefetch, st, self.chain.claim(refs), nbytes)
            start = stop

    async def _prefetch(self, st: Stream, claim: Claim, nbytes: int) -> None:
        refs = claim.refs
        scope = trio.CancelScope()
        st.scopes.add(scope)
        kept = 0
        position = st.position
        try:
            with scope:
                if st.closed:
                    return  # closed before this task began: its scope was not there to cancel
                datas = await self.chain.complete(claim, self._slots)
                self.counters.add("prefetched_bytes", sum(len(d) for d in datas))
                for ref, data in zip(refs, datas):
                    if st.buffered.get(ref.index) is data:
                        # The reader joined this fetch and keeps the block for its rest: a
                        # prefetched block, used or wasted when it goes.
                        st.kept.discard(ref.index)
                        continue
                    if ref.index in st.served:
                        # The reader has it already (it joined this fetch), even if it has
                        # closed the file since.
                        self.counters.add("used_bytes", len(data))
                    elif st.closed or st.position != position or ref.index in st.buffered:
                        self.counters.add("wasted_bytes", len(data))
                    elif ref.index < st.next_index - st.window:
                        self.counters.add("wasted_bytes", len(data))  # the reader is far past it
                    else:
                        # Kept even behind the furthest read: the kernel's reads arrive out of
                        # order, and the one for this block may be still on its way.
                        st.buffered[ref.index] = data
                        kept += len(data)
        except Exception as e:
            self._failed(st.obj, e)
            return
        finally:
            self.chain.release(claim)
            st.scopes.discard(scope)
            self._release(st, nbytes - kept)
        if not scope.cancelled_caught and st.window and not st.closed and st.position == position:
            # Top the window up now, not at the reader's next read: when every reader waits on
            # a fetch, no read arrives to do it (4 readers at +20 ms: GETs in flight fell to
            # 2-3 while the budget had room for 8).
            try:
                self._schedule(st, st.issued)
            except Exception as e:  # a bug here must not take the mount's nursery down
                self._failed(st.obj, e)

    def _failed(self, obj: ObjectVersion, e: Exception) -> None:
        """A failed prefetch costs nothing but itself: the reader's own read retries and reports."""
        self.counters.add("errors")
        if isinstance(e, TieredError):
            log.debug("event=prefetch_failed key=%r error=%r", obj.key, str(e))
        else:  # a bug: say so, but do not take the mount down with it
            log.error("event=prefetch_bug key=%r error=%r", obj.key, e, exc_info=e)

    def gauges(self) -> dict[str, int]:
        return {"readahead.budget_used_bytes": self.budget.used,
                "readahead.walk_held_bytes": self.walks.held,
                "readahead.pack_held_bytes": self.pack_walks.held_bytes,
                "readahead.sequential_streams": len(self._sequential)}
