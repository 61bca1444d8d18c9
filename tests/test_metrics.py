"""Seeing the cache: the Prometheus endpoint and `tieredfs stats` against a real mount.

The endpoint is scraped over real HTTP and parsed with prometheus_client's own parser; GETs
are counted on the S3 server, so the metrics are checked against what S3 really served.
"""

import json
import os
import socket
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import read_uncached, tieredfs_cmd
from tieredfs.devserver import free_port

K = 1024
SMALL = ("--block-size", "64K")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from a real scrape of the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_metrics_move_by_what_reads_did(bucket, put, mount_factory, s3server):
    data = put("a.bin", os.urandom(256 * K))  # 4 blocks of 64 KiB
    port = free_port()
    m = mount_factory(bucket, *SMALL, "--metrics-addr", f"127.0.0.1:{port}")
    s3server.reset_counts()
    before = scrape(port)

    assert read_uncached(m.path / "a.bin") == data
    m.settle()
    cold = scrape(port)
    gets = s3server.counts()["GET"]
    assert gets >= 1
    assert moved(before, cold, "tieredfs_s3_requests_total", type="get", status="ok") == gets
    assert moved(before, cold, "tieredfs_tier_hits_total", tier="s3") == 4
    assert moved(before, cold, "tieredfs_tier_bytes_total", tier="s3") == len(data)
    assert moved(before, cold, "tieredfs_fuse_read_bytes_total") == len(data)
    assert moved(before, cold, "tieredfs_fuse_read_seconds_count") >= 1
    assert (moved(before, cold, "tieredfs_fuse_requests_total", op="read")
            == moved(before, cold, "tieredfs_fuse_read_seconds_count"))
    assert moved(before, cold, "tieredfs_fuse_requests_total", op="open") == 1
    assert moved(before, cold, "tieredfs_tier_get_seconds_count", tier="s3") == gets
    assert cold[("tieredfs_cache_used_bytes", ())] == len(data)
    assert cold[("tieredfs_cache_capacity_bytes", ())] > len(data)
    assert cold[("tieredfs_readahead_inflight_bytes", ())] == 0
    assert cold[("tieredfs_tier_up", (("tier", "local"),))] == 1
    assert cold[("tieredfs_tier_up", (("tier", "s3"),))] == 1
    # Histogram buckets are cumulative and end at +Inf = count.
    assert (cold[("tieredfs_fuse_read_seconds_bucket", (("le", "+Inf"),))]
            == cold[("tieredfs_fuse_read_seconds_count", ())])

    assert read_uncached(m.path / "a.bin") == data  # now from tier 1
    warm = scrape(port)
    assert s3server.counts()["GET"] == gets
    assert moved(cold, warm, "tieredfs_tier_hits_total", tier="local") == 4
    assert moved(cold, warm, "tieredfs_tier_bytes_total", tier="local") == len(data)
    assert moved(cold, warm, "tieredfs_tier_get_seconds_count", tier="local") == 4
    assert moved(cold, warm, "tieredfs_s3_requests_total", type="get", status="ok") == 0


def test_metrics_addr_is_checked(tmp_path):
    done = subprocess.run(tieredfs_cmd("mount", "s3://some-bucket", str(tmp_path), "--metrics-addr", "9464"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "metrics-addr '9464' must be HOST:PORT" in done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_port_taken_is_one_line(bucket, s3server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(tieredfs_cmd("mount", f"s3://{bucket}", str(tmp_path), "--foreground",
                                           "--endpoint-url", s3server.url, "--cache-dir", str(tmp_path / "c"),
                                           "--metrics-addr", f"127.0.0.1:{port}"),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"tieredfs: error: cannot serve metrics on 127.0.0.1:{port}: " in done.stderr
    assert "Traceback" not in done.stderr and not os.path.ismount(tmp_path)


def test_stats_table_json_and_watch(bucket, put, mount_factory):
    data = put("a.bin", os.urandom(128 * K))
    m = mount_factory(bucket, *SMALL)
    assert read_uncached(m.path / "a.bin") == data
    m.settle()

    shape = json.loads(subprocess.run(tieredfs_cmd("stats", "--json", str(m.path)), capture_output=True,
                                      text=True, check=True, timeout=60).stdout)
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in shape.items())
    assert shape["chain.hits.s3"] == 2 and shape["fs.read_bytes"] == len(data)
    assert shape["s3.requests.get"] >= 1 and "local.used_bytes" in shape

    table = subprocess.run(tieredfs_cmd("stats", str(m.path)), capture_output=True, text=True,
                           check=True, timeout=60).stdout
    assert "tier" in table and "s3" in table and "128.0 KiB" in table

    watch = subprocess.run(tieredfs_cmd("stats", str(m.path), "--watch", "0.3", "--count", "2"),
                           capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert len(watch) == 3, watch
    header, *rows = watch
    assert header.split()[:2] == ["reads/s", "MiB/s"] and "GET/s" in header
    for row in rows:
        values = [float(v) for v in row.split()]
        assert len(values) == len(header.split()) and min(values) >= 0


def test_stats_of_a_plain_directory_is_one_line(tmp_path):
    done = subprocess.run(tieredfs_cmd("stats", str(tmp_path)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("tieredfs: error:") and "not a tieredfs mount" in done.stderr
