"""Scenarios 9-10: many concurrent handles (no fd or memory leak) and hostile input (errno, no crash)."""

import ctypes
import ctypes.util
import errno
import os
import resource
from concurrent.futures import ThreadPoolExecutor

import pytest

from tieredfs.devserver import wait_until

from kit import BS, FAST, K, random_files, read_uncached, record

pytestmark = pytest.mark.faults
HANDLES = 2000


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, HANDLES + 512)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_2000_concurrent_handles_leak_nothing(bucket, put, mount_factory, many_fds):
    files = random_files(put, "m", [4 * K + i for i in range(40)] + [2 * BS + i for i in range(10)])
    keys = sorted(files)
    mnt = mount_factory(bucket, *FAST)

    def one_round(pool) -> int:
        """Open HANDLES fds at once, read and check each, close them all; the peak open count."""
        fds = [os.open(mnt.path / keys[i % len(keys)], os.O_RDONLY) for i in range(HANDLES)]
        try:
            peak = mnt.stats()["fs.open_files"]
            reads = pool.map(lambda i: os.pread(fds[i], 4 * BS, 0) == files[keys[i % len(keys)]],
                             range(HANDLES))
            assert all(reads)
        finally:
            for fd in fds:
                os.close(fd)
        return peak

    with ThreadPoolExecutor(32) as pool:
        one_round(pool)  # warm-up: thread pools, lazy imports, the listing
        assert wait_until(lambda: mnt.stats()["fs.open_files"] == 0, 20)
        fds0, rss0 = daemon_fds(mnt.pid), daemon_rss(mnt.pid)
        peaks = [one_round(pool) for _ in range(3)]
    # The kernel sends RELEASE after close() has returned: give the daemon a moment.
    assert wait_until(lambda: mnt.stats()["fs.open_files"] == 0, 20)
    fds1, rss1 = daemon_fds(mnt.pid), daemon_rss(mnt.pid)
    assert min(peaks) == HANDLES  # they really were open at the same time
    assert fds1 - fds0 <= 16, (fds0, fds1)
    assert rss1 - rss0 <= 48 << 20, (rss0, rss1)
    record("9 2000 concurrent handles x3", handles=HANDLES, rounds=3, daemon_fds_before=fds0,
           daemon_fds_after=fds1, rss_before_mib=rss0 / 2**20, rss_after_mib=rss1 / 2**20,
           bytes_verified=3 * sum(len(files[keys[i % len(keys)]]) for i in range(HANDLES)))


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def readdir_from(path, offset: int) -> list[bytes] | int:
    """Entries of `path` from a seekdir() offset, or the errno; what no Python API exposes."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = libc.closedir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    d = libc.opendir(os.fsencode(path))
    assert d, os.strerror(ctypes.get_errno())
    names = []
    try:
        libc.seekdir(d, offset)
        while True:
            ctypes.set_errno(0)
            entry = libc.readdir(d)
            if not entry:
                return ctypes.get_errno() or names
            # struct dirent: ino (8), off (8), reclen (2), type (1), name
            names.append(ctypes.string_at(entry + 19))
    finally:
        libc.closedir(d)


def test_hostile_input_gets_errno_and_the_daemon_keeps_serving(bucket, put, mount_factory):
    odd = {"b/\x01\x7f ctl\ttab.bin": os.urandom(100), "b/é😀名.bin": os.urandom(BS + 1),
           "b/" + "n" * 255: os.urandom(10)}
    for k, v in odd.items():
        put(k, v)
    normal = put("b/plain.bin", os.urandom(2 * BS))
    mnt = mount_factory(bucket, *FAST)
    root = os.fsencode(mnt.path)
    seen = {}
    seen["10000-byte name"] = errno_of(os.stat, root + b"/" + b"x" * 10_000)
    seen["10000-byte path"] = errno_of(os.stat, root + (b"/" + b"d" * 249) * 40)
    seen["255-byte name, absent"] = errno_of(os.stat, root + b"/b/" + b"z" * 255)
    seen["binary name"] = errno_of(os.stat, root + b"/b/\xff\xfe\x80\x01bin")
    seen["open for writing"] = errno_of(os.open, mnt.path / "b/plain.bin", os.O_WRONLY)
    seen["unknown xattr"] = errno_of(os.getxattr, mnt.path / "b/plain.bin", "user.nope")
    for k, v in odd.items():
        assert read_uncached(mnt.path / k) == v, k
    fd = os.open(mnt.path / "b/plain.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 0, 0) == b""
        assert os.pread(fd, 0, 5) == b""
        for offset in (2**63 - 1, 2**63 - 4096, 2**62, len(normal)):
            try:
                assert os.pread(fd, 4096, offset) == b""
                seen[f"read at {offset}"] = 0
            except OSError as e:
                assert e.errno in (errno.EINVAL, errno.EOVERFLOW), e
                seen[f"read at {offset}"] = e.errno
    finally:
        os.close(fd)
    assert sorted(readdir_from(mnt.path / "b", 0)) == sorted(
        [b"plain.bin"] + [k[2:].encode() for k in odd])
    for bogus in (12345, 2**40, 2**62):
        got = readdir_from(mnt.path / "b", bogus)
        assert got == [] or got in (errno.EINVAL, errno.ENOENT), (bogus, got)
        seen[f"readdir from {bogus}"] = got if isinstance(got, int) else "no entries"
    assert seen["10000-byte name"] == seen["10000-byte path"] == errno.ENAMETOOLONG
    assert seen["255-byte name, absent"] == seen["binary name"] == errno.ENOENT
    assert seen["open for writing"] == errno.EROFS and seen["unknown xattr"] == errno.ENODATA
    assert mnt.proc.poll() is None and read_uncached(mnt.path / "b/plain.bin") == normal
    assert "event=handler_bug" not in mnt.log.read_text()
    record("10 hostile input", **{k: errno.errorcode.get(v, v) if isinstance(v, int) else v
                                  for k, v in seen.items()})
