"""Keys as paths through a real mount: trees, awkward keys, listing TTL, inodes, readdir.

The rules under test are written down in docs/namespace.md.
"""

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import read_file
from tieredfs.devserver import wait_until

AWKWARD_VISIBLE = {
    # key -> path under the mount
    "sp ace.txt": "sp ace.txt",
    "pl+us.txt": "pl+us.txt",
    "per%20cent.txt": "per%20cent.txt",
    "bad%zzescape": "bad%zzescape",
    "ünïcødé-😀.txt": "ünïcødé-😀.txt",
    "tab\there": "tab\there",  # (moto cannot store a key with a newline)
    "ctrl\x01char": "ctrl\x01char",
    "m" * 255: "m" * 255,
    "both": None,                          # hidden by the directory below
    "both/inner": "both/inner",
    "withmarker/": None,                   # a directory marker, not a file
    "withmarker/f": "withmarker/f",
    "e//b": None,                          # empty component
    "./dot": None,
    "dd/../up": None,
    "x/.": None,
    "x/..": None,
    "x/ok": "x/ok",
    "../escape": None,
    "/lead": None,
    "l" * 256: None,                       # a name over 255 bytes
    "é" * 128: None,                       # 128 characters, 256 bytes
}
# One log line each; a bad prefix is logged once for every key under it.
SKIPS_LOGGED = {"both", "e//", "./", "dd/../", "x/.", "x/..", "../", "/", "l" * 256, "é" * 128}


def tree(root) -> set[str]:
    """Every file and directory under root, relative, from os.walk (readdir + lookup)."""
    out = set()
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        for name in dirs:
            out.add(os.path.normpath(os.path.join(rel, name)) + "/")
        for name in files:
            out.add(os.path.normpath(os.path.join(rel, name)))
    return out


def test_nested_tree_via_listdir_and_walk(bucket, put, mount_factory):
    data = {}
    for a in range(3):
        for b in range(3):
            for c in range(4):
                key = f"top{a}/mid{b}/leaf{c}.bin"
                data[key] = put(key, os.urandom(100 * (a + b + c)))
    data["top0/shallow.txt"] = put("top0/shallow.txt", b"s")
    data["root.txt"] = put("root.txt", b"r")
    put("emptydir/", b"")
    m = mount_factory(bucket)

    dirs = {f"top{a}/" for a in range(3)} | {f"top{a}/mid{b}/" for a in range(3) for b in range(3)}
    assert tree(m.path) == set(data) | dirs | {"emptydir/"}
    assert sorted(os.listdir(m.path)) == ["emptydir", "root.txt", "top0", "top1", "top2"]
    assert os.listdir(m.path / "emptydir") == []
    assert sorted(os.listdir(m.path / "top0")) == ["mid0", "mid1", "mid2", "shallow.txt"]
    for key, body in data.items():
        assert os.stat(m.path / key).st_size == len(body)
        assert read_file(m.path / key) == body, key


def test_awkward_keys_are_mapped_or_skipped_once(bucket, put, mount_factory, tmp_path):
    bodies = {key: put(key, f"body of {key!r}".encode()) for key in AWKWARD_VISIBLE}
    m = mount_factory(bucket, "--list-ttl", "0.5")

    visible = {path: bodies[key] for key, path in AWKWARD_VISIBLE.items() if path}
    dirs = {"both/", "withmarker/", "x/", "e/", "dd/"}
    assert tree(m.path) == set(visible) | dirs
    for path, body in visible.items():
        assert read_file(m.path / path) == body, path
    assert os.listdir(m.path / "e") == [] and os.listdir(m.path / "dd") == []

    time.sleep(0.7)  # the listings expire and are made again: still one log line per key
    assert tree(m.path) == set(visible) | dirs
    log = m.log.read_text()
    assert log.count("event=key_skipped") == len(SKIPS_LOGGED)
    for key in SKIPS_LOGGED:
        assert log.count(f"event=key_skipped key={key!r}") == 1, key
    assert "event=handler_bug" not in log
    assert m.proc.poll() is None
    assert not (tmp_path / "escape").exists() and not (m.path.parent.parent / "escape").exists()


