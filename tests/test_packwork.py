"""The packer's work files (packwork.py): what a run keeps, adopts, packs and lists, on real
SQLite files; no S3 needed, since a run's view of its prefix is local."""

import sqlite3

from tieredfs.packindex import Entry, Other, Pack, PackIndex, write_index
from tieredfs.packwork import PackWork
from tieredfs.tiers.s3 import ListedObject

MD5 = "0123456789abcdef0123456789abcdef"


def listed(path: str, size: int = 10, etag: str = MD5, mtime_ns: int = 7) -> tuple[str, ListedObject]:
    return path, ListedObject("p/" + path, size, mtime_ns, etag)


def work_on(tmp_path, sources) -> PackWork:
    (tmp_path / "work").mkdir()
    work = PackWork(tmp_path / "work", "p/")
    work.add_sources(sources)
    return work


def test_plan_lists_what_is_left_in_walk_order_within_the_size_bounds(tmp_path):
    work = work_on(tmp_path, [listed("b/x"), listed("a"), listed("b/c/y"), listed("b/a"),
                              listed("empty", 0), listed("big", 11), listed("c/z", 11 - 1)])
    assert work.plan(10) == (5, 50)
    assert [o.key for o in work.todo()] == ["p/a", "p/b/a", "p/b/x", "p/b/c/y", "p/c/z"]
    work.packed(Pack("p/.tieredfs/packs/r-00000.pack", "e1", 20), [("a", MD5, 10, 0, 1), ("b/a", MD5, 10, 10, 2)])
    assert work.plan(10) == (3, 30)  # what a pack holds is not planned again
    assert [o.key for o in work.todo()] == ["p/b/x", "p/b/c/y", "p/c/z"]
    assert next(work.todo()) == ListedObject("p/b/x", 10, 0, MD5)


def test_a_page_boundary_in_the_plan_loses_nothing(tmp_path):
    work = work_on(tmp_path, [listed(f"d/f{i:05d}") for i in range(2500)])
    assert work.plan(10) == (2500, 25000)
    assert [o.key for o in work.todo()] == [f"p/d/f{i:05d}" for i in range(2500)]


def test_keep_takes_the_entries_whose_source_and_pack_are_unchanged(tmp_path):
    live, replaced = Pack("p/.tieredfs/packs/r-1.pack", "pe1", 40), Pack("p/.tieredfs/packs/r-2.pack", "pe2", 10)
    old = [Entry("same", MD5, 10, live, 0, 1), Entry("new-etag", MD5, 10, live, 10, 2),
           Entry("new-size", MD5, 10, live, 20, 3), Entry("gone", MD5, 10, live, 30, 4),
           Entry("in-replaced-pack", MD5, 10, replaced, 0, 5)]
    write_index(tmp_path / "old.sqlite", "p/", old, [Other("big", "b" * 32, 99, 5)])
    work = work_on(tmp_path, [listed("same", mtime_ns=123), listed("new-etag", etag="f" * 32),
                              listed("new-size", 11), listed("in-replaced-pack"), listed("big", 99, "b" * 32, 5)])
    kept, dropped = work.keep(tmp_path / "old.sqlite", {live.key: "pe1", replaced.key: "pe2-overwritten"}, True)
    assert (kept, dropped) == (1, 4)
    assert work.plan(20) == (3, 31)  # the changed sources and the one whose pack changed
    entries, packs, others_changed = work.finish()
    # Only the live pack is named; the three left unpacked join the index's others.
    assert (entries, packs, others_changed) == (1, 1, True)
    index = PackIndex(work.index_path)
    # The kept entry carries its source's mtime as listed now; its pack has a new id.
    assert index.entries() == [Entry("same", MD5, 10, live, 0, 1, 123)]
    assert {o.path for o in index.others()} == {"new-etag", "new-size", "in-replaced-pack", "big"}
    index.close()


def test_adopt_takes_a_manifests_unchanged_rows_not_already_packed(tmp_path):
    work = work_on(tmp_path, [listed("a"), listed("b"), listed("c", etag="c" * 32)])
    pack1, pack2 = Pack("p/.tieredfs/packs/r-1.pack", "e1", 20), Pack("p/.tieredfs/packs/r-2.pack", "e2", 30)
    assert work.adopt(pack1, [["a", MD5, 10, 0, 1], ["b", MD5, 10, 10, 2]]) == 2
    # A second manifest holding a: a is packed already; c changed since; d is gone.
    assert work.adopt(pack2, [["a", MD5, 10, 0, 3], ["c", MD5, 10, 10, 4], ["d", MD5, 10, 20, 5]]) == 0
    assert work.finish()[:2] == (2, 1)  # pack2 names no entry: not in the index


def test_others_changed_is_what_decides_a_new_version_when_nothing_was_packed(tmp_path):
    pack = Pack("p/.tieredfs/packs/r-1.pack", "pe", 10)
    write_index(tmp_path / "old.sqlite", "p/", [Entry("a", MD5, 10, pack, 0, 1, 7)], [Other("big", MD5, 99, 7)])
    cases = {"same": ([listed("a"), listed("big", 99)], False),
             "a big file added": ([listed("a"), listed("big", 99), listed("big2", 99)], True),
             "a big file gone": ([listed("a")], True),
             "a big file touched": ([listed("a"), listed("big", 99, mtime_ns=8)], True)}
    for name, (sources, changed) in cases.items():
        sub = tmp_path / name
        sub.mkdir()
        work = work_on(sub, sources)
        assert work.keep(tmp_path / "old.sqlite", {pack.key: "pe"}, True) == (1, 0)
        assert work.finish()[2] is changed, name
        work.close()


def test_others_of_an_index_that_did_not_list_them(tmp_path):
    pack = Pack("p/.tieredfs/packs/r-1.pack", "pe", 10)
    write_index(tmp_path / "old.sqlite", "p/", [Entry("a", MD5, 10, pack, 0, 1)])
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("DROP TABLE others")  # as the first indexes were
    db.commit()
    db.close()
    for name, sources, changed in (("none", [listed("a")], False), ("one", [listed("a"), listed("big", 99)], True)):
        (tmp_path / name).mkdir()
        work = work_on(tmp_path / name, sources)
        work.keep(tmp_path / "old.sqlite", {pack.key: "pe"}, False)
        assert work.finish()[2] is changed
        work.close()


def test_in_order_keeps_the_order_and_at_most_a_window_of_calls_out():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tieredfs.packer import in_order

    lock, out, most = threading.Lock(), [0], [0]

    def call(i):
        with lock:
            out[0] += 1
            most[0] = max(most[0], out[0])
        time.sleep(0.001 * (i % 3))  # finishing out of order
        with lock:
            out[0] -= 1
        return i * i

    submitted = []
    with ThreadPoolExecutor(8) as pool:
        real_submit = pool.submit
        pool.submit = lambda fn, item: submitted.append(item) or real_submit(fn, item)
        got = []
        for item, result in in_order(pool, call, range(100), window=5):
            assert len(submitted) - len(got) <= 5  # never more than the window ahead
            got.append((item, result))
    assert got == [(i, i * i) for i in range(100)] and most[0] <= 5
