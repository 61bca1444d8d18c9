"""Namespace and FileSystem below the mount: the listing's life (TTL, stale listings served
while one refresh runs, inodes across versions), the kernel's references, and which
requests are answered on the trio thread.

Namespace takes its list function and its clock as arguments by design; here they are a
dict of keys and a number the test moves, so nothing sleeps. S3 itself is not stood in
for: the real listing is tested through a mount (tests/test_namespace.py).
"""

import threading

import pytest
import trio
import trio.testing

from tieredfs.errors import BackendUnavailable, ObjectMissing, UnknownHandle
from tieredfs.filesystem import STALE_GRACE, FileSystem
from tieredfs.namespace import ROOT_INO, Namespace
from tieredfs.tiers.s3 import ListedObject, Listing

TTL = 10.0


class Bucket:
    """Keys -> ETags, listed as S3 lists a delimited prefix; counts the listings."""

    def __init__(self, keys: dict[str, str]):
        self.keys = dict(keys)
        self.lists = 0
        self.gate: threading.Event | None = None  # when set up, a listing waits on it
        self.listing = threading.Event()
        self.fail = False

    def list_dir(self, prefix: str) -> Listing:
        self.lists += 1
        self.listing.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never let the listing finish"
        if self.fail:
            raise BackendUnavailable("S3 LIST failed after retries: test")
        prefixes, objects = set(), []
        for key, etag in sorted(self.keys.items()):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if "/" in rest:
                prefixes.add(prefix + rest.split("/")[0] + "/")
            else:
                objects.append(ListedObject(key, len(etag), 0, etag))
        return Listing(sorted(prefixes), objects)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def namespace(keys: dict[str, str]) -> tuple[Namespace, Bucket, Clock]:
    bucket, clock = Bucket(keys), Clock()
    return Namespace("", bucket.list_dir, TTL, 0, clock=clock), bucket, clock


def names(nodes) -> list[bytes]:
    return [n.name for n in nodes]


def test_a_directory_is_listed_once_per_ttl_and_answers_without_s3_meanwhile():
    ns, bucket, clock = namespace({"a": "1", "d/x": "2"})
    assert ns.lookup(ROOT_INO, b"a", wait=False) is None  # never listed: needs S3
    a = ns.lookup(ROOT_INO, b"a")
    assert (a.size, a.is_dir, bucket.lists) == (1, False, 1)
    assert ns.lookup(ROOT_INO, b"a", wait=False) is a
    assert names(ns.children(ROOT_INO, wait=False)) == [b"a", b"d"]
    with pytest.raises(ObjectMissing):
        ns.lookup(ROOT_INO, b"nope", wait=False)
    assert bucket.lists == 1
    clock.now += TTL
    assert ns.lookup(ROOT_INO, b"a", wait=False) is None  # stale, and nobody is relisting
    assert ns.children(ROOT_INO, wait=False) is None
    assert ns.lookup(ROOT_INO, b"a") is a and bucket.lists == 2


def test_inodes_follow_the_etag_across_relistings():
    ns, bucket, clock = namespace({"f": "v1", "g": "g1"})
    f1, g = ns.lookup(ROOT_INO, b"f"), ns.lookup(ROOT_INO, b"g")
    bucket.keys["f"] = "v2"
    del bucket.keys["g"]
    clock.now += TTL
    f2 = ns.lookup(ROOT_INO, b"f")
    assert f2.ino != f1.ino and f2.etag == "v2"
    assert names(ns.children(ROOT_INO)) == [b"f"]
    # The kernel still holds the old f and g: they keep their attributes until it forgets.
    assert ns.node(f1.ino).etag == "v1" and ns.node(g.ino).name == b"g"
    bucket.keys["g"] = "g1"  # the same version again: the same inode
    clock.now += TTL
    assert ns.lookup(ROOT_INO, b"g").ino == g.ino
    assert ns.forget([(f1.ino, 1)]) == [f1.ino]
    with pytest.raises(ObjectMissing):
        ns.node(f1.ino)  # gone from S3 and from the kernel: freed


