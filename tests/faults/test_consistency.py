"""Scenario 8: an object overwritten on S3 while it is cached and while it is open.

A reader gets the old version or the new one, or EIO; never a mix of the two. An open
file stays pinned to the version it opened; new opens see the new version once the
listing TTL has passed.
"""

import errno
import os
import threading
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


def test_readers_during_repeated_overwrites_see_whole_versions(bucket, put, s3, mount_factory):
    """Open, read whole, close in a loop while the object is replaced every 0.3 s."""
    versions = [put("v.bin", os.urandom(3 * BS + 11))]
    mnt = mount_factory(bucket, *FAST, "--list-ttl", "0.5")
    stop = threading.Event()
    seen, bad, errors = set(), [], []

    def reader():
        while not stop.is_set():
            try:
                got = read_uncached(mnt.path / "v.bin")
            except OSError as e:
                errors.append(e.errno)
                continue
            matches = [i for i, v in enumerate(versions) if v == got]
            if matches:
                seen.add(matches[0])
            else:
                bad.append(len(got))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            time.sleep(0.3)
            versions.append(os.urandom(len(versions[0]) + (len(versions) % 2) * 7))
            s3.put_object(Bucket=bucket, Key="v.bin", Body=versions[-1])
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert bad == [], f"{len(bad)} reads matched no version (sizes {bad[:5]})"
    assert set(errors) <= {errno.EIO}, errors  # the object always exists: never ENOENT
    assert len(seen) >= 3, seen  # the readers really did cross versions
    record("8c readers during 10 overwrites", versions=len(versions), versions_seen=len(seen),
           eio=len(errors), mixed=len(bad))
