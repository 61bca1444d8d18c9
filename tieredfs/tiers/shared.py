"""Tier 2: a directory shared by the nodes of a cluster (NFS, CephFS, a NAS), between the
local tier and S3. The format and its guarantees are in shared_format.py and
docs/shared-tier.md; this module keeps the tier from ever holding up a read.

- Every call on the directory runs in a worker thread of its own bounded pool (not the
  local disk's) under a timeout, and is abandoned when the timeout passes: a dead NFS
  server blocks its thread uninterruptibly, and must not block the reader with it.
- A circuit breaker per direction (reads, writes): after a few failures or timeouts in a
  row the tier is bypassed for a back-off period (doubling up to 5 minutes), said once in
  the log; then one call probes it again. A read-only or full share still serves reads.
- Publishing is write-behind, off the reader's path: a bounded queue of blocks fetched
  from S3, dropped (counted) when full or while writes are bypassed.
- Cluster-wide single-flight: before fetching a missing block from S3 a node takes its
  lease (an O_EXCL file with an expiry); a node finding another's lease polls for the
  block for up to `lease_wait` seconds, then fetches it itself.
"""

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

import trio

from ..blocks import BlockRef
from ..errors import ConfigError
from ..stats import Counters, Histogram
from .shared_gc import LOW_WATER, Collector
from .shared_store import SharedStore

log = logging.getLogger(__name__)

HELD = "held"  # another node is fetching the block: wait for it
MINE = "mine"  # fetch it from S3 (this node holds its lease, or leases are not in use)
_FAILURES_TO_OPEN = 3
_BACKOFF = 30.0
_MAX_BACKOFF = 300.0
# Blocks others may be waiting for are written by several tasks, a few blocks at a time:
# each block costs a write, an fsync and a rename on the share.
_PUBLISHERS = 4
_PUBLISH_BATCH = 4
_POLL_FIRST, _POLL_MAX = 0.02, 0.25
_GC_PERIOD = 60.0


class Breaker:
    """Closed while calls succeed; open (bypass) for a back-off after repeated failures."""

    def __init__(self, name: str, counters: Counters):
        self.name = name
        self.counters = counters
        self.failures = 0
        self.backoff = _BACKOFF
        self.open_until = 0.0
        self.probing = False

    def allow(self) -> bool:
        if self.failures < _FAILURES_TO_OPEN:
            return True
        if time.monotonic() < self.open_until or self.probing:
            return False
        self.probing = True  # half-open: one call tries the directory again
        return True

    def disable(self) -> None:
        self.failures, self.open_until = _FAILURES_TO_OPEN, float("inf")

    def closed(self) -> bool:
        """Not bypassed now (without taking the half-open probe)."""
        return self.failures < _FAILURES_TO_OPEN or time.monotonic() >= self.open_until

    def ok(self) -> None:
        if self.failures >= _FAILURES_TO_OPEN:
            log.warning("event=shared_tier_back direction=%s", self.name)
        self.failures, self.backoff, self.probing = 0, _BACKOFF, False

    def fail(self, why: str) -> None:
        self.failures += 1
        self.counters.add(f"{self.name}_failures")
        if self.failures < _FAILURES_TO_OPEN:
            return
        if self.probing or self.failures == _FAILURES_TO_OPEN:
            if self.probing:
                self.backoff = min(self.backoff * 2, _MAX_BACKOFF)
            else:
                log.warning("event=shared_tier_bypassed direction=%s error=%r for_s=%.0f "
                            "action=serving_from_local_and_s3 (said once until it recovers)",
                            self.name, why, self.backoff)
            self.counters.add("bypassed")
            self.open_until = time.monotonic() + self.backoff
            self.probing = False


