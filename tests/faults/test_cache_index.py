"""A sick cache index costs cache hits, never right bytes or the mount (issue 18).

Each scenario breaks LMDB for real: a map too small for what is cached, a commit refused by
a full filesystem (a small tmpfs mounted under the cache dir by the test), data.mdb cut
short or overwritten between mounts. Reads must stay right and the daemon up; the failure
is counted and logged once, without a traceback.
"""

import os
import subprocess

import pytest

from kit import BS, FAST, K, random_files, read_uncached, record

pytestmark = pytest.mark.faults


def read_all(mnt, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        assert read_uncached(mnt.path / key) == data, key


def assert_alive_and_quiet(mnt, event: str) -> None:
    assert mnt.proc.poll() is None and os.path.ismount(mnt.path)
    log = mnt.log.read_text()
    assert log.count(f"event={event}") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_a_full_index_map_costs_fills_not_reads(bucket, put, mount_factory):
    files = random_files(put, "full", [4 * BS] * 24)  # 96 blocks: more than a 64 KiB map holds
    mnt = mount_factory(bucket, *FAST, "--cache-index-size", "64K", "--small-file-threshold", "64K")
    read_all(mnt, files)
    mnt.settle()
    read_all(mnt, files)  # hits where the index took them, S3 for the rest
    mnt.settle()
    stats = mnt.stats()
    assert stats["local.index_full"] > 0 and stats["local.fills"] > 0, stats
    assert_alive_and_quiet(mnt, "cache_index_full")
    record("11a index map full", blocks=96, fills=stats["local.fills"],
           declined_index_full=stats["local.index_full"], wrong_bytes=0)


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount_tmpfs(path, size) -> a tmpfs mounted there; unmounted at the end of the test."""
    mounted = []

    def mount_tmpfs(path, size: str):
        path.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       check=True)
        mounted.append(path)
        return path

    yield mount_tmpfs
    for path in mounted:  # after mount_factory's teardown (fixtures end in reverse order)
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill_up(path) -> None:
    """Write until ENOSPC, to the last page."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for piece in (64 * K, 4 * K):
            try:
                while True:
                    os.write(fd, b"\xff" * piece)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_commit_that_fails_costs_fills_not_reads(bucket, put, mount_factory, small_tmpfs, tmp_path):
    """The index alone lives on a 1 MiB tmpfs; once a file fills it, LMDB's commits fail
    with ENOSPC. (LMDB's lock file is written through mmap, where a full tmpfs is SIGBUS:
    its reader slots are all touched before the tmpfs fills, as a daemon reads the few
    first slots of its first page only.)"""
    # 4 KiB blocks: many index entries for few bytes, so the index must grow past its
    # free pages (LMDB reuses those without asking the filesystem).
    first = random_files(put, "before", [16 * K] * 4)
    later = random_files(put, "after", [16 * K] * 48)
    cache = tmp_path / "cache-tmpfs"
    index_dir = small_tmpfs(cache / "index.lmdb", "1m")
    mnt = mount_factory(bucket, *FAST, "--block-size", "4K", "--small-file-threshold", "4K",
                        cache_dir=cache)
    read_all(mnt, first)
    mnt.settle()
    fill_up(index_dir / "filler")
    read_all(mnt, later)
    mnt.settle()
    read_all(mnt, first | later)
    stats = mnt.stats()
    assert stats["local.index_errors"] > 0, stats
    assert stats["local.hits"] >= 8, stats  # what was indexed before is still served
    assert_alive_and_quiet(mnt, "cache_index_errors")
    mnt.stop()
    record("11b index commit fails (ENOSPC)", failed_batches=stats["local.index_errors"],
           hits=stats["local.hits"], wrong_bytes=0)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "zeroed_after_a_crash"])
def test_a_damaged_index_between_mounts_is_moved_aside(bucket, put, mount_factory, damage):
    """Truncated, overwritten, or (as a power loss under MDB_NOSYNC may leave it) with pages
    never written: LMDB aborts the process on some of those, so an index the last daemon
    did not close is read through in a child process first."""
    files = random_files(put, "dmg", [3 * BS + 5] * 6)
    mnt = mount_factory(bucket, *FAST, "--small-file-threshold", "64K")
    read_all(mnt, files)
    mnt.settle()
    if damage == "zeroed_after_a_crash":
        mnt.kill()
    mnt.stop()
    data = mnt.cache_dir / "index.lmdb" / "data.mdb"
    size = data.stat().st_size
    if damage == "truncated":
        os.truncate(data, size // 2)
    elif damage == "garbage":
        data.write_bytes(os.urandom(size))
    else:
        with open(data, "r+b") as f:  # every page after the two meta pages
            f.seek(2 * 4096)
            f.write(bytes(size - 2 * 4096))
    mnt.start()
    read_all(mnt, files)
    mnt.settle()
    read_all(mnt, files)
    stats = mnt.stats()
    assert stats["local.hits"] > 0 and stats["local.fills"] > 0, stats  # a new, working index
    assert_alive_and_quiet(mnt, "cache_index_unreadable")
    assert list(mnt.cache_dir.glob("index.lmdb.corrupt-*"))
    if damage == "zeroed_after_a_crash":
        assert "was not closed cleanly and is damaged" in mnt.log.read_text()
    record(f"11c index {damage} between mounts", started=True, hits_after=stats["local.hits"],
           wrong_bytes=0)
