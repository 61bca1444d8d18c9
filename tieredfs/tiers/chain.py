"""Lookup order across tiers, fill-up of the tiers above a hit, and single-flight.

Runs on the trio thread. Tier calls that may block go to a worker thread through a
bounded limiter; only `peek` and `peek_part` run on the trio thread (they answer from the
index and what the page cache already holds, never waiting on the disk). Concurrent requests for the same block share
one fetch.
"""

import logging
import time

import trio

from ..blocks import BlockRef
from ..errors import TieredError
from ..stats import Counters, Registry
from .base import Peek, Tier
from .filler import Filler
from .s3 import S3Tier
from .shared import HELD, MINE, SharedTier

log = logging.getLogger(__name__)


_SERVED_NAMES: dict[str, tuple[str, str]] = {}  # source -> its two counter names


class _Abandoned(Exception):
    """The fetching task was cancelled (e.g. a prefetch on close); waiters fetch themselves."""


class _Flight:
    """The one fetch of a block that other requesters wait on."""

    def __init__(self):
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None

    async def wait(self) -> bytes:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.data


class Claim:
    """Blocks a caller asked for: the flights it fetches itself, and those it joined."""

    __slots__ = ("refs", "owned", "joined")

    def __init__(self, refs: list[BlockRef]):
        self.refs = refs
        self.owned: list[tuple[int, BlockRef, _Flight]] = []
        self.joined: list[tuple[int, _Flight]] = []


class _Batch:
    __slots__ = ("refs", "nbytes", "found", "done")

    def __init__(self):
        self.refs: list[BlockRef] = []
        self.nbytes = 0
        self.found: list = []
        self.done = trio.Event()


class UpperBatches:
    """Lookups in the tiers above S3 that need a worker thread, gathered: the requests of
    one pass of the event loop share one thread hop (and tier 1 reads consecutive small
    blocks of them together). A directory walk's first open fetches its next files as
    separate tasks, and 8 readers open files side by side: each took a hop of its own, and
    a hop (~64 us here, idle: thread switches and waits for the GIL) costs more than a
    small file's read (~23 us for 34 KiB in the page cache; docs/performance-notes.md,
    "Warm reads, round 3").

    Only small reads are gathered: a batch takes no more once it holds MAX_BYTES. Merged,
    two 16 MiB prefetches of a sequential reader would be read one after the other in one
    thread instead of side by side, and its reads would wait for both; a hop's cost is
    small beside a MiB's read.
    """

    MAX_BYTES = 1 << 20

    def __init__(self, lookup, limiter: trio.CapacityLimiter, counters: Counters):
        self._lookup = lookup  # worker thread: refs -> data or None each
        self._limiter = limiter
        self._counters = counters
        self._open: _Batch | None = None  # the batch still taking requests

    async def lookup(self, refs: list[BlockRef]) -> list:
        nbytes = sum(ref.length for ref in refs)
        batch = self._open
        if batch is not None and batch.nbytes + nbytes <= self.MAX_BYTES:
            at = len(batch.refs)
            batch.refs.extend(refs)
            batch.nbytes += nbytes
            await batch.done.wait()
            return batch.found[at:at + len(refs)]
        batch = _Batch()
        batch.refs.extend(refs)
        batch.nbytes = nbytes
        if nbytes < self.MAX_BYTES:
            self._open = batch  # others may join it until it is full or on its way
        # Shielded: the other requests of the batch wait on this task. The hop cannot be
        # cancelled anyway (to_thread), and a read of the cache disk is bounded.
        with trio.CancelScope(shield=True):
            try:
                if self._open is batch:
                    await trio.lowlevel.cancel_shielded_checkpoint()  # the others of this pass join
                    if self._open is batch:
                        self._open = None
                self._counters.add("upper_hops")
                batch.found = await trio.to_thread.run_sync(self._lookup, batch.refs, limiter=self._limiter)
            except BaseException:
                batch.found = [None] * len(batch.refs)  # each asks below, as on a miss
                raise
            finally:
                if self._open is batch:
                    self._open = None
                batch.done.set()
        return batch.found[:len(refs)]


