"""The tier chain's single-flight under claims made ahead of their fetch: against the real
S3 protocol server (moto on 127.0.0.1), with S3 as the only tier and GETs counted on the
server. No mount: the timing these tests need (a read arriving between a prefetch's claim
and its fetch) cannot be arranged through the kernel."""

import os

import trio

from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.stats import Counters
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