def test_listing_ttl_bounds_staleness(bucket, put, mount_factory):
    put("a.txt", b"a")
    slow = mount_factory(bucket, "--list-ttl", "300")
    fast = mount_factory(bucket, "--list-ttl", "1")
    assert os.listdir(slow.path) == ["a.txt"] == os.listdir(fast.path)
    put("b.txt", b"b")
    assert os.listdir(slow.path) == ["a.txt"]  # trusted for 300 s
    time.sleep(1.3)
    assert sorted(os.listdir(fast.path)) == ["a.txt", "b.txt"]
    assert read_file(fast.path / "b.txt") == b"b"


def test_inodes_are_stable_across_relistings(bucket, s3, put, mount_factory):
    put("d/f.txt", b"f")
    put("g.txt", b"g")
    m = mount_factory(bucket, "--list-ttl", "0.5")
    before = {p: os.stat(m.path / p).st_ino for p in ("d", "d/f.txt", "g.txt")}
    assert len(set(before.values())) == 3
    put("d/new.txt", b"n")
    s3.delete_object(Bucket=bucket, Key="g.txt")
    time.sleep(0.7)
    assert sorted(os.listdir(m.path / "d")) == ["f.txt", "new.txt"]
    assert os.listdir(m.path) == ["d"]
    put("g.txt", b"g")  # the same version again (the ETag is the content's MD5)
    time.sleep(0.7)
    assert {p: os.stat(m.path / p).st_ino for p in before} == before
    put("g.txt", b"g again")  # a new version is a new inode: open files keep the old size
    time.sleep(0.7)
    assert os.stat(m.path / "g.txt").st_ino not in before.values()
    assert read_file(m.path / "g.txt") == b"g again"