def test_a_stale_listing_answers_while_one_refresh_runs():
    ns, bucket, clock = namespace({"old": "1"})
    old = ns.lookup(ROOT_INO, b"old")
    snapshot = ns.children(ROOT_INO)
    bucket.keys = {"new": "2"}
    clock.now += TTL
    bucket.gate = threading.Event()
    bucket.listing.clear()
    refresher = threading.Thread(target=ns.lookup, args=(ROOT_INO, b"new"))
    refresher.start()
    try:
        assert bucket.listing.wait(30)
        # The refresh is under way: the old listing answers, on any thread, without waiting.
        assert ns.lookup(ROOT_INO, b"old", wait=False) is old
        assert ns.lookup(ROOT_INO, b"old") is old  # a worker thread does not queue either
        assert names(ns.children(ROOT_INO, wait=False)) == [b"old"]
        assert bucket.lists == 2  # one refresh, not one per request
    finally:
        bucket.gate.set()
        refresher.join(30)
    assert names(ns.children(ROOT_INO, wait=False)) == [b"new"]
    assert names(snapshot) == [b"old"]  # an opendir's snapshot is never changed


def test_a_failed_refresh_keeps_the_last_listing():
    ns, bucket, clock = namespace({"a": "1"})
    a = ns.lookup(ROOT_INO, b"a")
    clock.now += TTL
    bucket.fail = True
    assert ns.lookup(ROOT_INO, b"a") is a
    assert ns.lookup(ROOT_INO, b"a", wait=False) is a  # trusted a few seconds more
    ns2, bucket2, _ = namespace({"a": "1"})
    bucket2.fail = True
    with pytest.raises(BackendUnavailable):  # nothing listed before: nothing to serve
        ns2.lookup(ROOT_INO, b"a")


def test_a_forgotten_directory_is_freed_by_reap_and_listed_again_on_need():
    ns, bucket, _ = namespace({f"d/{i:03d}": "e" for i in range(50)})
    d = ns.lookup(ROOT_INO, b"d")
    kids = ns.children(d.ino)
    for k in kids:
        ns.remember(k)
    assert ns.gauges()["namespace.nodes"] == 1 + 1 + 50
    ns.forget([(k.ino, 1) for k in kids])
    assert ns.gauges()["namespace.nodes"] == 52  # still listed: names S3 has stay
    assert ns.forget([(d.ino, 1)]) == [d.ino]
    assert ns.unreaped()
    ns.reap(chunk=7)  # several lock holds, none of them long
    assert not ns.unreaped()
    assert ns.gauges() == {"namespace.nodes": 2, "namespace.listed_dirs": 1}
    assert len(ns.children(ns.lookup(ROOT_INO, b"d").ino)) == 50
    assert bucket.lists == 3


def test_next_siblings_come_from_the_held_listing():
    ns, bucket, _ = namespace({f"{c}": "e" for c in "abcdef"})
    c = ns.lookup(ROOT_INO, b"c")
    pos, after = ns.next_siblings(c.ino, 2)
    assert (pos, names(after)) == (2, [b"d", b"e"])
    assert ns.next_siblings(ROOT_INO, 2) == (-1, [])
    assert bucket.lists == 1


def filesystem(keys: dict[str, str]) -> tuple[FileSystem, Namespace, Bucket, trio.CapacityLimiter]:
    ns, bucket, _ = namespace(keys)
    limiter = trio.CapacityLimiter(1)
    # No reads here: the reader is not needed.
    return FileSystem(ns, None, "b", limiter, dict), ns, bucket, limiter


def test_listed_names_are_answered_while_listings_hold_every_worker_slot():
    async def main():
        fs, ns, bucket, limiter = filesystem({"a": "1", "d/x": "2"})
        a = await fs.lookup(ROOT_INO, b"a")  # lists the root, in a worker thread
        async with limiter:  # every listing slot busy (a big directory being listed)
            with trio.fail_after(10):  # a hang detector: a thread hop would wait forever
                assert await fs.lookup(ROOT_INO, b"a") is a
                fh = await fs.opendir(ROOT_INO)
        got = []
        fs.readdir(fh, 0, lambda node, nxt: got.append((node.name, nxt)) or True)
        assert got == [(b"a", 1), (b"d", 2)]
        fs.releasedir(fh)
        with pytest.raises(UnknownHandle):
            fs.readdir(fh, 0, lambda node, nxt: True)
        with pytest.raises(UnknownHandle):
            await fs.read(12345, 0, 10)
        assert bucket.lists == 1

    trio.run(main)


def test_forget_frees_a_big_listing_in_the_background():
    async def main():
        fs, ns, bucket, _ = filesystem({f"d/{i}": "e" for i in range(500)})
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            d = await fs.lookup(ROOT_INO, b"d")
            fh = await fs.opendir(d.ino)
            fs.readdir(fh, 0, lambda node, nxt: True)  # 500 references handed out
            fs.releasedir(fh)
            fs.forget([(n.ino, 1) for n in ns.children(d.ino)] + [(d.ino, 1)])
            with trio.fail_after(30):
                while ns.gauges()["namespace.nodes"] > 2:
                    await trio.sleep(0.01)

    trio.run(main)