class TierChain:
    def __init__(self, upper: list[Tier], s3: S3Tier, filler: Filler, *,
                 disk_limiter: trio.CapacityLimiter, s3_limiter: trio.CapacityLimiter, max_span: int,
                 counters: Counters, latency=None, shared: SharedTier | None = None,
                 read_deadline: float = float("inf")):
        self.upper = upper
        self.shared = shared
        # latency(tier name) -> the Histogram its calls are timed into (metrics.py exports them).
        self._latency = latency or Registry().histogram
        self.s3 = s3
        self.filler = filler
        self._disk = disk_limiter
        self._s3 = s3_limiter
        # Threads for the GETs that wait: as many as there are requests (the slot is taken first).
        self._s3_threads = trio.CapacityLimiter(s3_limiter.total_tokens)
        self._max_span = max_span
        self._read_deadline = read_deadline
        self.counters = counters
        self._flights: dict[str, _Flight] = {}
        self._upper = UpperBatches(self._from_upper, disk_limiter, self.counters)

    async def get(self, ref: BlockRef) -> bytes:
        return (await self.get_many([ref]))[0]

    async def get_part(self, ref: BlockRef, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of one block: a small random read need not read and verify it all."""
        whole = self.filler.pending(ref)
        if whole is None and ref.id not in self._flights and self.upper:
            # First without leaving the trio thread: a hop to a worker thread and back is most
            # of the cost of a small read whose bytes are in the page cache.
            part = self._part_from_upper(ref, lo, hi, wait=False)
            if part is None:
                self.counters.add("part_reads_threaded")
                part = await trio.to_thread.run_sync(self._part_from_upper, ref, lo, hi, True,
                                                     limiter=self._disk)
            else:
                self.counters.add("part_reads_inline")
            if part is not None:
                return part
        if whole is None:
            whole = await self.get(ref)
        return bytes(memoryview(whole)[lo:hi])

    def _part_from_upper(self, ref: BlockRef, lo: int, hi: int, wait: bool) -> bytes | None:
        for tier in self.upper:
            if wait:
                start = time.perf_counter()
                part = tier.get_part(ref, lo, hi)
                self._latency(tier.name).observe(time.perf_counter() - start)
            else:
                part = tier.peek_part(ref, lo, hi)
            if part is not None:
                self._served(tier.name, len(part))
                return part
        return None

    async def get_many(self, refs: list[BlockRef]) -> list[bytes]:
        """All blocks, fetching the misses in as few ranged GETs as contiguity allows."""
        return await self.complete(self.claim(refs))

    def claim(self, refs: list[BlockRef]) -> Claim:
        """Join the fetches of blocks already in flight and put the rest in flight now, so
        that a request from here on joins them even before this caller starts fetching.

        A prefetch claims its blocks when it is issued, not when it gets a slot: claimed
        later, a reader's demand read of a queued block went to S3 alone (4 readers cold:
        81 of 216 GETs were of one block, and 166 blocks were read back from tier 1).
        """
        claim = Claim(refs)
        for i, ref in enumerate(refs):
            flight = self._flights.get(ref.id)
            if flight is not None:
                self.counters.add("single_flight_joins")
                claim.joined.append((i, flight))
            else:
                flight = self._flights[ref.id] = _Flight()
                claim.owned.append((i, ref, flight))
        return claim

    async def complete(self, claim: Claim, slot: trio.CapacityLimiter | None = None) -> list[bytes]:
        """The claimed blocks; the ones this claim owns are fetched holding `slot`, if given.
        The slot is let go before waiting on other claims' fetches, so no slot holder waits
        for a claim queued behind it."""
        found = await self.complete_each(claim, slot)
        for data in found:
            if isinstance(data, TieredError):
                raise data
        return found

    async def complete_each(self, claim: Claim, slot: trio.CapacityLimiter | None = None) -> list:
        """complete(), with each block's failure in its place instead of raised: a claim of
        several objects' blocks (a directory walk's) loses only the objects that failed."""
        results: dict[int, bytes | TieredError] = {}
        try:
            if claim.owned and slot is not None:
                async with slot:
                    await self._resolve(claim.owned)
            elif claim.owned:
                await self._resolve(claim.owned)
            for i, flight in claim.joined:
                try:
                    try:
                        results[i] = await flight.wait()
                    except _Abandoned:
                        results[i] = await self.get(claim.refs[i])
                except TieredError as e:
                    results[i] = e
        finally:
            self.release(claim)
        # No checkpoint from here to the caller: its blocks must not be out of flight and
        # not yet where the caller keeps them while another request looks (a reader then
        # found a prefetch's blocks in neither place and read them back from tier 1).
        for i, _, flight in claim.owned:
            results[i] = flight.data if flight.error is None else flight.error
        return [results[i] for i in range(len(claim.refs))]

    def release(self, claim: Claim) -> None:
        """End the claim's own flights; waiters on one not fetched fetch it themselves.
        Safe to call again, and needed for a claim that is never completed."""
        for _, ref, flight in claim.owned:
            if self._flights.get(ref.id) is flight:
                del self._flights[ref.id]
            if not flight.done.is_set():
                flight.error = _Abandoned()
                flight.done.set()

    async def _resolve(self, owned: list[tuple[int, BlockRef, "_Flight"]]) -> None:
        unwritten = []
        for _, ref, flight in owned:
            data = self.filler.pending(ref)
            if data is not None:
                self._served("fill_queue", len(data))
                flight.data = data
                flight.done.set()
            else:
                unwritten.append((ref, flight))
        misses, unknown = [], []
        for ref, flight in unwritten:
            seen = self._peek_upper(ref)
            if seen is Peek.ABSENT:
                misses.append((ref, flight))
            elif seen is Peek.UNKNOWN:
                unknown.append((ref, flight))
            else:
                flight.data = seen
                flight.done.set()
        if unknown:
            self.counters.add("upper_lookups_threaded", len(unknown))
            # One hop for all of them, however many: read in 1 MiB pieces side by side, a
            # prefetch of 16 MiB cost more CPU per MiB (1.1-1.3 against 0.7-1.2 ms) and was
            # no faster (docs/performance-notes.md, "Warm reads, round 3").
            await self._from_upper_into(unknown, misses)
        if self.shared is not None and misses:
            await self._via_shared(misses)
        else:
            await self._fetch_spans(misses)

    async def _from_upper_into(self, unknown: list[tuple[BlockRef, "_Flight"]], misses: list) -> None:
        found = await self._upper.lookup([ref for ref, _ in unknown])
        for (ref, flight), data in zip(unknown, found):
            if data is not None:
                flight.data = data
                flight.done.set()
            else:
                misses.append((ref, flight))

    async def _fetch_spans(self, misses: list[tuple[BlockRef, "_Flight"]]) -> None:
        async with trio.open_nursery() as nursery:
            for span in _spans(misses, self._max_span):
                nursery.start_soon(self._fetch_span, span)

    async def _via_shared(self, misses: list[tuple[BlockRef, "_Flight"]]) -> None:
        """Tier 2 before S3: its blocks are served and copied into tier 1. Blocks another
        node is fetching (it holds their leases) are waited for while this node fetches
        the rest from S3; those that do not appear in time are fetched too."""
        found = await self.shared.lookup([ref for ref, _ in misses])
        hits, held, mine = [], [], []
        for (ref, flight), got in zip(misses, found):
            (held if got is HELD else mine if got is MINE else hits).append((ref, flight, got))
        self._deliver_shared(hits)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fetch_spans, [(ref, flight) for ref, flight, _ in mine])
            if held:
                datas = await self.shared.wait_for([ref for ref, _, _ in held])
                got = [(ref, flight, data) for (ref, flight, _), data in zip(held, datas)]
                late = [(ref, flight) for ref, flight, data in got if data is None]
                waited = [item for item in got if item[2] is not None]
                self._deliver_shared(waited)
                hits += waited
                nursery.start_soon(self._fetch_spans, late)
        with trio.CancelScope(shield=True):  # as in _fetch_span
            for ref, _, data in hits:
                await self.filler.offer(ref, data)

    def _peek_upper(self, ref: BlockRef) -> bytes | Peek:
        """On the trio thread: the block if a tier above has it at no wait, else ABSENT when
        every tier above knows it has not got it, else UNKNOWN (ask them in a worker)."""
        answer = Peek.ABSENT
        for tier in self.upper:
            seen = tier.peek(ref)
            if seen is Peek.UNKNOWN:
                answer = Peek.UNKNOWN
            elif seen is not Peek.ABSENT:
                self._served(tier.name, len(seen))
                return seen
        return answer

    def _from_upper(self, refs: list[BlockRef]) -> list[bytes | None]:
        """Worker thread: each block from the first tier above S3 that has it (one hop for
        all, and one call per tier: tier 1 reads consecutive small blocks together)."""
        found: list[bytes | None] = [None] * len(refs)
        todo = list(range(len(refs)))
        for tier in self.upper:
            if not todo:
                break
            start = time.perf_counter()
            datas = tier.get_many([refs[i] for i in todo])
            per_block = (time.perf_counter() - start) / len(todo)
            latency = self._latency(tier.name)
            for i, data in zip(todo, datas):
                latency.observe(per_block)  # the call's time, shared by its blocks
                if data is not None:
                    self._served(tier.name, len(data))
                    found[i] = data
            todo = [i for i in todo if found[i] is None]
        return found

    def _deliver_shared(self, hits: list) -> None:
        for ref, flight, data in hits:
            self._served("shared", len(data))
            flight.data = data
            flight.done.set()

    async def _fetch_span(self, span: list[tuple[BlockRef, "_Flight"]]) -> None:
        started = trio.current_time()
        refs = [ref for ref, _ in span]
        datas = None
        try:
            # A begun GET holds a request slot too: one that found none free went the waiting
            # way, to wait for one in a worker thread (a walk's batch of 8 GETs beside 8
            # readers': 3 in 4 of a cold walk's GETs, at 3 ms of daemon CPU per file, not 2).
            async with self._s3:
                began = None
                if len(refs) == 1:
                    datas, began = await self._fetch_begun(refs[0])
                if datas is None:
                    datas = await trio.to_thread.run_sync(self._fetch, refs, began,
                                                          limiter=self._s3_threads)
        except TieredError as e:
            for _, flight in span:
                flight.error = e
                flight.done.set()
            return
        finally:
            if self.shared is not None and datas is None:
                self.shared.abandon(refs)  # failed or cancelled: let other nodes fetch now
        if self.shared is not None:
            for ref, data in zip(refs, datas):
                self.shared.publish(ref, data)
        self.counters.add("hits.s3", len(refs))
        self.counters.add("bytes.s3", sum(len(d) for d in datas))
        for (ref, flight), data in zip(span, datas):
            flight.data = data
            flight.done.set()
        # Backpressure from a slow cache disk. Shielded: a fetch whose reader has gone (a
        # cancelled prefetch, an unmount) still hands its blocks to the cache. The wait is
        # bounded by the filler's stall detection, and by the read deadline: a disk that
        # keeps taking writes, slowly, must not hold the read that owns this fetch past it.
        offered = 0
        with trio.CancelScope(shield=True, deadline=started + self._read_deadline):
            for ref, data in zip(refs, datas):
                await self.filler.offer(ref, data)
                offered += 1
        if offered < len(refs):
            self.counters.add("fill_skipped_deadline", len(refs) - offered)

    async def _fetch_begun(self, ref: BlockRef) -> tuple[list[bytes] | None, float | None]:
        """A small block's GET with no worker thread waiting on it: started here, ended here
        when awscrt says it is done. A worker's wait and its hops cost more CPU than the GET
        (docs/performance-notes.md, round 4). Returns (the block, when it began). The block
        is None if the GET could not start (then when is None too), failed in any way or took
        longer than the read timeout: the waiting path then makes it, retries and all."""
        begun = self.s3.begin(ref)
        if begun is None:
            return None, None
        began, start = time.monotonic(), time.perf_counter()
        token, done = trio.lowlevel.current_trio_token(), trio.Event()

        def wake(_future) -> None:  # on awscrt's thread, or here if already done
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # unmounted meanwhile

        ended = False
        try:
            begun.future.add_done_callback(wake)
            with trio.move_on_after(self.s3.begun_timeout):
                await done.wait()
            if done.is_set():
                ended = True
                data = self.s3.end(begun)
                self._latency("s3").observe(time.perf_counter() - start)
                if data is None:
                    return None, began
                self.counters.add("begun_gets")
                return [data], began
            return None, began
        finally:
            if not ended:
                self.s3.abandon(begun)

    def _fetch(self, refs: list[BlockRef], began: float | None = None) -> list[bytes]:
        """Worker thread: consecutive blocks in one ranged GET (`began`: when a begun GET of
        the one block was tried; the read deadline counts from then)."""
        start = time.perf_counter()
        try:
            return self.s3.get_span(refs) if len(refs) > 1 else [self.s3.get(refs[0], began)]
        finally:  # a failure's time too: retries until the deadline are what an outage looks like
            self._latency("s3").observe(time.perf_counter() - start)

    def _served(self, source: str, nbytes: int) -> None:
        """hits.* count block lookups; bytes.* what each source delivered (a part or a block)."""
        hits, nbytes_name = _SERVED_NAMES.get(source) or _SERVED_NAMES.setdefault(
            source, (f"hits.{source}", f"bytes.{source}"))
        self.counters.add(hits)
        self.counters.add(nbytes_name, nbytes)


def _spans(misses: list[tuple[BlockRef, _Flight]], max_span: int) -> list[list]:
    """Group consecutive blocks of one object into runs of at most max_span blocks."""
    spans: list[list] = []
    for ref, flight in sorted(misses, key=lambda m: (m[0].obj.key, m[0].index)):
        last = spans[-1][-1][0] if spans else None
        if (last is not None and last.obj == ref.obj and last.index + 1 == ref.index
                and len(spans[-1]) < max_span):
            spans[-1].append((ref, flight))
        else:
            spans.append([(ref, flight)])
    return spans

