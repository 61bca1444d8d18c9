"""The smallest end-to-end check: mount a bucket, list it, read bytes back."""

import os

from conftest import read_file


def test_mount_list_and_read(bucket, put, mount_factory):
    data = put("dir/file.bin", os.urandom(3 * 1024 * 1024 + 7))
    put("top.txt", b"hello\n")
    m = mount_factory(bucket)
    assert sorted(os.listdir(m.path)) == ["dir", "top.txt"]
    assert read_file(m.path / "top.txt") == b"hello\n"
    assert read_file(m.path / "dir" / "file.bin") == data
