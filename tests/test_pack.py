"""`tieredfs pack` and reading packed files through a real mount of moto's S3 server."""

import math
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import fill_up, read_uncached, tieredfs_cmd
from tests.faults.proxy import FaultProxy
from tieredfs.devserver import wait_until

MiB = 1 << 20


def upload(s3, bucket: str, files: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(10) as pool:  # boto3 keeps 10 connections
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), files.items()))


def small_tree(prefix: str, n: int, seed: int) -> dict[str, bytes]:
    """n files of 1 B to 64 KiB (log-uniform: mostly small, as real trees are), nested dirs."""
    rnd = random.Random(seed)
    return {f"{prefix}d{i % 5}/e{i % 3}/f{i:05d}.bin": rnd.randbytes(int(2 ** rnd.uniform(0, 16)))
            for i in range(n)}


def pack(s3server, bucket: str, prefix: str, *args: str, check: bool = True,
         env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(tieredfs_cmd("pack", f"s3://{bucket}/{prefix}", "--endpoint-url", s3server.url,
                                       *args), capture_output=True, text=True, timeout=240, env=env)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def keys(s3, bucket: str, prefix: str) -> dict[str, int]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update((o["Key"], o["Size"]) for o in page.get("Contents", ()))
    return out


def read_all(root, files: dict[str, bytes], prefix: str, threads: int = 8) -> None:
    def check(item):
        key, data = item
        assert read_uncached(root / key[len(prefix):]) == data, key

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(check, sorted(files.items())))


def index_of(s3, bucket: str, prefix: str, tmp_path) -> sqlite3.Connection:
    import json
    pointer = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}.tieredfs/index.json")["Body"].read())
    path = tmp_path / "index.sqlite"
    path.write_bytes(s3.get_object(Bucket=bucket, Key=f"{prefix}.tieredfs/{pointer['index']}")["Body"].read())
    return sqlite3.connect(path)


def test_packed_tree_reads_right_in_one_get_per_pack_block(s3, s3server, bucket, mount_factory, tmp_path):
    files = small_tree("data/", 2000, seed=1)
    upload(s3, bucket, files)
    out = pack(s3server, bucket, "data", "--pack-size", "4M", "--parallel", "16").stdout
    assert "packed 2000 files" in out and "index index/" in out
    stored = keys(s3, bucket, "data/.tieredfs/packs/")
    pack_blocks = sum(math.ceil(size / MiB) for k, size in stored.items() if k.endswith(".pack"))
    assert sum(size for k, size in stored.items() if k.endswith(".pack")) == sum(map(len, files.values()))
    # The sources are untouched.
    assert {k: v for k, v in keys(s3, bucket, "data/").items() if "/.tieredfs/" not in k} == \
        {k: len(v) for k, v in files.items()}

    m = mount_factory(bucket)
    s3server.reset_counts()
    assert sorted(os.listdir(m.path / "data")) == [f"d{i}" for i in range(5)]  # .tieredfs hidden
    read_all(m.path, files, "")
    counts = s3server.counts()
    # One GET each for the pointer and the index; every other GET is of a pack block.
    assert counts["GET"] <= pack_blocks + 2, (counts, pack_blocks)
    assert counts["LIST"] <= 1 + 1 + 5 + 15  # root, data, d*, d*/e*
    stats = m.stats()
    assert stats["packs.packed_opens"] == 2000 and stats.get("packs.stale_bypassed", 0) == 0
    # Opens found their range without a worker thread; many reads were served from held blocks.
    assert stats["packs.preloaded_files"] == 2000 and stats["readahead.pack_held_hits"] > 0

    # Ten sources overwritten after packing: a mount serves their new bytes, from the sources.
    changed = {k: b"new bytes of " + k.encode() for k in sorted(files)[::200]}
    upload(s3, bucket, changed)
    # Without the listings kept on restart: within their TTL they would still be trusted
    # (docs/namespace.md, "Listings kept across restarts").
    m.extra.append("--no-persist-listings")
    m.restart()
    read_all(m.path, changed, "")
    assert m.stats()["packs.stale_bypassed"] == 10
    # A re-run packs only those ten.
    out = pack(s3server, bucket, "data").stdout
    assert "packed 10 files" in out and "kept 1990" in out and "dropped 10 stale" in out