class SharedTier:
    name = "shared"

    def __init__(self, store: SharedStore, collector: Collector | None, *, threads: int,
                 timeout: float, lease_wait: float, publish_queue: int, counters: Counters,
                 readback: Callable[[BlockRef], bytes | None] | None = None,
                 latency: Histogram | None = None):
        self.store = store
        self.collector = collector
        self.timeout = timeout
        self.lease_wait = lease_wait
        self.max_queue = publish_queue
        self.readback = readback  # a block this node fetched, from tier 1 (worker thread)
        self.counters = counters
        self._latency = latency or Histogram()  # lookups, as metrics.py exports the tiers' calls
        self._limiter = trio.CapacityLimiter(threads)
        self._reads = Breaker("read", counters)
        self._writes = Breaker("write", counters)
        self._queue: OrderedDict[str, tuple[BlockRef, bytes]] = OrderedDict()
        self._queued_bytes = 0
        self._leased: set[str] = set()
        self._unlease: list[BlockRef] = []
        self._wakeup = trio.Event()
        self._accounting = threading.Lock()  # the publishers' view of the usage
        self._estimate: int | None = None  # namespace bytes: the last pass's count + since
        self._unsynced = 0

    async def _call(self, breaker: Breaker, fn, *args, timeout: float | None = None):
        """fn(*args) in a worker, or raise _Skipped: bypassed, timed out or failed."""
        if not breaker.allow():
            raise _Skipped()
        with trio.move_on_after(timeout or self.timeout) as scope:
            try:
                result = await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                                       abandon_on_cancel=True)
            except OSError as e:
                breaker.fail(f"{type(e).__name__}: {e.strerror or e}")
                raise _Skipped() from None
            except ConfigError:
                raise
            except Exception as e:  # a bug here must cost the tier, never a read
                log.exception("event=shared_tier_bug")
                breaker.fail(repr(e))
                raise _Skipped() from None
        if scope.cancelled_caught:
            self.counters.add("timeouts")
            breaker.fail(f"no answer in {timeout or self.timeout}s")
            raise _Skipped()
        breaker.ok()
        return result

    # --- the read path -----------------------------------------------------------------

    async def lookup(self, refs: list[BlockRef]) -> list:
        """Per block: its verified bytes, HELD (another node fetches it) or MINE (fetch it).
        Blocks are read in parallel; the misses' leases are then taken in one call."""
        out: list = [MINE] * len(refs)

        async def one(i: int, ref: BlockRef) -> None:
            start = time.perf_counter()
            try:
                out[i] = await self._call(self._reads, self.store.get, ref) or MINE
            except _Skipped:
                return
            finally:
                self._latency.observe(time.perf_counter() - start)

        await _each(refs, one)
        missing = [i for i, got in enumerate(out) if got is MINE]
        if missing and self.lease_wait > 0:
            try:
                leases = await self._call(self._reads, self._take_leases, [refs[i] for i in missing])
            except _Skipped:
                leases = [MINE] * len(missing)  # no leases: fetch them (best effort)
            for i, got in zip(missing, leases):
                out[i] = got
        for ref, got in zip(refs, out):
            if got is HELD:
                self.counters.add("lease_waits")
            elif got is MINE:
                self.counters.add("misses")
                if self.lease_wait > 0:
                    self._leased.add(ref.id)
            else:
                self.counters.add("hits")
                self.counters.add("hit_bytes", len(got))
        return out

    def _take_leases(self, refs: list[BlockRef]) -> list:
        """Worker thread: MINE or HELD per block, leases taken in block order. After the first
        block of a run another node holds, the rest of the run is taken as its too (and
        waited for): nodes reading the same stretch at once then fetch it in whole spans,
        not in blocks interleaved between them. A block nobody took is fetched after one
        short poll (its lease is found absent)."""
        out: list = [None] * len(refs)
        held_up_to = None  # (object, index) of the last block taken as another node's
        for i in sorted(range(len(refs)), key=lambda i: (refs[i].obj.key, refs[i].index)):
            ref = refs[i]
            if held_up_to != (ref.obj, ref.index - 1) and self.store.take_lease(ref):
                out[i] = MINE
            else:
                out[i], held_up_to = HELD, (ref.obj, ref.index)
        return out

    async def wait_for(self, refs: list[BlockRef]) -> list:
        """Blocks other nodes hold leases on: each one's bytes once it appears, or None
        (fetch it yourself) when its lease ends without it or after `lease_wait`."""
        out: list = [None] * len(refs)

        async def one(i: int, ref: BlockRef) -> None:
            delay = _POLL_FIRST
            with trio.move_on_after(self.lease_wait):
                while True:
                    await trio.sleep(delay)
                    delay = min(delay * 2, _POLL_MAX)
                    try:
                        got = await self._call(self._reads, self.store.poll, ref)
                    except _Skipped:
                        return
                    if got == "fetch":
                        return
                    if got != "wait":
                        out[i] = got
                        return

        await _each(refs, one)
        for got in out:
            if got is None:
                self.counters.add("lease_gave_up")
            else:
                self.counters.add("hits_after_wait")
                self.counters.add("hit_bytes", len(got))
        return out

    # --- publishing (write-behind) ----------------------------------------------------

    def publish(self, ref: BlockRef, data) -> None:
        """Queue a block fetched from S3 for the shared dir; never waits. Beyond the byte
        budget only its address is queued, and the publisher reads it back from tier 1:
        a share slower than S3 then still gets every block, without the memory."""
        if ref.id in self._queue:
            return
        if not self._writes.closed() or len(self._queue) >= self.max_queue // 4096:
            self.counters.add("publish_dropped")
            self.abandon([ref])
            return
        if self._queued_bytes + len(data) > self.max_queue or self.readback is None:
            data = None
            self.counters.add("publish_deferred")
        self._queue[ref.id] = (ref, data)
        self._queued_bytes += len(data) if data is not None else 0
        self._wakeup.set()

    def abandon(self, refs: list[BlockRef]) -> None:
        """These blocks will not be published: drop the leases this node holds on them."""
        for ref in refs:
            if ref.id in self._leased:
                self._leased.discard(ref.id)
                self._unlease.append(ref)
        if self._unlease:
            self._wakeup.set()

    async def run(self) -> None:
        """The publishers, lease drops, journal flushes and the collector (mount's nursery)."""
        try:
            await self._call(self._writes, self.store.prepare)
        except _Skipped:
            pass  # said by the breaker; a read-only share that exists may still be read
        except ConfigError as e:
            log.error("event=shared_tier_disabled error=%r", str(e))
            self._reads.disable()
            self._writes.disable()
            return
        async with trio.open_nursery() as nursery:
            for _ in range(_PUBLISHERS):
                nursery.start_soon(self._publisher)
            if self.collector is not None:
                nursery.start_soon(self._collect)

    async def _publisher(self) -> None:
        while True:
            if not self._queue and not self._unlease:
                with trio.move_on_after(_GC_PERIOD):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                if not self._queue and not self._unlease:
                    await self._quietly(self.store.flush_journal)
                    continue
            await self._publish_next()

    async def _publish_next(self) -> None:
        batch = [self._queue.popitem(last=False)[1]
                 for _ in range(min(_PUBLISH_BATCH, len(self._queue)))]
        unlease, self._unlease = self._unlease, []
        for ref, _ in batch:
            if ref.id in self._leased:
                self._leased.discard(ref.id)
                unlease.append(ref)
        nbytes = sum(len(d) for _, d in batch if d is not None)
        try:
            if batch:
                # A publish may run a collector pass: more time than a lookup.
                done = await self._call(self._writes, self._publish_within_quota, batch,
                                        timeout=4 * self.timeout)
                if done is None:
                    self.counters.add("publish_skipped_quota", len(batch))
                    done = 0
                self.counters.add("publishes", done)
                self.counters.add("publish_bytes", nbytes)
        except _Skipped:
            self.counters.add("publish_failures", len(batch))
        finally:
            self._queued_bytes -= nbytes
        if unlease:
            await self._quietly(self.store.drop_leases, unlease)

    def _publish_within_quota(self, batch: list[tuple[BlockRef, bytes]]) -> int | None:
        """Worker thread: publish, through a collector pass (which makes room and accounts
        for the batch under its lease) whenever this node's view of the usage is stale or
        near the quota. Between passes a node publishes at most 1/16 of the quota, so N
        nodes overshoot it by at most N/16 (docs/shared-tier.md). None: no room was made."""
        todo = self.store.new_blocks(self._with_data(batch))
        sizes = [(ref.id, self.store.stored_size(ref, data)) for ref, data in todo]
        n = sum(size for _, size in sizes)
        if not todo:
            return 0
        quota = self.collector.quota if self.collector else None
        with self._accounting:
            free_run = quota is None or (self._estimate is not None and self._unsynced + n <= quota // 16
                                         and self._estimate + n <= quota * LOW_WATER)
            if free_run:
                self._unsynced += n
                self._estimate = (self._estimate or 0) + n
        if free_run:
            return self.store.publish(todo)
        report = self.collector.run_pass(reserve=sizes, journal=self.store.journal,
                                         wait=self.timeout / 2)
        if report is None or report.get("refused"):
            return None
        with self._accounting:
            self._estimate, self._unsynced = report["bytes"], 0
        if report["evicted"]:
            self.counters.add("gc_evictions", report["evicted"])
            self.counters.add("gc_evicted_bytes", report["evicted_bytes"])
        return self.store.publish(todo, journaled=True)

    def _with_data(self, batch: list) -> list[tuple[BlockRef, bytes]]:
        """Worker thread: the batch's blocks, those queued without bytes read back."""
        out = []
        for ref, data in batch:
            if data is None:
                data = self.readback(ref)
                if data is None:  # not cached (declined, evicted): this node cannot publish it
                    self.counters.add("publish_dropped")
                    continue
            out.append((ref, data))
        return out

    async def _quietly(self, fn, *args) -> None:
        try:
            await self._call(self._writes, fn, *args)
        except _Skipped:
            pass

    async def flush(self) -> None:
        """Publish what is queued (unmount); the caller bounds the time."""
        while self._queue or self._unlease:
            await self._publish_next()

    async def _collect(self) -> None:
        """A pass every minute: it ages blocks by the nodes' reads, evicts what other nodes'
        publishes left over the quota, and sweeps one fan-out dir (publishes near the
        quota run passes of their own)."""
        while True:
            await trio.sleep(_GC_PERIOD)
            try:
                report = await self._call(self._writes, self.collector.run_pass,
                                          timeout=self.collector.lease_ttl)
            except _Skipped:
                continue
            if report and report.get("evicted"):
                self.counters.add("gc_evictions", report["evicted"])
                self.counters.add("gc_evicted_bytes", report["evicted_bytes"])

    def gauges(self) -> dict[str, int]:
        return {"shared.publish_queue_bytes": self._queued_bytes,
                "shared.bypassed_reads": int(not self._reads.closed()),
                "shared.bypassed_writes": int(not self._writes.closed())}


async def _each(refs: list[BlockRef], fn) -> None:
    """fn(i, ref) for every block at once (the tier's limiter bounds the threads)."""
    async with trio.open_nursery() as nursery:
        for i, ref in enumerate(refs):
            nursery.start_soon(fn, i, ref)


class _Skipped(Exception):
    """The call was not made or gave no answer: treat as a miss, drop, or fetch."""
