"""The listings kept in the cache dir (listings_store.py), on a real SQLite file, and how the
namespace uses them: fresh for the rest of their TTL, stale (refreshed) past it, never after
S3 showed one wrong. Through real mounts: tests/test_listings_restart.py."""

import logging
import secrets
import sqlite3
import time

import pytest

from tieredfs.listings_store import ListingStore, identity
from tieredfs.namespace import ROOT_INO, Namespace
from tieredfs.tiers.s3 import ListedObject, Listing

from tests.test_namespace_unit import TTL, Bucket, Clock, names


def listing(prefix: str, n: int, etag: str = "e") -> Listing:
    return Listing([prefix + "sub/"], [ListedObject(f"{prefix}f{i}", i, i * 10**9, etag) for i in range(n)])


def reopened(store: ListingStore, ident: str = "ep|b", max_bytes: int = 1 << 20) -> ListingStore:
    store.close()
    return ListingStore(store.path, ident, max_bytes)


def test_a_listing_comes_back_after_a_restart_as_old_as_it_is(tmp_path):
    store = ListingStore(tmp_path / "l.sqlite", "ep|b", 1 << 20)
    kept = listing("d/", 50)
    store.save("d/", kept, time.time() - 30)
    store = reopened(store)
    got, age = store.load("d/")
    assert got == kept and 29 < age < 120
    assert store.load("other/") is None
    # Another bucket (or the same name on another endpoint) never sees it.
    assert reopened(store, "ep|b2").load("d/") is None
    assert identity("http://127.0.0.1:9000/", None, "b") != identity("http://127.0.0.1:9001", None, "b")
    assert (tmp_path / "l.sqlite").stat().st_mode & 0o077 == 0  # private, as the cache's files


def test_damaged_rows_and_files_are_ignored_with_one_line(tmp_path, caplog):
    path = tmp_path / "l.sqlite"
    store = ListingStore(path, "ep|b", 1 << 20)
    store.save("d/", listing("d/", 5), time.time())
    store.close()
    with sqlite3.connect(path) as db:  # a row whose blob is not what was written
        db.execute("UPDATE listings SET data = ? WHERE prefix = 'd/'", (b"x" * 40,))
    db.close()
    store = ListingStore(path, "ep|b", 1 << 20)
    with caplog.at_level(logging.WARNING):
        assert store.load("d/") is None
    assert [r.message for r in caplog.records if "listing_ignored" in r.message]
    store.close()
    caplog.clear()
    path.write_bytes(b"not a database " * 500)
    store = ListingStore(path, "ep|b", 1 << 20)
    with caplog.at_level(logging.WARNING):
        assert store.load("d/") is None
        store.save("d/", listing("d/", 5), time.time())  # started afresh: works again
        store = reopened(store)
        assert store.load("d/") is not None
    assert len([r for r in caplog.records if "listings_file_unusable" in r.message]) == 1
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")  # a newer tieredfs's format
    db.close()
    caplog.clear()
    store = ListingStore(path, "ep|b", 1 << 20)
    with caplog.at_level(logging.WARNING):
        assert store.load("d/") is None
    assert len([r for r in caplog.records if "format version 99" in r.message]) == 1
    store.close()


def test_the_store_keeps_to_its_bound_dropping_the_oldest(tmp_path):
    store = ListingStore(tmp_path / "l.sqlite", "ep|b", 256 << 10)
    for i in range(40):  # each a few KiB compressed: together well past the bound
        store.save(f"d{i}/", Listing([], [ListedObject(f"d{i}/{secrets.token_hex(8)}", j, j,
                                                       secrets.token_hex(16)) for j in range(400)]),
                   time.time())
        store.close()
        store = ListingStore(store.path, "ep|b", 256 << 10)
    with sqlite3.connect(store.path) as db:
        stored = db.execute("SELECT SUM(LENGTH(data)) FROM listings").fetchone()[0]
    db.close()
    assert stored <= 256 << 10
    assert store.load("d39/") is not None and store.load("d0/") is None
    store.close()


def kept_namespace(tmp_path, keys: dict[str, str]) -> tuple[Namespace, Bucket, Clock, ListingStore]:
    bucket, clock = Bucket(keys), Clock()
    store = ListingStore(tmp_path / "l.sqlite", "ep|b", 1 << 20)
    return Namespace("", bucket.list_dir, TTL, 0, clock=clock, store=store), bucket, clock, store


def test_a_restarted_namespace_answers_from_the_kept_listing(tmp_path):
    ns, bucket, clock, store = kept_namespace(tmp_path, {"a": "1", "d/x": "2"})
    assert names(ns.children(ROOT_INO)) == [b"a", b"d"] and bucket.lists == 1
    store.close()
    # A new daemon within the TTL: no listing at all.
    ns, bucket, clock, store = kept_namespace(tmp_path, {"a": "1", "d/x": "2", "new": "3"})
    assert ns.restore(ROOT_INO) and ns.fresh(ROOT_INO)
    assert names(ns.children(ROOT_INO, wait=False)) == [b"a", b"d"] and bucket.lists == 0
    # Past the TTL it is stale: it answers when asked to, and the next refresh lists S3.
    clock.now += TTL
    assert ns.lookup(ROOT_INO, b"a", wait=False) is None
    assert ns.lookup(ROOT_INO, b"a", wait=False, stale=True).etag == "1"
    assert names(ns.children(ROOT_INO)) == [b"a", b"d", b"new"] and bucket.lists == 1
    assert not ns.restore(ns.lookup(ROOT_INO, b"d").ino)  # never listed: nothing kept
    store.close()


def test_a_kept_listing_older_than_the_ttl_is_stale_at_once(tmp_path):
    store = ListingStore(tmp_path / "l.sqlite", "ep|b", 1 << 20)
    store.save("", Listing([], [ListedObject("a", 1, 0, "1")]), time.time() - 2 * TTL)
    ns = Namespace("", Bucket({"a": "2"}).list_dir, TTL, 0, clock=Clock(), store=store)
    assert ns.restore(ROOT_INO) and not ns.fresh(ROOT_INO)
    assert ns.lookup(ROOT_INO, b"a").etag == "2"  # a request that waits gets S3's version
    store.close()


def test_a_directory_marked_stale_is_never_answered_from_disk(tmp_path):
    ns, bucket, clock, store = kept_namespace(tmp_path, {"a": "1"})
    a = ns.lookup(ROOT_INO, b"a")
    ns.mark_stale(a.ino)  # a read found `a` gone from S3
    assert not ns.restore(ROOT_INO)
    store.close()
    store = ListingStore(tmp_path / "l.sqlite", "ep|b", 1 << 20)
    assert store.load("") is None  # nor after a restart
    store.close()