def test_a_packed_walk_on_a_tight_budget_costs_one_get_per_chunk(s3, s3server, bucket, mount_factory):
    """8 readers all over the packs, room in the readahead budget for 2 chunks, and slow GETs
    (the fault proxy adds 0.3 s to each): the chunks whose fetch waits for room are claimed
    all the same, so their files' reads join them. Unclaimed, each read fetched its own
    block, and the chunk's GET, made later, was split around them."""
    files = small_tree("tight/", 600, seed=3)
    upload(s3, bucket, files)
    pack(s3server, bucket, "tight", "--pack-size", "1M")
    packs = keys(s3, bucket, "tight/.tieredfs/packs/")
    chunks = sum(math.ceil(size / MiB) for k, size in packs.items() if k.endswith(".pack"))
    slow = FaultProxy(s3server.url).start()
    try:
        m = mount_factory(bucket, "--block-size", "256K", "--pack-readahead", "1M",
                          "--readahead-budget", "2M", "--small-file-threshold", "256K",
                          endpoint=slow.url)
        os.listdir(m.path / "tight")
        for d in range(5):
            for e in range(3):
                os.listdir(m.path / f"tight/d{d}/e{e}")  # the listings first: only data GETs below
        slow.add("latency", seconds=0.3)
        s3server.reset_counts()
        # In file number order, as the bench's walk: every directory, so every pack, at once.
        by_number = sorted(files, key=lambda key: key.rsplit("/f", 1)[1])
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda key: read_uncached(m.path / key), by_number)) == \
                [files[key] for key in by_number]
        assert s3server.counts()["GET"] <= chunks, (s3server.counts(), chunks)
        assert m.stats().get("readahead.pack_budget_waits", 0) > 0  # the case this is about happened
    finally:
        slow.stop()


def test_a_packed_file_read_from_tier1_reads_its_own_chunks_not_the_block(s3, s3server, bucket,
                                                                          mount_factory):
    """Nothing held in memory (a budget too small for a pack chunk) and tier 1 warm: each
    packed file's read takes only its own bytes from tier 1 (read and verified by 16 KiB
    chunk, with the 64 KiB around, where its neighbours often are), not its whole block."""
    files = small_tree("parts/", 200, seed=4)
    upload(s3, bucket, files)
    pack(s3server, bucket, "parts", "--pack-size", "1M")
    m = mount_factory(bucket, "--block-size", "256K", "--pack-readahead", "256K",
                      "--readahead-budget", "256K", "--small-file-threshold", "256K")
    read_all(m.path, files, "")
    m.settle()
    m.restart()
    for d in range(5):
        for e in range(3):
            os.listdir(m.path / f"parts/d{d}/e{e}")
    s3server.reset_counts()
    for key in sorted(files):  # pack order
        assert read_uncached(m.path / key) == files[key], key
    stats = m.stats()
    assert s3server.counts()["GET"] == 0
    # What the reads took from tier 1 (beside the chunks prefetched whole: a pack's last,
    # small enough for the budget) is their own bytes, not a block each.
    read_from_tier1 = stats["chain.bytes.local"] - stats.get("readahead.pack_prefetched_bytes", 0)
    assert read_from_tier1 <= sum(map(len, files.values())), stats
    assert stats["chain.part_reads_inline"] > stats.get("chain.part_reads_threaded", 0)


