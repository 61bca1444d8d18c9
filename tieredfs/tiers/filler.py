"""Write-behind of fetched blocks into the tiers above S3.

A reader does not wait for each cache write: measured here, writing a 1 MiB block took
~5 ms under load (when each block was a new file, ext4 allocating it), five times the time
to fetch it from a loopback S3. Blocks wait in a bounded queue (`max_bytes`) and are written by a few
background tasks; while queued they are served from the queue, so a re-read does not go
back to S3.

When the queue is full, a fetch waits for room (backpressure: by default everything read
gets cached, at the disk's speed if the disk is the slower). Only when no write at all
finishes within `max_wait` seconds is the disk taken as stalled: the block is not cached
(`fill_skipped`) and the filler stops waiting for a while, so a stalled cache disk costs
reads at most one wait, not one per block. `max_wait=0` never waits: reads at network
speed, caching best effort.

On unmount the queue is flushed for a bounded time, so a clean restart finds what was read.
"""

import logging
from collections import OrderedDict

import trio

from ..blocks import BlockRef
from ..stats import Counters
from .base import Tier

log = logging.getLogger(__name__)

_CONGESTED_SECONDS = 30.0
# Blocks one writer takes at a time. Under load, batches of 8 filled a cold 1 GiB read's
# blocks with a fraction of the GIL waits of one block at a time (docs/readahead.md).
_BATCH = 8


class Filler:
    def __init__(self, tiers: list[Tier], *, max_bytes: int, max_wait: float, writers: int,
                 limiter: trio.CapacityLimiter, counters: Counters):
        self.tiers = tiers
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self.writers = writers
        self._limiter = limiter
        self.counters = counters
        self._queue: OrderedDict[str, tuple[BlockRef, bytes]] = OrderedDict()
        self._writing: dict[str, bytes] = {}
        self._bytes = 0
        self._wakeup = trio.Event()
        self._room = trio.Event()
        self._no_wait_until = 0.0

    async def offer(self, ref: BlockRef, data: bytes) -> None:
        """Queue a block for the tiers above, waiting a bounded time for room."""
        if not self.tiers or ref.id in self._queue or ref.id in self._writing:
            return
        if not await self._wait_for_room(len(data)):
            self.counters.add("fill_skipped")
            return
        if ref.id in self._queue or ref.id in self._writing:
            return  # queued by another fetch while this one waited
        # Blocks arrive in buffers of their own (S3Backend.get_pieces): queued as they are.
        self._queue[ref.id] = (ref, data)
        self._bytes += len(data)
        self.counters.max("fill_queue_peak_bytes", self._bytes)
        # Every idle writer waits on this one event; it is replaced only here, after waking
        # them all. (Each writer used to replace it before waiting, which orphaned the others:
        # only one of the four writers ever ran.)
        self._wakeup.set()
        self._wakeup = trio.Event()

    async def _wait_for_room(self, n: int) -> bool:
        if self._bytes + n <= self.max_bytes:
            return True
        if self.max_wait == 0 or trio.current_time() < self._no_wait_until:
            return False  # best-effort caching chosen, or the disk was found stalled lately
        self.counters.add("fill_waits")
        while self._bytes + n > self.max_bytes:
            # Many fetches may wait at once and each write frees room for few of them, so
            # one fetch's wait says nothing; a disk that finishes no write at all in
            # `max_wait` is stalled.
            with trio.move_on_after(self.max_wait) as waited:
                await self._room.wait()
            if waited.cancelled_caught:
                break
        else:
            return True
        self._no_wait_until = trio.current_time() + _CONGESTED_SECONDS
        self.counters.add("fill_congested")
        log.warning("event=cache_disk_congested wait_s=%s action=not_caching_for_%ss",
                    self.max_wait, _CONGESTED_SECONDS)
        return False

    def pending(self, ref: BlockRef) -> bytes | None:
        """A block fetched but not yet written, if it is."""
        item = self._queue.get(ref.id)
        if item is not None:
            return item[1]
        return self._writing.get(ref.id)

    async def run(self) -> None:
        """The background writers; they live in the mount's nursery."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.writers):
                nursery.start_soon(self._writer)

    async def flush(self) -> None:
        """Write everything queued (unmount); the caller bounds the time."""
        while self._queue:
            await self._write_next()

    async def _writer(self) -> None:
        while True:
            if not self._queue:
                await self._wakeup.wait()
                continue
            await self._write_next()

    async def _write_next(self) -> None:
        """Write the oldest queued blocks, up to a batch: a tier stores a batch together."""
        batch = [self._queue.popitem(last=False) for _ in range(min(_BATCH, len(self._queue)))]
        for block_id, (_, data) in batch:
            self._writing[block_id] = data
        self.counters.add("fill_trips")
        try:
            await trio.to_thread.run_sync(self._put, [item for _, item in batch], limiter=self._limiter)
        finally:
            for block_id, (_, data) in batch:
                del self._writing[block_id]
                self._bytes -= len(data)
            self._room.set()
            self._room = trio.Event()

    def _put(self, items: list[tuple[BlockRef, bytes]]) -> None:
        for tier in self.tiers:
            try:
                tier.put_many(items)
            except Exception:
                # A tier's put never raises for expected conditions; a bug here must cost only
                # this block's caching, not the mount.
                self.counters.add("fill_bugs")
                log.exception("event=fill_failed tier=%s", tier.name)

    def gauges(self) -> dict[str, int]:
        return {"chain.fill_queue_bytes": self._bytes}
