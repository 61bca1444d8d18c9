"""Idle streams give their readahead budget back (issue 18, point 8).

The engine and the tier chain are the real ones, over moto's S3 server on 127.0.0.1; no
mount: how long a stream has been idle is decided by the clock value handed to
`age_out`, so the test needs no sleeps.
"""

import os

import trio

from tieredfs.blocks import ObjectVersion
from tieredfs.readahead import MemoryBudget, ReadaheadEngine, ReadaheadSettings
from tieredfs.reader import OpenFile, Reader
from tieredfs.stats import Counters
from tieredfs.tiers.chain import TierChain
from tieredfs.tiers.filler import Filler
from tieredfs.tiers.s3 import S3Backend, S3Tier

BS = 64 * 1024
IDLE = 10.0


def objects(s3, bucket: str, count: int) -> list[ObjectVersion]:
    out = []
    for i in range(count):
        key = f"obj{i}"
        s3.put_object(Bucket=bucket, Key=key, Body=os.urandom(16 * BS))
        etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        out.append(ObjectVersion(bucket, key, etag, 16 * BS))
    return out


def engine_over_s3(bucket: str, url: str) -> ReadaheadEngine:
    backend = S3Backend(bucket, endpoint_url=url, region=None, max_requests=8,
                        connect_timeout=2, read_timeout=5, max_attempts=2, deadline=20,
                        counters=Counters("s3"))
    limiter = trio.CapacityLimiter(8)
    counters = Counters("readahead")
    filler = Filler([], max_bytes=BS, max_wait=1, writers=1, limiter=limiter, counters=counters)
    chain = TierChain([], S3Tier(backend), filler, disk_limiter=limiter, s3_limiter=limiter,
                      max_span=2, counters=counters)
    settings = ReadaheadSettings(block_size=BS, min_window=2, max_window=4, request_blocks=2,
                                 small_object=0, idle_seconds=IDLE)
    # Room for four streams' fair shares of two blocks each, and no more.
    return ReadaheadEngine(chain, settings, MemoryBudget(8 * BS, counters), limiter, counters)


async def settled(engine: ReadaheadEngine, files: list[OpenFile]) -> None:
    """Wait until no prefetch is in flight (event-driven; fail_after is a hang detector)."""
    with trio.fail_after(30):
        while any(f.stream.scopes for f in files):
            await trio.sleep(0.01)


def test_paused_readers_give_their_budget_to_a_new_one(s3, bucket, s3server):
    objs = objects(s3, bucket, 5)
    out = {}

    async def main():
        engine = engine_over_s3(bucket, s3server.url)
        reader = Reader(BS, engine)
        async with trio.open_nursery() as nursery:
            engine.start(nursery)

            async def open_and_read(fh: int, obj: ObjectVersion, blocks: int) -> OpenFile:
                f = OpenFile(fh, fh, obj)
                await reader.opened(f)
                for i in range(blocks):
                    await reader.read(f, i * BS, BS)
                return f

            paused = []
            for i in range(4):  # one at a time: four streams opened together share the
                # budget by how their GETs interleave, and may leave a block of it unused
                paused.append(await open_and_read(i, objs[i], 3))
                await settled(engine, paused)
            out["held_by_paused"] = engine.budget.used
            fifth = await open_and_read(4, objs[4], 3)
            await settled(engine, [fifth])
            out["fifth_before"] = fifth.stream.held
            engine.age_out(trio.current_time() + IDLE / 2)  # not idle long enough yet
            out["after_half"] = engine.budget.used
            # The four paused streams have been idle for IDLE; the fifth is read again.
            now = trio.current_time() + IDLE
            fifth.stream.last_read = now
            engine.age_out(now)
            out["after_aging"] = engine.budget.used
            await reader.read(fifth, 3 * BS, BS)
            await settled(engine, [fifth])
            out["fifth_after"] = fifth.stream.held
            # A paused stream read again reads the right bytes and opens a window anew.
            data = await reader.read(paused[0], 3 * BS, BS)
            out["resumed"] = bytes(data) == s3.get_object(
                Bucket=bucket, Key=objs[0].key, Range=f"bytes={3 * BS}-{4 * BS - 1}")["Body"].read()
            for f in paused + [fifth]:
                reader.released(f)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert out["held_by_paused"] == 8 * BS  # the whole budget, by streams no one reads
    assert out["fifth_before"] == 0  # so the new reader could not prefetch at all
    assert out["after_half"] == 8 * BS
    assert out["after_aging"] == 0  # all given back
    assert out["fifth_after"] > 0
    assert out["resumed"]