def start_pack_and_wait_for_manifests(s3, s3server, bucket: str, env: dict, n: int) -> subprocess.Popen:
    proc = subprocess.Popen(tieredfs_cmd("pack", f"s3://{bucket}/p", "--endpoint-url", s3server.url,
                                         "--pack-size", "64K", "--parallel", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert wait_until(lambda: len(manifests(s3, bucket)) >= n or proc.poll() is not None, 120)
        assert proc.poll() is None, "the packer finished before it could be interrupted"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def manifests(s3, bucket: str) -> list[str]:
    return [k for k in keys(s3, bucket, "p/.tieredfs/packs/") if k.endswith(".json")]


def test_interrupted_pack_resumes_and_never_names_a_missing_pack(s3, s3server, bucket, mount_factory, tmp_path):
    files = small_tree("p/", 300, seed=2)
    upload(s3, bucket, files)
    (tmp_path / "tmpdir").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmpdir"))
    proc = start_pack_and_wait_for_manifests(s3, s3server, bucket, env, 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = len(manifests(s3, bucket))
    assert "p/.tieredfs/index.json" not in keys(s3, bucket, "p/.tieredfs/")  # pointer last
    # A killed run cannot remove its work files; the next run does.
    assert [d.name.split("-")[:3] for d in (tmp_path / "tmpdir").iterdir()] == [
        ["tieredfs", "pack", str(proc.pid)]]

    out = pack(s3server, bucket, "p", "--pack-size", "64K", "--verify", env=env).stdout
    assert not list((tmp_path / "tmpdir").iterdir())
    adopted = int(out.split("adopted ")[1].split(",")[0])
    assert adopted >= 3 and "packed" in out and "verified 300 packed files: 0 differ" in out
    assert interrupted <= len(manifests(s3, bucket))
    # Every pack the index names exists, with the ETag it names.
    stored = {k: s3.head_object(Bucket=bucket, Key=k)["ETag"].strip('"')
              for k in keys(s3, bucket, "p/.tieredfs/packs/") if k.endswith(".pack")}
    db = index_of(s3, bucket, "p/", tmp_path)
    assert db.execute("SELECT count(*) FROM entries").fetchone()[0] == 300
    for key, etag in db.execute("SELECT key, etag FROM packs"):
        assert stored[key] == etag
    m = mount_factory(bucket, prefix="p")
    read_all(m.path, files, "p/")
    assert m.stats()["packs.packed_opens"] == 300

    # A pack damaged by someone else (a new ETag): its files are read from their sources.
    damaged = sorted(stored)[0]
    s3.put_object(Bucket=bucket, Key=damaged, Body=b"\0" * keys(s3, bucket, damaged)[damaged])
    m.stop()  # (its tier 1 holds the old pack's blocks, rightly: a block is of one version)
    m = mount_factory(bucket, prefix="p")
    read_all(m.path, files, "p/")
    assert m.stats()["packs.pack_read_failures"] >= 1


def test_a_terminated_pack_removes_its_work_files(s3, s3server, bucket, tmp_path):
    upload(s3, bucket, small_tree("p/", 200, seed=6))
    (tmp_path / "tmpdir").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmpdir"))
    proc = start_pack_and_wait_for_manifests(s3, s3server, bucket, env, 1)
    proc.terminate()
    assert proc.wait(60) == 128 + signal.SIGTERM and b"Traceback" not in proc.stderr.read()
    assert not list((tmp_path / "tmpdir").iterdir())
    assert "p/.tieredfs/index.json" not in keys(s3, bucket, "p/.tieredfs/")


def test_edge_prefixes_and_awkward_keys(s3, s3server, bucket, mount_factory):
    # Empty prefix: nothing packed, nothing written.
    out = pack(s3server, bucket, "empty").stdout
    assert "packed 0 files" in out and "index unchanged" in out
    assert keys(s3, bucket, "") == {}
    # No object small enough.
    big = {f"big/b{i}": random.randbytes(3000) for i in range(3)}
    odd = {f"odd/{name}": f"bytes of {name}".encode() * (i + 1) for i, name in enumerate(
        ["sp ace", "pl+us", "per%25cent", "ha#sh", "qu?est", "émoji 😀", "quo'te\"", "a&b=c", "tab\tname"])}
    upload(s3, bucket, big | odd)
    out = pack(s3server, bucket, "big", "--max-file-size", "2K").stdout
    assert "packed 0 files" in out and not keys(s3, bucket, "big/.tieredfs/")
    out = pack(s3server, bucket, "odd", "--dry-run").stdout
    assert "would pack 9 files" in out and not keys(s3, bucket, "odd/.tieredfs/")
    assert "packed 9 files" in pack(s3server, bucket, "odd").stdout
    # The bucket root: its own sources, not the packs and index of odd/ below it.
    assert "packed 12 files" in pack(s3server, bucket, "").stdout
    # A bad option is one line, not a traceback.
    bad = pack(s3server, bucket, "odd", "--pack-size", "lots", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "pack-size" in bad.stderr

    m = mount_factory(bucket)
    read_all(m.path, odd | big, "")
    assert m.stats()["packs.packed_opens"] == 12


def test_a_full_tmpdir_is_one_clear_error_and_leaves_no_index(s3, s3server, bucket, tiny_tmpfs):
    # The packer's work files (listing, plan, new index) go to TMPDIR, here a filesystem with
    # 48 KiB free: room for Python's check of TMPDIR (else it would pick another dir), not for
    # the work files of 400 files.
    files = small_tree("full/" + "long-name-" * 5, 400, seed=5)
    upload(s3, bucket, files)
    fill_up(tiny_tmpfs, leave=48 << 10)
    env = dict(os.environ, TMPDIR=str(tiny_tmpfs))
    done = pack(s3server, bucket, "full", check=False, env=env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "work files" in done.stderr and "TMPDIR" in done.stderr
    # It stopped as an interrupted run does: perhaps a pack written, but no index named.
    assert "full/.tieredfs/index.json" not in keys(s3, bucket, "full/.tieredfs/")
    assert os.listdir(tiny_tmpfs) == ["filler"]  # its temporary directory went too
    # With room again, the next run packs (or adopts) every file.
    (tiny_tmpfs / "filler").unlink()
    out = pack(s3server, bucket, "full", "--verify", env=env).stdout
    assert "verified 400 packed files: 0 differ" in out, out


def test_pack_written_while_a_node_reads(s3, s3server, bucket, mount_factory):
    files = small_tree("live/", 300, seed=3)
    upload(s3, bucket, files)
    m = mount_factory(bucket, "--list-ttl", "1", prefix="live")
    errors, rounds, stop = [], [0], threading.Event()

    def reader():
        try:
            while not stop.is_set():
                read_all(m.path, files, "live/", threads=4)
                rounds[0] += 1
        except Exception as e:  # reported below, with the test's own assertion
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        pack(s3server, bucket, "live", "--pack-size", "256K")
        done = rounds[0]
        # After a listing TTL the mount finds the index and reads from the packs.
        assert wait_until(lambda: m.stats().get("packs.packed_opens", 0) > 0 and rounds[0] > done + 1
                          or errors, 120)
    finally:
        stop.set()
        t.join(120)
    assert not errors, errors[0]
    assert not os.path.exists(m.path / ".tieredfs")


def walk(root) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = read_uncached(p)
    return out


def test_mount_below_a_packed_prefix_and_listing_from_index(s3, s3server, bucket, mount_factory):
    files = small_tree("data/", 240, seed=4)
    files["data/d1/big.bin"] = random.randbytes(3000)  # over --max-file-size: listed, not packed
    files["data/d1/empty"] = b""  # 0 bytes: never packed
    upload(s3, bucket, files)
    pack(s3server, bucket, "data", "--max-file-size", "2K")
    packed = {k for k, v in files.items() if 0 < len(v) <= 2048}
    below = {k: v for k, v in files.items() if k.startswith("data/d1/")}

    # A mount below the packed prefix finds its packs through the pointer above its root.
    m = mount_factory(bucket, prefix="data/d1")
    assert walk(m.path) == {k[len("data/d1/"):]: v for k, v in below.items()}
    assert m.stats()["packs.packed_opens"] == len(below.keys() & packed) > 0
    m.stop()

    # Listed from the index: no LIST below the packed prefix, every object (packed or not).
    added = {"data/d1/e0/added-after-pack": b"new"}
    upload(s3, bucket, added)
    s3server.reset_counts()
    m = mount_factory(bucket, "--listing-from-index")
    assert walk(m.path / "data") == {k[len("data/"):]: v for k, v in files.items()}
    counts = s3server.counts()
    assert counts["LIST"] <= 2, counts  # the bucket root, and data/ (where .tieredfs/ shows)
    assert m.stats()["packs.index_listings"] == 5 + 15  # d*, d*/e*
    assert m.stats()["packs.packed_opens"] == len(packed)
    # The trade: an object added since the pack is not seen until the next pack...
    assert not os.path.exists(m.path / "data/d1/e0/added-after-pack")
    out = pack(s3server, bucket, "data", "--max-file-size", "2K").stdout
    assert "packed 1 files" in out
    # ...and then by a new daemon. (A restart on the same cache dir within --list-ttl trusts
    # its kept listings, docs/namespace.md: the new pointer is seen after the TTL.)
    m.stop()
    m = mount_factory(bucket, "--listing-from-index")
    assert read_uncached(m.path / "data/d1/e0/added-after-pack") == b"new"

    # Mounted below the packed prefix with --listing-from-index: no LIST at all.
    s3server.reset_counts()
    m2 = mount_factory(bucket, "--listing-from-index", prefix="data/d1")
    assert walk(m2.path) == {k[len("data/d1/"):]: v for k, v in (below | added).items()}
    assert s3server.counts()["LIST"] == 0


def test_gc_keeps_what_a_node_may_still_read_and_deletes_the_rest(s3, s3server, bucket, mount_factory,
                                                                  tmp_path):
    files = small_tree("g/", 60, seed=5)
    upload(s3, bucket, files)
    pack(s3server, bucket, "g", "--pack-size", "64K")
    m = mount_factory(bucket, "--list-ttl", "3600", prefix="g")  # keeps the first index
    read_all(m.path, files, "g/")
    changed = sorted(files)[:10]
    for round_ in (1, 2):  # the same ten twice: the second run's pack replaces the first's
        files.update({k: f"round {round_} of {k}".encode() for k in changed})
        upload(s3, bucket, {k: files[k] for k in changed})
        assert "packed 10 files" in pack(s3server, bucket, "g", "--pack-size", "64K").stdout
    orphan = "g/.tieredfs/packs/29991231T000000-deadbeef-00000.pack"  # a packer still running
    s3.put_object(Bucket=bucket, Key=orphan, Body=b"x")
    stored = lambda: keys(s3, bucket, "g/.tieredfs/")
    before = stored()
    versions_before = sorted(k for k in before if k.endswith(".sqlite"))
    versions = lambda: sorted(k for k in stored() if k.endswith(".sqlite"))
    assert len(versions()) == 3
    named = {k for (k,) in index_of(s3, bucket, "g/", tmp_path).execute("SELECT key FROM packs")}
    unneeded = {k for k in before if k.endswith(".pack")} - named
    assert orphan in unneeded and len(unneeded) >= 2  # at least the first round's pack

    # Within the grace period nothing a node may hold goes, nor the running packer's pack.
    out = pack(s3server, bucket, "g", "--gc", "--keep-versions", "0").stdout
    assert "gc: deleted 0 index versions and 0 packs" in out and stored() == before
    # Last-Modified is in whole seconds (maybe rounded up): let "grace 0" pass for every object.
    newest = max(o["LastModified"].timestamp()
                 for o in s3.list_objects_v2(Bucket=bucket, Prefix="g/.tieredfs/")["Contents"])
    time.sleep(max(0.0, newest + 1.1 - time.time()))
    out = pack(s3server, bucket, "g", "--gc", "--keep-versions", "0", "--gc-grace", "0", "--dry-run").stdout
    assert f"gc: would delete 2 index versions and {len(unneeded)} packs" in out and stored() == before
    out = pack(s3server, bucket, "g", "--gc", "--keep-versions", "0", "--gc-grace", "0").stdout
    assert f"gc: deleted 2 index versions and {len(unneeded)} packs" in out, out
    assert len(versions()) == 1
    # Each unneeded pack went with its manifest (the orphan has none); the rest stayed.
    after = stored()
    assert {k for k in before if k not in after} == \
        unneeded | {k[:-5] + ".json" for k in unneeded - {orphan}} | set(versions_before[:2])

    # The node still on the first index (and its hour-old listing) reads the files that did
    # not change, and a new node reads every file from the packs the current index names.
    read_all(m.path, {k: v for k, v in files.items() if k not in changed}, "g/")
    fresh = mount_factory(bucket, prefix="g")
    read_all(fresh.path, files, "g/")
    stats = fresh.stats()
    assert stats["packs.packed_opens"] == 60 and stats.get("packs.pack_read_failures", 0) == 0
    bad = pack(s3server, bucket, "g", "--gc", "--gc-grace", "soon", check=False)
    assert bad.returncode == 2 and "gc-grace" in bad.stderr and bad.stderr.count("\n") == 1


def test_run_names_sort_in_the_order_runs_began(monkeypatch):
    """pack --gc takes name order for age. Two runs begun within one second (here 1 us
    apart; the clock and the random part are set, as a real clock cannot be made to do
    this on demand) sort in the order they began, whatever their random parts."""
    import uuid

    from tieredfs import packer

    names = []
    for ns, random_part in ((1_700_000_000_000_001_000, "f" * 32), (1_700_000_000_000_002_000, "0" * 32)):
        monkeypatch.setattr(packer.time, "time_ns", lambda ns=ns: ns)
        monkeypatch.setattr(packer.uuid, "uuid4", lambda h=random_part: uuid.UUID(h))
        names.append(packer.Packer(None, "p/", packer.PackOptions()).run_id)
    assert names == sorted(names) and names[0] != names[1]


def test_a_source_changed_since_the_listing_is_left_out_of_its_pack(s3, s3server, bucket):
    """The packer fetches each source by the ETag it listed: one changed since (here: listed
    with an ETag it no longer has) is skipped, and the pack holds the others back to back."""
    from tqdm import tqdm

    from tieredfs.packer import Packer, PackOptions
    from tieredfs.stats import Counters
    from tieredfs.tiers.s3 import ListedObject, S3Backend

    files = {"p/a": b"A" * 1000, "p/b": b"B" * 3000, "p/c": b"C" * 2000}
    upload(s3, bucket, files)
    listed = [ListedObject(k, len(v), 0, s3.head_object(Bucket=bucket, Key=k)["ETag"].strip('"'))
              for k, v in files.items()]
    listed[1] = ListedObject("p/b", 3000, 0, "0" * 32)  # b changed after it was listed
    backend = S3Backend(bucket, endpoint_url=s3server.url, region=None, max_requests=4, connect_timeout=2,
                        read_timeout=10, max_attempts=2, deadline=30, counters=Counters("s3"))
    try:
        with ThreadPoolExecutor(2) as pool, tqdm(disable=True) as bar:
            pack_made, rows = Packer(backend, "p/", PackOptions())._write_pack(0, listed, pool, bar)
    finally:
        backend.close()
    assert [(path, offset) for path, _, _, offset, _ in rows] == [("a", 0), ("c", 1000)]
    stored = s3.get_object(Bucket=bucket, Key=pack_made.key)["Body"].read()
    assert stored == files["p/a"] + files["p/c"] and pack_made.size == 3000