def test_past_the_ttl_a_slow_refresh_is_waited_for_a_moment_then_the_last_listing_answers():
    async def main():
        ns, bucket, clock = namespace({"old": "1"})
        fs = FileSystem(ns, None, "b", trio.CapacityLimiter(4), dict)
        async with trio.open_nursery() as nursery:
            fs.start(nursery)
            old = await fs.lookup(ROOT_INO, b"old")
            clock.now += TTL
            bucket.keys["new"] = "2"
            bucket.gate = threading.Event()  # the refresh takes as long as the test says
            bucket.listing.clear()
            # Waited for STALE_GRACE (trio's mock clock jumps it), then the last listing.
            assert await fs.lookup(ROOT_INO, b"old") is old
            assert await trio.to_thread.run_sync(bucket.listing.wait, 30)
            assert names(ns.children(ROOT_INO, wait=False)) == [b"old"]  # still refreshing
            got = {}

            async def look_new():
                got["new"] = await fs.lookup(ROOT_INO, b"new")  # not in the last listing

            nursery.start_soon(look_new)
            await trio.sleep(STALE_GRACE / 2)  # the mock clock's time: no real wait
            assert "new" not in got  # a missing name waits for the refresh
            bucket.gate.set()
        assert got["new"].name == b"new" and bucket.lists == 2

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


class TreeBucket(Bucket):
    """Also lists every key under a prefix at once, as a flat ListObjectsV2 does."""

    trees = 0

    def list_tree(self, prefix: str, max_keys: int) -> list[ListedObject] | None:
        self.trees += 1
        found = [ListedObject(key, len(etag), 0, etag) for key, etag in sorted(self.keys.items())
                 if key.startswith(prefix)]
        return found if len(found) <= max_keys else None


def tree(ns: Namespace, ino: int, wait: bool) -> dict:
    """Every directory's entries below `ino`, by path: (name, is_dir, size, etag) each."""
    out, todo = {}, [(ino, b"")]
    while todo:
        at, path = todo.pop()
        children = ns.children(at, wait=wait)
        assert children is not None, f"{path!r} has no listing"
        out[path] = [(n.name, n.is_dir, n.size, n.etag) for n in children]
        todo += [(n.ino, path + b"/" + n.name) for n in children if n.is_dir]
    return out


AWKWARD_TREE = {"top/a/x": "1", "top/a/b/y": "22", "top/a/b/c/z": "333", "top/d/": "4",
                "top/d/w": "55", "top/e//f": "6", "top/g": "77", "top/a/b/c/.": "8", "other": "9"}


def test_a_small_tree_listed_flat_gives_each_directory_what_its_own_listing_gives():
    """Namespace.list_tree: one flat listing of a tree, split into the listing each directory
    below would get from its own delimited LIST (markers, an empty component, a `.`)."""
    flat, delimited = TreeBucket(AWKWARD_TREE), Bucket(AWKWARD_TREE)
    ns = Namespace("", flat.list_dir, TTL, 0, clock=Clock(), list_tree=flat.list_tree)
    reference = Namespace("", delimited.list_dir, TTL, 0, clock=Clock())
    top, top_ref = ns.lookup(ROOT_INO, b"top"), reference.lookup(ROOT_INO, b"top")
    ns.children(top.ino)  # the kernel looked into it: listed on its own
    covered = ns.list_tree(top.ino, 100)
    assert flat.trees == 1 and flat.lists == 2  # the root and top: nothing below listed alone
    assert tree(ns, top.ino, wait=False) == tree(reference, top_ref.ino, wait=True)
    assert sorted(ns.node(ino).key for ino in covered) == ["top/a/", "top/a/b/", "top/a/b/c/", "top/d/", "top/e/"]
    assert flat.lists == 2


def test_a_tree_over_the_limit_is_left_to_be_listed_a_directory_at_a_time():
    bucket = TreeBucket(AWKWARD_TREE)
    ns = Namespace("", bucket.list_dir, TTL, 0, clock=Clock(), list_tree=bucket.list_tree)
    top = ns.lookup(ROOT_INO, b"top")
    ns.children(top.ino)
    assert ns.list_tree(top.ino, 3) == [] and bucket.trees == 1
    a = ns.lookup(top.ino, b"a", wait=False)
    assert ns.children(a.ino, wait=False) is None  # listed when asked, as before
