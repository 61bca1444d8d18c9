"""Small GETs begun on the trio thread (TierChain._fetch_begun, S3Backend.begin_get): a GET
that a kept-alive awscrt connection can take is started and ended on the event loop, with no
worker thread waiting on it. Whatever goes wrong with it, the block is fetched again the
waiting way, retries and all: the reader gets the right bytes or our error, as before.

Against KeepAliveServer (kit.py): moto and the fault proxy close every connection after one
answer, so a begun GET (which needs a kept-alive connection) never happens through them.
The chain has S3 as its only tier, as in tests/test_chain.py: no mount, so that each GET's
path can be told from the counters.
"""

import time

import pytest
import trio

from kit import KeepAliveServer
from tieredfs.blocks import BlockRef, ObjectVersion
from tieredfs.errors import BackendUnavailable
from tieredfs.stats import Counters
from tieredfs.tiers.chain import TierChain
from tieredfs.tiers.filler import Filler
from tieredfs.tiers.s3 import S3Backend, S3Tier

pytestmark = pytest.mark.faults
READ_TIMEOUT = 0.5


def crt_backend(server: KeepAliveServer, s3: Counters, max_requests: int = 4, max_attempts: int = 3,
                deadline: float = 20) -> S3Backend:
    return S3Backend("bkt", endpoint_url=server.url, region=None, max_requests=max_requests,
                     connect_timeout=2, read_timeout=READ_TIMEOUT, max_attempts=max_attempts, deadline=deadline,
                     counters=s3, http_client="crt", crt_threads=1, addressing="path")


def s3_chain(backend: S3Backend, counters: Counters, slots: int = 4) -> TierChain:
    """In trio: a chain with S3 as its only tier."""
    disk = trio.CapacityLimiter(2)
    filler = Filler([], max_bytes=1 << 20, max_wait=1, writers=1, limiter=disk, counters=Counters("f"))
    return TierChain([], S3Tier(backend), filler, disk_limiter=disk, s3_limiter=trio.CapacityLimiter(slots),
                     max_span=8, counters=counters)


def read_twice(server: KeepAliveServer, max_attempts: int = 3) -> tuple[list[bytes], Counters, Counters, float]:
    """Two reads of the server's object through an S3-only chain on awscrt: the first finds
    no kept-alive connection (waiting path), the second begins on the first's connection."""
    s3, chain_counters = Counters("s3"), Counters("chain")
    backend = crt_backend(server, s3, max_attempts=max_attempts)
    ref = BlockRef(server.obj, 0, server.obj.size)
    got = []

    async def main():
        chain = s3_chain(backend, chain_counters)
        for _ in range(2):
            got.append(bytes(await chain.get(ref)))

    t0 = time.monotonic()
    try:
        trio.run(main)
    finally:
        backend.close()
    return got, s3, chain_counters, time.monotonic() - t0


def test_gets_beyond_the_request_slots_wait_for_a_slot_and_are_begun():
    """8 GETs at once with 2 request slots: each waits for a slot on the trio thread, then
    begins on a kept-alive connection. (One that found no slot free went the waiting way, to
    wait for one in a worker thread.)"""
    with KeepAliveServer() as server:
        s3, counters = Counters("s3"), Counters("chain")
        backend = crt_backend(server, s3, max_requests=2)
        objs = [ObjectVersion("bkt", f"k{i}", server.obj.etag, server.obj.size) for i in range(10)]
        got = []

        async def main():
            chain = s3_chain(backend, counters, slots=2)

            async def get(obj):
                got.append(bytes(await chain.get(BlockRef(obj, 0, obj.size))))

            for batch in (objs[:2], objs[2:]):  # the first two make the connections
                async with trio.open_nursery() as nursery:
                    for obj in batch:
                        nursery.start_soon(get, obj)

        try:
            trio.run(main)
        finally:
            backend.close()
    assert got == [server.BODY] * 10
    assert s3.get("requests.get") == 10 and server.connections == 2
    assert counters.get("begun_gets") == 8


def test_a_small_get_on_a_kept_alive_connection_needs_no_worker_thread():
    with KeepAliveServer() as server:
        got, s3, chain, _ = read_twice(server)
    assert got == [server.BODY, server.BODY]
    assert chain.get("begun_gets") == 1 and s3.get("requests.get") == 2
    assert server.connections == 1 and s3.get("begun_gets_failed") == 0


@pytest.mark.parametrize("fault", ["drop", "flip", "error", "stall"])
def test_a_begun_get_that_fails_is_made_again_the_waiting_way(fault):
    """Closed unanswered, a changed byte (the whole-object MD5 check), a 503, no answer at
    all (given up after the read timeout): each time the second read still gets the right
    bytes, from the waiting path on another attempt."""
    with KeepAliveServer(second=fault) as server:
        got, s3, chain, seconds = read_twice(server)
    assert got == [server.BODY, server.BODY]
    assert chain.get("begun_gets") == 0
    gave_up = "begun_gets_abandoned" if fault == "stall" else "begun_gets_failed"
    assert s3.get(gave_up) == 1
    assert s3.get("requests.get") == 3  # the first read's, the begun one, and its remake
    assert seconds < 10 * READ_TIMEOUT + 5  # a stall costs one read timeout, not a hang


def test_a_remake_has_what_is_left_of_the_deadline_its_begun_get_started():
    """The remake's read deadline runs from when the begun GET started, so a reader waits at
    most one deadline (plus one attempt) in all, not a stalled begun GET's read timeout and a
    whole new deadline after it. Here the begun GET used it all: one attempt, then our error."""
    with KeepAliveServer() as server:
        s3 = Counters("s3")
        backend = crt_backend(server, s3, max_attempts=50, deadline=2 * READ_TIMEOUT)
        began = time.monotonic() - 2 * READ_TIMEOUT
        try:
            with pytest.raises(BackendUnavailable):
                backend.get_range(server.obj, 0, server.obj.size, since=began)
            assert bytes(backend.get_range(server.obj, 0, server.obj.size)) == server.BODY  # from now: fine
        finally:
            backend.close()
    assert s3.get("requests.get") <= 2  # at most the one attempt the loop always makes, then the fine one
