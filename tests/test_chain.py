"""The tier chain's single-flight under claims made ahead of their fetch: against the real
S3 protocol server (moto on 127.0.0.1), with S3 as the only tier and GETs counted on the
server. No mount: the timing these tests need (a read arriving between a prefetch's claim
and its fetch) cannot be arranged through the kernel."""

import os
import time

import trio

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.stats import Counters
from tieredfs.tiers.base import Peek
from tieredfs.tiers.chain import TierChain
from tieredfs.tiers.filler import Filler
from tieredfs.tiers.s3 import S3Backend, S3Tier

BS = 64 * 1024


def s3_only_chain(bucket: str, url: str) -> TierChain:
    backend = S3Backend(bucket, endpoint_url=url, region=None, max_requests=4,
                        connect_timeout=2, read_timeout=5, max_attempts=2, deadline=20,
                        counters=Counters("s3"))
    disk = trio.CapacityLimiter(4)
    filler = Filler([], max_bytes=BS, max_wait=1, writers=1, limiter=disk, counters=Counters("chain"))
    return TierChain([], S3Tier(backend), filler, disk_limiter=disk,
                     s3_limiter=trio.CapacityLimiter(4), max_span=8, counters=Counters("chain"))


def four_blocks(s3, bucket: str) -> tuple[bytes, list[BlockRef]]:
    """A new object of four blocks: its bytes and its blocks."""
    data = os.urandom(4 * BS)
    s3.put_object(Bucket=bucket, Key="four", Body=data)
    etag = s3.head_object(Bucket=bucket, Key="four")["ETag"].strip('"')
    obj = ObjectVersion(bucket, "four", etag, len(data))
    return data, [BlockRef(obj, i, BS) for i in range(4)]


def test_a_read_joins_a_prefetch_claimed_but_not_yet_fetching(s3, bucket, s3server):
    data, refs = four_blocks(s3, bucket)
    got = {}

    async def main():
        chain = s3_only_chain(bucket, s3server.url)
        claim = chain.claim(refs)  # a prefetch, issued; its task has not run yet
        async with trio.open_nursery() as nursery:
            async def reader():
                got["reader"] = (await chain.get_many(refs[2:3]))[0]
            nursery.start_soon(reader)
            await trio.sleep(0.05)  # the reader is waiting on the claimed block by now
            got["prefetch"] = await chain.complete(claim)

    s3server.reset_counts()
    trio.run(main)
    assert bytes(got["reader"]) == data[2 * BS:3 * BS]
    assert b"".join(bytes(d) for d in got["prefetch"]) == data
    assert s3server.counts()["GET"] == 1  # the prefetch's one GET served the reader too


def test_a_claim_given_up_before_its_fetch_sends_its_joiners_to_fetch_themselves(
        s3, bucket, s3server):
    data, refs = four_blocks(s3, bucket)
    got = {}

    async def main():
        chain = s3_only_chain(bucket, s3server.url)
        claim = chain.claim(refs)
        async with trio.open_nursery() as nursery:
            async def reader():
                got["reader"] = (await chain.get_many(refs[1:2]))[0]
            nursery.start_soon(reader)
            await trio.sleep(0.05)
            chain.release(claim)  # e.g. the file closed before its prefetch got a slot
            chain.release(claim)  # releasing twice is harmless
            with trio.fail_after(20):
                while "reader" not in got:
                    await trio.sleep(0.01)
        got["again"] = await chain.get_many(refs)  # nothing left in flight to wait on

    s3server.reset_counts()
    trio.run(main)
    assert bytes(got["reader"]) == data[BS:2 * BS]
    assert b"".join(bytes(d) for d in got["again"]) == data
    assert s3server.counts()["GET"] == 2  # the reader's own, then the whole object's


class SlowDisk:
    """Stand-in for a cache disk that keeps taking writes, each slowly (a slow disk cannot
    be made on demand here); it holds nothing, so every read is a miss."""

    name = "local"

    def __init__(self, seconds_per_write: float):
        self.seconds = seconds_per_write
        self.writes = 0

    def get(self, ref):
        return None

    def peek(self, ref):
        return Peek.ABSENT

    def put_many(self, items):
        time.sleep(self.seconds)
        self.writes += len(items)


def test_a_slow_cache_disk_does_not_hold_a_read_past_its_deadline(s3, bucket, s3server):
    data = os.urandom(16 * BS)
    s3.put_object(Bucket=bucket, Key="sixteen", Body=data)
    etag = s3.head_object(Bucket=bucket, Key="sixteen")["ETag"].strip('"')
    refs = [BlockRef(ObjectVersion(bucket, "sixteen", etag, len(data)), i, BS) for i in range(16)]
    disk = SlowDisk(0.5)  # 16 blocks, one queued at a time: 8 s of writes
    counters = Counters("chain")
    got = {}

    async def main():
        backend = S3Backend(bucket, endpoint_url=s3server.url, region=None, max_requests=4,
                            connect_timeout=2, read_timeout=5, max_attempts=2, deadline=20,
                            counters=Counters("s3"))
        limiter = trio.CapacityLimiter(4)
        # Every write finishes well within max_wait: the disk is slow, never stalled.
        filler = Filler([disk], max_bytes=BS, max_wait=5, writers=1, limiter=limiter,
                        counters=counters)
        chain = TierChain([disk], S3Tier(backend), filler, disk_limiter=limiter,
                          s3_limiter=limiter, max_span=16, counters=counters, read_deadline=1.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(filler.run)
            with trio.fail_after(60):  # a hang detector, not the bound under test
                start = trio.current_time()
                got["blocks"] = await chain.get_many(refs)
                got["seconds"] = trio.current_time() - start
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert b"".join(bytes(b) for b in got["blocks"]) == data
    # Without the bound the read waited for the queue to take all 16 blocks (about 8 s).
    assert got["seconds"] < 5, got["seconds"]
    assert counters.get("fill_skipped_deadline") > 0, counters.snapshot()
