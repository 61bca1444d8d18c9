"""Scenario 8: an object overwritten on S3 while it is cached and while it is open.

A reader gets the old version or the new one, or EIO; never a mix of the two. An open
file stays pinned to the version it opened; new opens see the new version once the
listing TTL has passed.
"""

import errno
import os
import time

import pytest

from kit import BS, FAST, read_uncached, record

pytestmark = pytest.mark.faults
TTL = 2.0


def read_via(fd: int, size: int) -> bytes | OSError:
    """Everything from an already open fd, in 64 KiB reads, past the page cache."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    out = bytearray()
    try:
        while len(out) < size and (chunk := os.pread(fd, BS, len(out))):
            out += chunk
    except OSError as e:
        e.partial = bytes(out)
        return e
    return bytes(out)


@pytest.mark.parametrize("new_size", [4 * BS, 3 * BS + 100], ids=["same-size", "other-size"])
def test_overwrite_while_cached_and_open(bucket, put, s3, mount_factory, new_size):
    old = put("o.bin", os.urandom(4 * BS))
    half_old = put("h.bin", os.urandom(4 * BS))
    mnt = mount_factory(bucket, *FAST, "--list-ttl", str(TTL))
    assert read_uncached(mnt.path / "o.bin") == old  # o.bin wholly cached
    with open(mnt.path / "h.bin", "rb") as f:  # h.bin: only its first 2 blocks cached
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(f.fileno(), 2 * BS, 0) == half_old[:2 * BS]
    fd_o = os.open(mnt.path / "o.bin", os.O_RDONLY)
    fd_h = os.open(mnt.path / "h.bin", os.O_RDONLY)
    try:
        new, new_h = os.urandom(new_size), os.urandom(new_size)
        s3.put_object(Bucket=bucket, Key="o.bin", Body=new)
        s3.put_object(Bucket=bucket, Key="h.bin", Body=new_h)
        assert read_via(fd_o, len(old)) == old  # pinned, and every block is cached
        got = read_via(fd_h, len(half_old))
        if isinstance(got, OSError):  # the uncached half is of a version S3 no longer has
            assert got.errno == errno.EIO and half_old.startswith(got.partial), "mixed versions"
            outcome = f"EIO after {len(got.partial)} old bytes"
        else:
            assert got == half_old, "mixed versions"
            outcome = "old bytes"
        time.sleep(TTL + 0.5)
        assert read_uncached(mnt.path / "o.bin") == new
        assert read_uncached(mnt.path / "h.bin") == new_h
        assert read_via(fd_o, len(old)) == old, "an open file must stay on the version it opened"
    finally:
        os.close(fd_o)
        os.close(fd_h)
    record(f"8 overwrite while open ({'same' if new_size == len(old) else 'other'} size)",
           open_cached_file="old bytes", open_half_cached_file=outcome,
           new_open_after_ttl="new bytes", bytes_verified=3 * len(old) + 2 * new_size)