def drop_kernel_inodes() -> None:
    """Make the kernel evict unused dentries and inodes: FUSE then sends FORGET for each.
    The tests run as root (they mount FUSE), which may write this."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
    except OSError as e:
        pytest.fail(f"cannot make the kernel drop its inodes (/proc/sys/vm/drop_caches: {e})")


def test_names_the_kernel_forgets_are_freed(bucket, put, mount_factory):
    names = [f"many/{i:03d}" for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: put(key, b"x"), names))
    m = mount_factory(bucket, "--list-ttl", "0.3")
    assert len(os.listdir(m.path / "many")) == 200  # readdirplus: 200 references
    assert all(os.stat(m.path / name).st_size == 1 for name in names[::7])  # lookups
    for v in range(8):  # each version is a new inode
        put("v.txt", b"version %d" % v)
        time.sleep(0.35)
        assert read_file(m.path / "v.txt") == b"version %d" % v
    assert m.stats()["namespace.nodes"] >= 200 + 1 + 2
    drop_kernel_inodes()
    # Without a forget handler (or with one that frees nothing) this stays above 200.
    assert wait_until(lambda: m.stats()["namespace.nodes"] <= 4, 10), m.stats()["namespace.nodes"]
    assert m.stats()["namespace.listed_dirs"] == 1  # the root's; "many" is listed again on need
    assert read_file(m.path / "many/007") == b"x"
    assert len(os.listdir(m.path / "many")) == 200
    assert read_file(m.path / "v.txt") == b"version 7"


def test_a_name_held_by_the_kernel_survives_its_listing(bucket, s3, put, mount_factory):
    put("keep.txt", b"k")
    m = mount_factory(bucket, "--list-ttl", "0.3")
    with open(m.path / "keep.txt", "rb") as f:
        assert f.read() == b"k"
        ino = os.fstat(f.fileno()).st_ino
        s3.delete_object(Bucket=bucket, Key="keep.txt")
        time.sleep(0.35)
        assert os.listdir(m.path) == []  # relisted: the name is gone from S3
        drop_kernel_inodes()  # an open file pins its inode: no FORGET for it
        time.sleep(0.35)  # past the attribute timeout: fstat asks the daemon (getattr)
        st = os.fstat(f.fileno())
        assert (st.st_ino, st.st_size) == (ino, 1)
        assert os.pread(f.fileno(), 1, 0) == b"k"


def test_readdir_continues_from_its_opendir_snapshot(bucket, s3, put, mount_factory):
    # Long names: the listing takes several getdents calls (and FUSE readdir requests with
    # offsets), so S3 changes between them.
    names = [f"{i:04d}-" + "n" * 240 for i in range(160)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: put(f"big/{name}", b""), names))
    m = mount_factory(bucket, "--list-ttl", "0.5")
    with os.scandir(m.path / "big") as it:
        first = next(it).name
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: s3.delete_object(Bucket=bucket, Key=f"big/{name}"), names[::2]))
        put("big/0000-added", b"")
        time.sleep(0.7)
        assert len(os.listdir(m.path / "big")) == 81  # a new opendir sees S3's change
        rest = [e.name for e in it]
    assert [first, *rest] == names  # no entry lost or repeated by the change


def test_a_tiny_list_ttl_mounts_and_serves(bucket, put, mount_factory):
    # Start-up used to stat the mount point on the event loop: with the root's attributes
    # already expired, the kernel asked that blocked loop, and the daemon hung.
    put("t.txt", b"tiny ttl")
    m = mount_factory(bucket, "--list-ttl", "0.001")
    cat = subprocess.run(["cat", str(m.path / "t.txt")], capture_output=True, timeout=60)
    assert cat.stdout == b"tiny ttl"
    assert wait_until(lambda: "event=mounted" in m.log.read_text(), 30)


def test_lookups_in_a_fresh_listing_need_no_s3_and_few_requests(bucket, put, mount_factory):
    """Within --list-ttl a directory's names are answered from its listing in memory, a name
    not in it is ENOENT without listing again, and a small file costs four FUSE requests:
    lookup, open, one read, release (issue 19; fuse.requests.<op> counts them)."""
    for i in range(5):
        put(f"d/f{i}", b"x%d" % i * 1000)
    m = mount_factory(bucket, "--list-ttl", "2")
    assert read_file(m.path / "d" / "f0") == b"x0" * 1000  # lists the root and d
    before = m.stats()
    for i in range(1, 5):
        assert read_file(m.path / "d" / f"f{i}") == b"x%d" % i * 1000
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "d" / "nope")
    # The kernel sends a release after close() returns, not before: wait for the last one.
    assert wait_until(lambda: m.stats().get("fuse.requests.release", 0)
                      - before.get("fuse.requests.release", 0) >= 4, 10)
    after = m.stats()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta["s3.requests.list"] == 0
    assert {op: delta.get(f"fuse.requests.{op}", 0) for op in ("lookup", "open", "read", "release")} \
        == {"lookup": 5, "open": 4, "read": 4, "release": 4}
    put("d/new", b"n")
    time.sleep(2.2)  # the listing is past its TTL: the next lookup lists S3 again
    assert read_file(m.path / "d" / "new") == b"n"
    assert m.stats()["s3.requests.list"] > after["s3.requests.list"]


def test_a_small_tree_is_listed_flat_when_the_kernel_first_looks_into_it(bucket, put, mount_factory,
                                                                         s3server):
    """A walker of a tree of 3 x 3 directories waited for a LIST in each; the tree below the
    first directory the kernel looks into is listed flat (one LIST) and every directory below
    gets its listing from it."""
    keys = [f"tree/a{i}/b{j}/f{k}" for i in range(3) for j in range(3) for k in range(2)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: put(key, key.encode()), keys))
    m = mount_factory(bucket)
    os.stat(m.path / "tree")  # the root is looked into: the whole bucket is a small tree
    assert wait_until(lambda: m.stats()["namespace.listed_dirs"] >= 1 + 1 + 3 + 9, 10), m.stats()
    s3server.reset_counts()
    for key in keys:
        assert read_file(m.path / key) == key.encode()
    assert s3server.counts()["LIST"] == 0
    assert s3server.counts()["GET"] == len(keys)
