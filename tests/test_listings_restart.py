"""A restarted daemon on a warm cache serves from the listings it kept (docs/namespace.md,
"Listings kept across restarts"): real mounts on moto, LISTs counted on the server."""

import os
import sqlite3
import time

import pytest

from tieredfs.devserver import wait_until

from tests.conftest import read_uncached

DIRS = ["", "a/", "a/b/", "c/"]


def tree(put) -> dict[str, bytes]:
    files = {}
    for d in DIRS:
        for i in range(4):
            files[f"{d}f{i}"] = put(f"{d}f{i}", os.urandom(1000 + 97 * i))
    return files


def walk(root, files: dict[str, bytes]) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            assert read_uncached(os.path.join(dirpath, name)) == files[rel], rel


def counted(s3server, fn) -> dict:
    before = s3server.counts()
    fn()
    after = s3server.counts()
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("LIST", "GET")}


def test_a_restarted_daemon_walks_a_warm_cache_without_listing(bucket, put, mount_factory, s3server,
                                                               tmp_path):
    files = tree(put)
    m = mount_factory(bucket)
    walk(m.path, files)
    m.settle()
    m.stop()
    m.start()
    kept = counted(s3server, lambda: walk(m.path, files))
    assert kept == {"LIST": 0, "GET": 0}, kept
    assert m.stats()["listings.loads"] == len(DIRS)
    m.stop()
    # The same restart without the kept listings lists every directory again.
    m.extra.append("--no-persist-listings")
    m.start()
    assert counted(s3server, lambda: walk(m.path, files)) == {"LIST": len(DIRS), "GET": 0}


def test_an_object_overwritten_while_down_is_read_new_after_the_refresh(bucket, put, mount_factory,
                                                                        s3server):
    files = tree(put)
    # A TTL of 1 s: the restart below finds listings older than it (stale).
    m = mount_factory(bucket, "--list-ttl", "1")
    walk(m.path, files)
    m.settle()
    m.stop()
    old = files["a/f1"]
    new = put("a/f1", os.urandom(3000))  # another size and ETag; the old one's blocks are cached
    put("a/new", b"created while the daemon was down")
    time.sleep(1.2)  # (not a timing check: the kept listings must be older than the 1 s TTL)
    m.start()
    # Answered at once from the kept listing (the old version, whole) or already refreshed.
    assert read_uncached(m.path / "a/f1") in (old, new)
    # A name the kept listing lacks waits for the refresh instead of being ENOENT.
    assert read_uncached(m.path / "a/new") == b"created while the daemon was down"
    seen = []

    def now_new() -> bool:
        data = read_uncached(m.path / "a/f1")
        seen.append(data)
        return data == new

    assert wait_until(now_new, 30)  # once the refresh and the kernel's 1 s entry cache are past
    assert all(d in (old, new) for d in seen)  # never a mix of versions, never other bytes
    assert m.stats()["listings.loads"] >= 2


@pytest.mark.parametrize("damage", ["garbage", "newer_format"])
def test_a_damaged_or_newer_listings_file_is_ignored_with_one_line(bucket, put, mount_factory,
                                                                   s3server, damage):
    files = tree(put)
    m = mount_factory(bucket)
    walk(m.path, files)
    m.settle()
    m.stop()
    path = m.cache_dir / "listings.sqlite"
    if damage == "garbage":
        path.write_bytes(os.urandom(64 << 10))
    else:
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 7")
        db.close()
    m.start()
    # Listed from S3 again, right bytes; one line says why, and no traceback.
    assert counted(s3server, lambda: walk(m.path, files)) == {"LIST": len(DIRS), "GET": 0}
    m.stop()
    log = m.log.read_text()
    assert log.count("event=listings_file_unusable") == 1, log
    assert "Traceback" not in log
    m.start()  # the file was started afresh: the next restart uses it
    assert counted(s3server, lambda: walk(m.path, files))["LIST"] == 0


def test_another_buckets_listing_is_never_used(s3, s3server, mount_factory, tmp_path):
    buckets = [f"kept-{os.getpid()}-{i}" for i in range(2)]
    for i, b in enumerate(buckets):
        s3.create_bucket(Bucket=b)
        s3.put_object(Bucket=b, Key=f"only-in-{i}", Body=b"x")
    cache = tmp_path / "shared-cache"
    m = mount_factory(buckets[0], cache_dir=cache)
    assert os.listdir(m.path) == ["only-in-0"]
    m.stop()
    m2 = mount_factory(buckets[1], cache_dir=cache)
    assert os.listdir(m2.path) == ["only-in-1"]
