"""Tier 2 through real mounts: several daemons on this host share one plain directory,
standing in for an NFS share (this machine has no kernel NFS client). Data GETs are
counted on the S3 server. A read-only bind mount, a small tmpfs, a removed directory and
a FUSE passthrough whose server is stopped (tests/passthrough.py) stand in for a
read-only, full, vanished and hung share.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import deadline_call, read_uncached, tieredfs_cmd, unmount
from tieredfs.devserver import wait_until
from tieredfs.tiers.shared_format import TEMP_PREFIX, decode

K = 1024
BS = 64 * K
# No walk prefetch: each test counts the blocks its own reads fetch and publish.
SMALL = ("--block-size", "64K", "--dir-prefetch", "0")


def node(mount_factory, bucket, shared: Path, *extra: str):
    return mount_factory(bucket, *SMALL, "--shared-dir", str(shared), *extra)


def settle(*mounts) -> None:
    """Every fetched block written to tier 1 and published to the shared dir."""
    for m in mounts:
        m.settle()
        assert wait_until(lambda: m.stats().get("shared.publish_queue_bytes", 0) == 0, 30)


def block_files(shared: Path, namespace: str) -> list[Path]:
    return [p for p in (shared / namespace / "blocks").rglob("*")
            if p.is_file() and not p.name.startswith(TEMP_PREFIX)]


def used_bytes(shared: Path, namespace: str) -> int:
    total = 0
    for p in block_files(shared, namespace):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def shared_cli(*args: str, check: bool = True):
    done = subprocess.run(tieredfs_cmd("shared", *args), capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def gets(s3server) -> tuple[int, int]:
    c = s3server.counts()
    return c.get("GET", 0), c.get("GET_BYTES", 0)


def read_all(m, dataset: dict) -> None:
    for key, data in dataset.items():
        assert read_uncached(m.path / key) == data, key


def test_second_node_reads_with_zero_gets(bucket, put, mount_factory, s3server, tmp_path):
    shared = tmp_path / "shared"
    dataset = {"a.bin": put("a.bin", os.urandom(5 * BS + 123)),
               "d/b.bin": put("d/b.bin", os.urandom(3 * BS)), "tiny": put("tiny", b"x" * 100)}
    a = node(mount_factory, bucket, shared)
    read_all(a, dataset)
    settle(a)
    assert a.stats()["shared.publishes"] == 10
    s3server.reset_counts()
    b = node(mount_factory, bucket, shared)
    read_all(b, dataset)
    assert gets(s3server) == (0, 0)
    settle(b)
    stats = b.stats()
    assert stats["chain.hits.shared"] == 10 and stats["local.fills"] == 10  # copied into tier 1
    check = json.loads(shared_cli("check", "--shared-dir", str(shared)).stdout)
    assert check == [{"namespace": bucket, "checked": 10, "corrupt": 0, "dropped": 0, "corrupt_ids": []}]
    report = json.loads(shared_cli("gc", "--shared-dir", str(shared), "--namespace", bucket).stdout)
    assert report[0]["blocks"] == 10 and report[0]["evicted"] == 0
    info = json.loads(shared_cli("info", "--shared-dir", str(shared)).stdout)
    assert info[0]["blocks"] == 10 and info[0]["journal_bytes_unread"] == 0


def test_three_cold_nodes_fetch_about_once(bucket, put, mount_factory, s3server, tmp_path):
    data = put("big.bin", os.urandom(32 * BS))
    opts = ("--request-size", "256K")
    s3server.reset_counts()
    alone = mount_factory(bucket, *SMALL, *opts)
    assert read_uncached(alone.path / "big.bin") == data
    one_node = gets(s3server)
    nodes = [node(mount_factory, bucket, tmp_path / "shared", *opts) for _ in range(3)]
    s3server.reset_counts()
    results = [None] * 3

    def read(i):
        results[i] = read_uncached(nodes[i].path / "big.bin")

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r == data for r in results)
    count, nbytes = gets(s3server)
    assert count <= 1.5 * one_node[0] and nbytes <= 1.5 * len(data), (count, nbytes, one_node)
    # Without leases three nodes cold at once each fetch it all (3x); with them, the blocks
    # one node fetched the others read from the share, most after waiting for its publish.
    assert sum(m.stats().get("chain.hits.shared", 0) for m in nodes) >= 32


def test_bad_blocks_are_detected_and_refetched(bucket, put, mount_factory, s3server, tmp_path):
    shared = tmp_path / "shared"
    data = put("f.bin", os.urandom(8 * BS))
    a = node(mount_factory, bucket, shared)
    assert read_uncached(a.path / "f.bin") == data
    settle(a)
    by_index = {decode(p.read_bytes(), None)[0]["index"]: p for p in block_files(shared, bucket)}
    truncated, flipped, swap1, swap2 = by_index[1], by_index[2], by_index[4], by_index[6]
    os.truncate(truncated, truncated.stat().st_size - 100)
    raw = bytearray(flipped.read_bytes())
    raw[-5] ^= 0x01
    flipped.write_bytes(raw)
    tmp = swap1.with_name("swap")
    os.rename(swap1, tmp)
    os.rename(swap2, swap1)
    os.rename(tmp, swap2)
    check = shared_cli("check", "--shared-dir", str(shared), check=False)
    assert check.returncode == 1 and json.loads(check.stdout)[0]["corrupt"] == 4
    s3server.reset_counts()
    b = node(mount_factory, bucket, shared)
    assert read_uncached(b.path / "f.bin") == data
    assert gets(s3server)[1] == 4 * BS  # only the four bad blocks came again from S3
    stats = b.stats()
    assert stats["shared.corrupt"] == 4 and stats["shared.corrupt_foreign"] == 2
    settle(b)  # republished
    assert json.loads(shared_cli("check", "--shared-dir", str(shared)).stdout)[0]["corrupt"] == 0


def test_quota_holds_with_three_publishers_and_two_collectors(bucket, put, mount_factory, tmp_path):
    shared = tmp_path / "shared"
    quota = 16 * BS + 16 * 512  # sixteen blocks with their headers
    files = {f"f{i}.bin": put(f"f{i}.bin", os.urandom(16 * BS)) for i in range(3)}
    nodes = [node(mount_factory, bucket, shared, "--shared-quota", str(quota)) for _ in range(3)]
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], used_bytes(shared, bucket))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        readers = [threading.Thread(target=read_all, args=(m, {k: v}))
                   for m, (k, v) in zip(nodes, files.items())]
        for t in readers:
            t.start()
        for t in readers:
            t.join(120)
        settle(*nodes)
    finally:
        stop.set()
        sampler.join()
    # Between collector passes a node publishes at most 1/16 of the quota on its own
    # (docs/shared-tier.md): three nodes at once overshoot by at most 3/16.
    assert 0 < peak[0] <= quota + 3 * (quota // 16), (peak[0], quota)
    assert sum(m.stats().get("shared.publishes", 0) for m in nodes) >= 16
    for m in nodes:
        m.stop()
    before = len(block_files(shared, bucket))
    gcs = [subprocess.Popen(tieredfs_cmd("shared", "gc", "--shared-dir", str(shared), "--quota", str(8 * BS)),
                            stdout=subprocess.PIPE, text=True) for _ in range(2)]
    reports = [json.loads(p.communicate(timeout=60)[0])[0] for p in gcs]
    assert all(p.returncode == 0 for p in gcs)
    evicted = sum(r.get("evicted", 0) for r in reports)
    assert evicted > 0 and before - len(block_files(shared, bucket)) == evicted  # none twice
    assert used_bytes(shared, bucket) <= 8 * BS
    assert json.loads(shared_cli("check", "--shared-dir", str(shared)).stdout)[0]["corrupt"] == 0


@pytest.fixture
def degraded(tmp_path):
    """Directories to mount over, unmounted at the end whatever happens."""
    mounted: list[Path] = []

    def mount(*args: str, target: Path) -> Path:
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", *args, str(target)], check=True, capture_output=True, timeout=30)
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


def test_read_only_full_and_vanished_shares_still_serve(bucket, put, mount_factory, s3server, tmp_path,
                                                      degraded):
    warm = put("warm.bin", os.urandom(4 * BS))
    cold = {f"c{i}.bin": put(f"c{i}.bin", os.urandom(6 * BS)) for i in range(3)}
    shared = tmp_path / "shared"
    a = node(mount_factory, bucket, shared)
    assert read_uncached(a.path / "warm.bin") == warm
    settle(a)
    ro = degraded("--bind", str(shared), target=tmp_path / "ro")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, timeout=30)
    full = degraded("-t", "tmpfs", "-o", "size=128k", "tmpfs", target=tmp_path / "full")
    gone = tmp_path / "gone"
    cases = {"ro": ro, "full": full, "gone": gone}
    nodes = {name: node(mount_factory, bucket, path, "--read-deadline", "20") for name, path in cases.items()}
    s3server.reset_counts()
    assert deadline_call(lambda: read_uncached(nodes["ro"].path / "warm.bin"), 20) == warm
    assert gets(s3server) == (0, 0)  # a read-only share still serves what it has
    assert wait_until(lambda: (gone / bucket / "blocks").exists(), 10)
    subprocess.run(["rm", "-rf", str(gone)], check=True)
    for i, (name, m) in enumerate(nodes.items()):
        key = f"c{i}.bin"
        assert deadline_call(lambda: read_uncached(m.path / key), 20) == cold[key], name
        settle(m)
        stats = m.stats()
        assert stats.get("shared.write_failures", 0) + stats.get("shared.publish_failures", 0) > 0, name
    assert not gone.exists()  # a vanished share is not re-created under its mount point


@pytest.fixture
def hung_share(tmp_path):
    """A passthrough FUSE mount of a plain dir, and a switch that stops its server."""
    source, mnt = tmp_path / "nfs-server", tmp_path / "nfs"
    source.mkdir()
    mnt.mkdir()
    server = Path(__file__).parent / "passthrough.py"
    proc = subprocess.Popen([sys.executable, str(server), str(source), str(mnt)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "READY" and wait_until(lambda: os.path.ismount(mnt), 10)
    yield mnt, lambda: os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGCONT)  # first, so that everything blocked on it can unwind
    unmount(mnt)  # its server then exits by itself; SIGKILL in case it hangs
    proc.kill()
    proc.wait(10)
    unmount(mnt, lazy=True)


def test_hung_share_is_bypassed_within_the_read_deadline(bucket, put, mount_factory, hung_share):
    mnt, freeze = hung_share
    first = put("first.bin", os.urandom(4 * BS))
    later = {f"l{i}.bin": put(f"l{i}.bin", os.urandom(4 * BS)) for i in range(3)}
    m = node(mount_factory, bucket, mnt, "--shared-timeout", "1", "--read-deadline", "15")
    assert read_uncached(m.path / "first.bin") == first
    settle(m)
    assert m.stats()["shared.publishes"] == 4  # the share worked before it hung
    freeze()
    for key, data in later.items():
        assert deadline_call(lambda: read_uncached(m.path / key), 15) == data, key
    assert deadline_call(lambda: read_uncached(m.path / "first.bin"), 15) == first  # tier 1
    stats = m.stats()
    assert stats["shared.timeouts"] > 0 and stats["shared.bypassed"] > 0
    assert stats["shared.bypassed_reads"] == 1
    assert "event=shared_tier_bypassed" in m.log.read_text()


def test_sigkill_mid_publish_leaves_nothing_served(bucket, put, mount_factory, s3server, tmp_path):
    shared = tmp_path / "shared"
    data = put("f.bin", os.urandom(32 * BS))
    a = node(mount_factory, bucket, shared, "--request-size", "64K")

    def read_until_killed():
        try:
            read_uncached(a.path / "f.bin")
        except OSError:
            pass  # ENOTCONN: the daemon is gone

    reader = threading.Thread(target=read_until_killed)
    reader.start()
    assert wait_until(lambda: a.stats().get("shared.publishes", 0) >= 4, 60)
    a.kill()
    reader.join(30)
    assert len(block_files(shared, bucket)) < 32, "killed after its publishes finished: nothing was tested"
    s3server.reset_counts()
    b = node(mount_factory, bucket, shared, "--shared-lease-wait", "1")
    assert read_uncached(b.path / "f.bin") == data
    stats = b.stats()
    assert stats.get("shared.corrupt", 0) == 0 and stats.get("chain.hits.shared", 0) >= 4
    assert json.loads(shared_cli("check", "--shared-dir", str(shared)).stdout)[0]["corrupt"] == 0


def test_namespaces_are_isolated(bucket, put, mount_factory, s3server, tmp_path):
    shared = tmp_path / "shared"
    data = put("f.bin", os.urandom(3 * BS))
    a = node(mount_factory, bucket, shared, "--shared-namespace", "alpha")
    assert read_uncached(a.path / "f.bin") == data
    settle(a)
    s3server.reset_counts()
    b = node(mount_factory, bucket, shared, "--shared-namespace", "beta")
    assert read_uncached(b.path / "f.bin") == data
    assert gets(s3server)[1] == len(data) and b.stats().get("chain.hits.shared", 0) == 0
    settle(b)
    assert len(block_files(shared, "alpha")) == len(block_files(shared, "beta")) == 3
    names = [r["namespace"] for r in json.loads(shared_cli("info", "--shared-dir", str(shared)).stdout)]
    assert names == ["alpha", "beta"]
