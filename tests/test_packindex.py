"""The pack index format and the packer's arithmetic, without S3 (docs/packs.md)."""

import json
import sqlite3

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tieredfs.errors import PackIndexUnusable
from tieredfs.packer import Packer, PackOptions
from tieredfs.packindex import (Entry, Other, Pack, PackIndex, checksum, index_name_of, pointer_bytes,
                                write_index)
from tieredfs.packwork import walk_key
from tieredfs.tiers.s3 import ListedObject


def _entries(n: int) -> list[Entry]:
    packs = [Pack(f"p/.tieredfs/packs/r-{i:05d}.pack", f"{i:032x}", 1 << 20) for i in range(3)]
    etags = ["d41d8cd98f00b204e9800998ecf8427e", "abc-3", "0123456789abcdef0123456789ABCDEF"]
    return [Entry(f"d{i % 7}/f {i}é.bin", etags[i % 3], i, packs[i % 3], i * 10, checksum(bytes(i % 251)))
            for i in range(n)]


def test_index_round_trip(tmp_path):
    entries = _entries(500)
    assert write_index(tmp_path / "i.sqlite", "p/", entries) == 3
    index = PackIndex(tmp_path / "i.sqlite")
    try:
        for e in entries:
            assert index.lookup(e.path) == e
        assert index.lookup("d0/missing") is None
        assert sorted(index.entries(), key=lambda e: e.size) == entries
    finally:
        index.close()


def test_checksum_fits_sqlite_integer():
    values = [checksum(i.to_bytes(4, "little")) for i in range(300)]
    assert all(-(1 << 63) <= v < 1 << 63 for v in values)
    assert any(v < 0 for v in values) and any(v > 0 for v in values)


def test_unknown_format_is_refused(tmp_path):
    path = tmp_path / "i.sqlite"
    write_index(path, "p/", _entries(3))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE name = 'format'")
    conn.commit()
    conn.close()
    with pytest.raises(PackIndexUnusable, match="format '99'"):
        PackIndex(path)
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(PackIndexUnusable):
        PackIndex(tmp_path / "junk.sqlite")


def test_pointer():
    assert index_name_of(pointer_bytes("index/r.sqlite", 5, 1), "x") == "index/r.sqlite"
    for bad in (b"{", b"[]", json.dumps({"format": 2, "index": "index/r.sqlite"}).encode(),
                json.dumps({"format": 1, "index": "../other"}).encode()):
        with pytest.raises(PackIndexUnusable):
            index_name_of(bad, "x")


def test_walk_order_is_a_directory_walk():
    keys = ["a/b/x", "a/z", "a/b.txt", "a/b/c/y", "a/a", "b", "a/c/q"]
    assert sorted(keys, key=walk_key) == ["b", "a/a", "a/b.txt", "a/z", "a/b/x", "a/b/c/y", "a/c/q"]


@given(st.lists(st.integers(1, 1000), max_size=60), st.integers(1000, 5000))
def test_groups_fill_packs_in_order(sizes, pack_size):
    objs = [ListedObject(f"k{i:03d}", s, 0, "e") for i, s in enumerate(sizes)]
    packer = Packer(None, "", PackOptions(max_file_size=1000, pack_size=pack_size))
    groups = list(packer._groups(objs))
    assert [o for g in groups for o in g] == objs
    assert all(sum(o.size for o in g) <= pack_size for g in groups)
    # A pack is closed only when the next object would not fit.
    assert all(sum(o.size for o in a) + b[0].size > pack_size for a, b in zip(groups, groups[1:]))


def test_directory_lists_files_and_subdirectories(tmp_path):
    pack = Pack("p/.tieredfs/packs/r-00000.pack", "e" * 32, 1 << 20)
    paths = ["a", "b/x", "b/y/z", "b/y0", "b/yy/q", "b0/k", "c/d/e/f", "é/x", "b/\U0010ffffz"]
    entries = [Entry(p, "e", 1, pack, i, 0, mtime_ns=i) for i, p in enumerate(paths)]
    others = [Other("b/big", "f", 5000, 7), Other("b/y/w", "f", 0, 8), Other("z", "f", 9)]
    write_index(tmp_path / "i.sqlite", "p/", entries, others)
    index = PackIndex(tmp_path / "i.sqlite")
    try:
        files, dirs = index.directory("")
        assert [f.path for f in files] == ["a", "z"] and dirs == ["b", "b0", "c", "é"]
        files, dirs = index.directory("b/")
        assert [f.path for f in files] == ["b/big", "b/x", "b/y0", "b/\U0010ffffz"]
        assert [type(f) for f in files] == [Other, Entry, Entry, Entry] and dirs == ["y", "yy"]
        assert files[1].mtime_ns == 1 and index.directory("c/d/") == ([], ["e"])
        assert index.directory("nothing/") == ([], [])
    finally:
        index.close()
