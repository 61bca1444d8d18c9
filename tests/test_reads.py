"""Bytes through a real mount: sizes around block edges, random ranges, the tools users
run, read-only refusals, attributes, and objects that change or vanish under a reader.

A small block size (64 KiB) keeps objects small. Reads that must reach the daemon drop
the kernel's page cache for the file first, or open it with O_DIRECT.
"""

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import read_file, read_uncached

K = 1024
BS = 64 * K
SMALL = ("--block-size", "64K")
SIZES = [0, 1, BS - 1, BS, BS + 1, 5 * BS + 123]


def test_sizes_around_block_edges(bucket, put, mount_factory):
    data = {f"s{n}.bin": put(f"s{n}.bin", os.urandom(n)) for n in SIZES}
    m = mount_factory(bucket, *SMALL)
    for name, body in data.items():
        assert os.stat(m.path / name).st_size == len(body)
        assert read_file(m.path / name) == body, name        # cold: from S3
        assert read_uncached(m.path / name) == body, name    # warm: from the local tier
        assert read_file(m.path / name, chunk=BS - 1) == body, name


@pytest.fixture
def random_object(bucket, put, mount_factory):
    data = put("r.bin", os.urandom(6 * BS + 789))
    m = mount_factory(bucket, *SMALL)
    fd = os.open(m.path / "r.bin", os.O_RDONLY | os.O_DIRECT)
    yield fd, data
    os.close(fd)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 7 * BS), length=st.integers(0, 3 * BS + 7))
def test_random_ranges(random_object, offset, length):
    # O_DIRECT: the daemon sees exactly this offset and length, not page-cache rounding.
    fd, data = random_object
    assert os.pread(fd, length, offset) == data[offset:offset + length]


def test_cat_cp_and_fio(bucket, put, mount_factory, tmp_path):
    data = put("tools/blob.bin", os.urandom(3 * BS + 16 * K))  # whole fio blocks, not whole tier blocks
    m = mount_factory(bucket, *SMALL)
    src = m.path / "tools" / "blob.bin"
    cat = subprocess.run(["cat", str(src)], capture_output=True, timeout=60)
    assert cat.returncode == 0 and cat.stdout == data
    subprocess.run(["cp", str(src), str(tmp_path / "copy.bin")], check=True, timeout=60)
    assert (tmp_path / "copy.bin").read_bytes() == data
    fio = subprocess.run(["fio", "--name=seq", f"--filename={src}", "--rw=read", "--bs=16k",
                          "--ioengine=psync", "--direct=1", "--readonly", "--output-format=json"],
                         capture_output=True, text=True, timeout=120)
    assert fio.returncode == 0, fio.stderr
    job = json.loads(fio.stdout[fio.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == len(data)
    assert hashlib.sha256(read_uncached(src)).digest() == hashlib.sha256(data).digest()


def test_writes_are_refused_with_erofs(bucket, put, mount_factory):
    put("d/f.txt", b"x")
    m = mount_factory(bucket)
    f, d = m.path / "d" / "f.txt", m.path / "d"
    attempts = {
        "write": lambda: open(f, "r+b"),
        "append": lambda: open(f, "ab"),
        "create": lambda: open(d / "new.txt", "xb"),
        "mkdir": lambda: os.mkdir(d / "sub"),
        "unlink": lambda: os.unlink(f),
        "rmdir": lambda: os.rmdir(d),
        "rename": lambda: os.rename(f, d / "g.txt"),
        "truncate": lambda: os.truncate(f, 0),
        "chmod": lambda: os.chmod(f, 0o666),
        "symlink": lambda: os.symlink("f.txt", d / "link"),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, what
    assert read_file(f) == b"x" and sorted(os.listdir(d)) == ["f.txt"]


def test_statfs(bucket, mount_factory):
    m = mount_factory(bucket)
    s = os.statvfs(m.path)
    assert s.f_namemax == 255 and s.f_bsize > 0 and s.f_blocks > 0
    assert s.f_bavail == 0 and s.f_flag & os.ST_RDONLY


def test_attributes(bucket, s3, put, mount_factory):
    put("d/f.txt", b"12345")
    last_modified = s3.head_object(Bucket=bucket, Key="d/f.txt")["LastModified"].timestamp()
    default = mount_factory(bucket)
    custom = mount_factory(bucket, "--uid", "1234", "--gid", "4321")
    for m, (uid, gid) in [(default, (os.getuid(), os.getgid())), (custom, (1234, 4321))]:
        f, d = os.stat(m.path / "d" / "f.txt"), os.stat(m.path / "d")
        assert f.st_mode == stat.S_IFREG | 0o444 and d.st_mode == stat.S_IFDIR | 0o555
        assert (f.st_uid, f.st_gid) == (d.st_uid, d.st_gid) == (uid, gid)
        assert f.st_size == 5 and f.st_nlink == 1
        assert abs(f.st_mtime - last_modified) < 1.0
    assert read_file(custom.path / "d" / "f.txt") == b"12345"


def test_object_overwritten_while_open(bucket, put, mount_factory):
    old = put("v.bin", os.urandom(4 * BS))
    m = mount_factory(bucket, *SMALL, "--list-ttl", "1")
    path = m.path / "v.bin"
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = bytearray(os.pread(fd, BS, 0))
        new = put("v.bin", os.urandom(5 * BS + 3))
        try:
            while chunk := os.pread(fd, BS, len(got)):
                got += chunk
            assert bytes(got) == old  # an old version served in full is fine ...
        except OSError as e:
            assert e.errno == errno.EIO  # ... and so is refusing to mix versions
            assert bytes(got) == old[:len(got)]
    finally:
        os.close(fd)
    time.sleep(1.3)  # past the listing TTL a new open sees the new version
    assert os.stat(path).st_size == len(new)
    assert read_file(path) == new


def test_object_deleted_after_listing(bucket, s3, put, mount_factory):
    put("gone.bin", os.urandom(2 * BS))
    m = mount_factory(bucket, *SMALL)
    assert os.listdir(m.path) == ["gone.bin"]
    s3.delete_object(Bucket=bucket, Key="gone.bin")
    with pytest.raises(OSError) as e:
        read_file(m.path / "gone.bin")
    assert e.value.errno in (errno.ENOENT, errno.EIO)
    assert m.proc.poll() is None
