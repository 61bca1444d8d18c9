"""Scenarios 1-5: S3 misbehaving on the wire, injected by the proxy, read through a real mount.

Every read is compared with the bytes uploaded; a fault may cost time or give EIO,
never wrong bytes, never a hang, never ENOENT for an object that exists.
"""

import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kit import (BS, EIO_BOUND, K, proxy, random_files, read_uncached, record, s3_stats, timed,
                 via_proxy)

pytestmark = pytest.mark.faults


def read_all_concurrently(mnt, files: dict[str, bytes], threads: int = 4) -> list:
    """[(key, bytes or OSError, seconds)] for every file, `threads` at a time."""
    with ThreadPoolExecutor(threads) as pool:
        futures = {k: pool.submit(timed, read_uncached, mnt.path / k) for k in files}
    return [(k, *f.result()) for k, f in futures.items()]


def test_throttling_and_server_errors_are_retried(bucket, put, via_proxy, proxy):
    files = random_files(put, "t", [1 * K, 20 * K, BS, BS + 1, 3 * BS + 7, 4 * BS] * 2)
    # 15 % SlowDown + 15 % of the rest as 500: ~30 % of GETs and listings fail.
    proxy.add("error", kinds=("GET", "LIST"), rate=0.15, status=503, code="SlowDown")
    proxy.add("error", kinds=("GET", "LIST"), rate=0.18, status=500, code="InternalError")
    mnt = via_proxy(bucket)
    results = read_all_concurrently(mnt, files) + read_all_concurrently(mnt, files)
    for key, got, _ in results:
        assert got == files[key], (key, got if isinstance(got, OSError) else len(got))
    stats, faults = s3_stats(mnt), proxy.counts()
    injected = faults["faults.error"]
    assert injected > 0 and stats["s3.retries"] >= injected
    assert stats["s3.throttled"] > 0 and stats["s3.server_errors"] > 0
    record("1 throttling 30%", gets=faults["requests.GET"], lists=faults["requests.LIST"],
           errors_injected=injected, retries=stats["s3.retries"],
           max_read_s=max(t for *_, t in results), reads=len(results), wrong_or_failed=0,
           bytes_verified=2 * sum(map(len, files.values())))
