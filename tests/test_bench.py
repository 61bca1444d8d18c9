"""The bench in its tiny mode, so it does not rot: it must run end to end against moto
(the endpoint that counts requests on the server side) and produce sane rows."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(200)  # (a loaded machine: the tiny run took 113 s once)
EXPECTED = {
    "seq.native", "seq.native_pc", "seq.nullfs", "seq.nullfs_pc", "seq.boto3", "seq.cold",
    "seq.page_cache", "seq.tier1", "rand4k.native", "rand4k.native_pc", "rand4k.nullfs",
    "rand4k.tier1", "rand4k.page_cache", "rand4k.cold", "multi4.native", "multi4.nullfs",
    "multi4.cold", "multi4.tier1", "small.native", "small.native_pc", "small.boto3", "small.cold",
    "small.page_cache", "small.tier1", "ttfb.native", "ttfb.boto3", "ttfb.cold", "ttfb.tier1",
    "mount.nullfs", "mount.empty", "mount.warm", "small.pack", "small.packed", "small.packed_index",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    if subprocess.run(["which", "fio"], capture_output=True).returncode != 0:
        pytest.skip("fio is not installed")
    out = tmp_path_factory.mktemp("bench-results")
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--server", "moto",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = out.glob("*.json")
    assert json_path.with_suffix(".md").read_text().startswith("Endpoint: **moto")
    assert json_path.with_suffix(".png").stat().st_size > 1000
    return json.loads(json_path.read_text())


def rows(result) -> dict:
    return {r["id"]: r for r in result["rows"]}


def test_every_row_is_there_with_a_positive_value(result):
    by_id = rows(result)
    assert EXPECTED <= set(by_id)
    for row_id in EXPECTED:
        assert by_id[row_id]["value"] > 0, row_id
    machine = result["meta"]["machine"]
    assert machine["nproc"] >= 1
    assert machine["new_memory_ms_per_mib_at_start"] > 0 and machine["new_memory_ms_per_mib_at_end"] > 0
    assert result["meta"]["endpoint_kind"] == "moto"


def test_reads_cover_exactly_the_dataset(result):
    by_id, ds = rows(result), result["meta"]["dataset"]
    for row_id in ("seq.native", "seq.nullfs", "seq.cold", "seq.tier1", "seq.page_cache"):
        assert by_id[row_id]["bytes"] == ds["big"] * by_id[row_id]["loops"], row_id
    for row_id in ("multi4.native", "multi4.cold", "multi4.tier1"):
        assert by_id[row_id]["bytes"] == 4 * ds["multi_each"], row_id
    for row_id in ("small.native", "small.boto3", "small.cold", "small.tier1"):
        assert by_id[row_id]["bytes"] == ds["small_bytes"], row_id
        assert by_id[row_id].get("files", ds["small_files"]) == ds["small_files"]


def test_daemon_and_server_counts_agree_and_tiers_behave(result):
    by_id, ds = rows(result), result["meta"]["dataset"]
    cold = by_id["seq.cold"]
    assert cold["daemon"]["s3_bytes"] == ds["big"]
    assert cold["server"]["GET"] == cold["daemon"]["s3_get"] > 0
    assert cold["server"]["GET_BYTES"] == ds["big"]
    for row_id in ("seq.tier1", "seq.page_cache", "rand4k.tier1", "small.tier1", "ttfb.tier1"):
        assert by_id[row_id]["daemon"]["s3_get"] == 0, row_id
        assert by_id[row_id]["server"]["GET"] == 0, row_id
    assert by_id["seq.tier1"]["daemon"]["local_hit_ratio"] == 1.0
    assert by_id["small.cold"]["daemon"]["s3_get"] == ds["small_files"]
    # Packed: the pointer, the index, and at most one GET per 1 MiB pack block.
    assert by_id["small.packed"]["server"]["GET"] <= 2 + ds["small_bytes"] // (1 << 20) + 1
    assert by_id["small.packed"]["bytes"] == ds["small_bytes"]
    # Listed from the index: the bucket root and the packed prefix itself are the only LISTs.
    assert by_id["small.packed_index"]["server"]["LIST"] <= 2
    assert by_id["small.packed_index"]["bytes"] == ds["small_bytes"]
    for row in by_id.values():
        if row["kind"] == "tieredfs":
            assert 10 << 20 < row["peak_rss_bytes"] < 2 << 30, row["id"]


def test_rows_say_where_the_cpu_went(result):
    """bench/cpu.py: the machine's and each process's CPU over each measured row."""
    by_id = rows(result)
    cold, boto3 = by_id["seq.cold"]["cpu"], by_id["seq.boto3"]["cpu"]
    assert cold["daemon_s"] > 0 and cold["server_s"] > 0
    assert cold["busy_s"] >= cold["daemon_s"] + cold["server_s"] - 0.05  # ticks are 10 ms
    assert boto3["bench_s"] > 0 and boto3["server_s"] > 0 and "daemon_s" not in boto3
    assert {"busy_s", "idle_s"} <= set(by_id["seq.native"]["cpu"])  # reference rows: the machine's
    targets = {t["what"]: t for t in result["targets"]}
    for what in ("cold sequential read from S3", "4 cold readers of 4 files (issue 6)",
                 "sequential read from tier 1"):
        assert "at this run's CPU per byte" in targets[what]["measured"], what
    # The bound from the parts a cold read cannot skip: their CPU per byte, added up.
    sys.path.insert(0, str(REPO))  # bench/ is not a package of the install
    from bench import cpu

    boto3_runs = by_id["seq.boto3"]["trials"]  # the cheapest way to GET the bytes
    parts = [min(cpu.per_gib(t["cpu"], t["bytes"])["busy"] for t in boto3_runs),
             *(cpu.per_gib(by_id[i]["cpu"], by_id[i]["bytes"])["busy"]
               for i in ("seq.nullfs", "seq.diskwrite"))]
    assert sum(parts) > 0  # a tiny run's disk write may fall between two 10 ms ticks
    bound = (os.cpu_count() or 1) * 1024 / sum(parts) / by_id["seq.boto3"]["value"]
    cold = targets["cold sequential read from S3"]
    assert cold["parts_ceiling_ratio"] == pytest.approx(bound)
    assert f"at most {bound:.2f}× for any daemon on boto3 and pyfuse3" in cold["measured"]


def test_targets_are_reported(result):
    targets = {t["what"]: t for t in result["targets"]}
    assert len(targets) == 10
    assert targets["sequential read from tier 1"]["ratio"] > 0
    assert targets["cold small files, packed vs unpacked"]["ratio"] > 0
    disk, null = rows(result)["rand4k.native"]["value"], rows(result)["rand4k.nullfs"]["value"]
    series = f"{disk / (disk + null):.2f}× if every read waited for the disk and for FUSE in turn"
    assert series in targets["4 KiB random read IOPS from tier 1"]["measured"]


def test_the_latency_proxy_delays_each_request_and_passes_bytes_intact(s3server, bucket, put):
    """bench/proxy.py in front of the moto server: right bytes, one latency per request."""
    sys.path.insert(0, str(REPO))  # bench/ is not a package of the install
    from bench.proxy import LatencyProxy

    data = put("obj", os.urandom(3 << 20))
    proxy = LatencyProxy(s3server.url, 200).start()
    try:
        client = boto3.client("s3", endpoint_url=proxy.url)
        start = time.monotonic()
        first = client.get_object(Bucket=bucket, Key="obj")["Body"].read()
        one = time.monotonic() - start
        start = time.monotonic()
        part = client.get_object(Bucket=bucket, Key="obj", Range="bytes=1000-2000999")["Body"].read()
        two = time.monotonic() - start  # a second request on the same connection
    finally:
        proxy.stop()
    assert first == data and part == data[1000:2001000]
    assert one >= 0.2 and two >= 0.2


def test_the_read_path_bench_times_reads_served_on_the_trio_thread(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.read_path", "--reads", "500", "--mib", "64",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    us, _, rest = proc.stdout.strip().partition(" us per 4 KiB read (")
    inline, _, total = rest.removesuffix(" served on the trio thread)").partition(" of ")
    assert float(us) > 0 and total == "2500"
    assert inline == "2500"  # pages in memory: every read served without a worker thread
    assert list(tmp_path.iterdir()) == []  # its cache dir is removed


def test_the_ab_bench_runs_two_builds_in_turn_and_removes_its_worktree(tmp_path):
    """bench/ab.py with a revision (its own git worktree) against this tree: a warm-up run, then
    two rounds in alternating order."""
    if subprocess.run(["which", "fio"], capture_output=True).returncode != 0:
        pytest.skip("fio is not installed")
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, "-m", "bench.ab", "HEAD", ".", "--rounds", "2", "--mib", "32",
                           "--server", "moto", "--opts-b", "--readahead-max 2M", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["build"], r["round"]) for r in result["runs"]] == [("A", 1), ("B", 1), ("B", 2), ("A", 2)]
    for run in result["runs"]:
        assert run["mib_s"] > 0 and run["bytes"] == 32 << 20 and run["s3_gets"] > 0
        assert run["cpu_per_gib"]["daemon"] > 0
        # The reader's own page-cache pages alone are one page per 4 KiB read.
        assert run["allocated_per_byte_read"] >= 0.9
    assert result["builds"][1].endswith("--readahead-max 2M")
    worktrees = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, cwd=REPO).stdout
    assert "tieredfs-ab-" not in worktrees
