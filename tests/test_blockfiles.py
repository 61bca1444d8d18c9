"""Tier 1's files: blocks written at their offsets (O_DIRECT, or buffered where refused) and
freed by punching holes, read through a bounded set of kept-open descriptors; reads that
never block; no descriptor outliving its file (real files in a temp dir)."""

import errno
import os
import threading

import pytest

from tieredfs.tiers import blockfiles as blockfiles_mod
from tieredfs.tiers.blockfiles import BlockFiles


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


@pytest.fixture
def blocks(tmp_path):
    data = {f"b{i}": os.urandom(64 * 1024) for i in range(8)}
    for name, content in data.items():
        (tmp_path / name).write_bytes(content)
    return tmp_path, data


def test_reads_and_keeps_at_most_limit_files_open(blocks):
    root, data = blocks
    files = BlockFiles(lambda name: root / name, limit=3)
    for name, content in data.items():
        assert files.read(name, 100, 5000, wait=True) == content[100:5100]
    assert len(files) == 3
    kept = {p for p in open_fds() if p.startswith(str(root))}
    assert kept == {str(root / n) for n in ("b5", "b6", "b7")}  # the most recently used
    files.close_all()
    assert not {p for p in open_fds() if p.startswith(str(root))}


def test_a_read_that_may_not_wait_needs_an_open_file_and_cached_pages(blocks):
    root, data = blocks
    files = BlockFiles(lambda name: root / name, limit=8)
    assert files.read("b0", 0, 4096, wait=False) is None  # not open yet: opening may block
    assert files.read("b0", 0, 4096, wait=True) == data["b0"][:4096]
    assert files.read("b0", 0, 4096, wait=False) == data["b0"][:4096]
    fd = os.open(root / "b0", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert files.read("b0", 0, 4096, wait=False) is None  # pages dropped: would wait for the disk
    assert files.read("b0", 0, 4096, wait=True) == data["b0"][:4096]
    files.close_all()


def test_forget_closes_the_descriptor_of_an_unlinked_file(blocks):
    root, data = blocks
    files = BlockFiles(lambda name: root / name, limit=8)
    files.read("b1", 0, 10, wait=True)
    (root / "b1").unlink()
    assert any(p.startswith(str(root / "b1")) for p in open_fds())  # held open: space not freed
    files.forget("b1")
    assert not any(p.startswith(str(root / "b1")) for p in open_fds())
    with pytest.raises(FileNotFoundError):
        files.read("b1", 0, 10, wait=True)


def test_concurrent_reads_and_evictions_never_read_another_file(blocks):
    """A descriptor is closed only when no reader holds it: with a limit of 2 and 8 threads
    cycling through 8 files, a closed-and-reused descriptor number would return another
    file's bytes."""
    root, data = blocks
    files = BlockFiles(lambda name: root / name, limit=2)
    wrong = []

    def reader(seed: int):
        names = sorted(data)
        for i in range(400):
            name = names[(seed + i * 3) % len(names)]
            if files.read(name, 0, 64 * 1024, wait=True) != data[name]:
                wrong.append(name)
            if i % 50 == 0:
                files.forget(names[(seed + i) % len(names)])

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert len(files) <= 2
    files.close_all()
    assert not {p for p in open_fds() if p.startswith(str(root))}


def test_a_file_unlinked_by_someone_else_is_a_miss_not_a_stale_read(blocks, monkeypatch):
    """Someone cleaning the cache dir by hand: within a second the space is freed and the
    read misses (until then the read gets the file's bytes, which are still the block's)."""
    root, data = blocks
    files = BlockFiles(lambda name: root / name, limit=8)
    files.read("b2", 0, 10, wait=True)
    (root / "b2").unlink()
    assert files.read("b2", 0, 10, wait=False) == data["b2"][:10]  # not asked again yet
    monkeypatch.setattr(blockfiles_mod, "_LINK_CHECK_SECONDS", 0.0)  # a second later
    assert files.read("b2", 0, 10, wait=False) is None
    with pytest.raises(FileNotFoundError):
        files.read("b2", 0, 10, wait=True)
    assert not any(p.startswith(str(root / "b2")) for p in open_fds())


@pytest.mark.parametrize("size", [1, 4095, 4096, 64 * 1024 + 7, 1 << 20])
def test_a_last_block_holds_exactly_its_bytes(tmp_path, size):
    """O_DIRECT writes whole 4 KiB pages: a length that is not a multiple is cut back."""
    files = BlockFiles(lambda name: tmp_path / name[:2] / name, limit=4)
    data = os.urandom(size)
    files.write_at("ab" * 16, 1 << 20, data)
    assert (tmp_path / "ab" / ("ab" * 16)).stat().st_size == (1 << 20) + size
    assert files.read("ab" * 16, 1 << 20, size + 1, wait=True) == data
    files.close_all()


def test_blocks_written_in_any_order_keep_their_neighbours(tmp_path):
    files = BlockFiles(lambda name: tmp_path / name, limit=4)
    block = 64 * 1024
    datas = [os.urandom(block) for _ in range(6)]
    threads = [threading.Thread(target=files.write_at, args=("obj", i * block, datas[i]))
               for i in (4, 1, 5, 0, 3, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "obj").read_bytes() == b"".join(datas)
    files.punch("obj", 2 * block, block)
    raw = (tmp_path / "obj").read_bytes()
    assert raw == b"".join(datas[:2]) + bytes(block) + b"".join(datas[3:])
    assert (tmp_path / "obj").stat().st_blocks * 512 <= 5 * block
    files.punch("missing", 0, block)  # nothing to free: not an error
    files.close_all()


@pytest.mark.parametrize("refused_by", ["open", "write"])
def test_a_filesystem_without_o_direct_gets_buffered_writes(tmp_path, monkeypatch, refused_by):
    """Every filesystem here takes O_DIRECT, so its refusal (EINVAL at open, as from some FUSE
    or network filesystems, or at the first write, as where the alignment is larger than
    4 KiB) is simulated: the one stand-in in this file."""
    real_open, real_pwritev = os.open, os.pwritev
    direct_fds = set()

    def open_(path, flags, *args):
        if flags & os.O_DIRECT and refused_by == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # numbers are reused
        return fd

    def pwritev(fd, buffers, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwritev", pwritev)
    files = BlockFiles(lambda name: tmp_path / name, limit=4)
    for i in range(3):
        files.write_at("f", i * 8192, b"%d" % i * (5000 + i))
    assert (tmp_path / "f").read_bytes() == b"".join(
        (b"%d" % i * (5000 + i)).ljust(8192, b"\0") for i in range(3)).rstrip(b"\0")
    assert files._direct is False
