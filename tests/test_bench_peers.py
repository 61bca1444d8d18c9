"""The peer machinery of the bench (python -m bench --peers), cheaply: the short tables and
the docs update on recorded rows, a peer that cannot mount, and one real peer mount (rclone
mount against the moto server) reading a small file, first from S3, then from its own cache.
The speeds themselves are measured by the bench, not here."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is not a package of the install

from bench import peers, report_short, workloads_peers  # noqa: E402
from bench.context import MODES, Run  # noqa: E402
from bench.mounts import _mounted, drop_file_cache  # noqa: E402
from bench.servers import Endpoint  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# Values as a run records them (bench/workloads_peers.py), s3fs unable to mount.
RECORDED = {
    "tieredfs": {"seq_cold": 590, "seq_warm": 500, "small_cold": 200, "small_warm": 2900,
                 "rand4k": 5400, "ready": 0.5, "rss": 190},
    "rclone": {"seq_cold": 120, "seq_warm": 630, "small_cold": 700, "small_warm": 2600,
               "rand4k": 5000, "ready": 0.14, "rss": 140},
    "juicefs": {"seq_cold": 250, "seq_warm": 740, "small_cold": 900, "small_warm": 4700,
                "rand4k": 8200, "ready": 0.29, "rss": 81},
}


def recorded_result(tmp_path) -> dict:
    run = Run(MODES["tiny"], tmp_path, Endpoint("http://127.0.0.1:9"), "", None, "1M")
    for tool in workloads_peers.TOOLS:
        for key, what, unit, _ in workloads_peers.ROWS:
            value = RECORDED.get(tool, {}).get(key)
            note = {} if value is not None else {"note": "s3fs not found (apt-get install s3fs)"}
            run.record("peers", f"{key}.{tool}", f"{tool}: {what}", unit, value, kind="peer",
                       tool=tool, row=key, **note)
    run.record("seq", "boto3", "boto3 ranged GETs", "MiB/s", 800)
    run.record("seq", "cold", "tieredfs cold", "MiB/s", 600, kind="tieredfs", vs="seq.boto3")
    run.record("mount", "nullfs", "no-op fs", "s", 0.25)
    run.record("mount", "empty", "tieredfs, empty cache", "s", 0.5, kind="tieredfs")
    machine = {"loadavg_at_start": (3.0, 0, 0), "loadavg_at_end": (4.0, 0, 0), "nproc": 2}
    meta = {"command": "python -m bench --peers --quick", "started": "2026-12-07T04:00:00Z",
            "git": "abc", "machine": machine, "mode": "quick", "s3_latency_ms": 0}
    return {"meta": meta, "rows": run.rows}


def test_the_peer_table_compares_tieredfs_with_the_best_peer(tmp_path):
    result = recorded_result(tmp_path)
    lines = report_short.peers_markdown(result).splitlines()
    assert lines[0].startswith("| | tieredfs | rclone mount (vfs full) | s3fs (use_cache) | JuiceFS")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    # Higher is better: tieredfs over the best peer; lower is better: the best peer over tieredfs.
    assert rows["cold sequential (fio 1 MiB), MiB/s"].endswith("| 590 | 120 | – [1] | 250 | 2.36× |")
    assert rows["small files cold, 8 threads, files/s"].endswith("| 0.22× |")  # 200 / 900
    assert rows["mount ready, s"].endswith("| 0.28× |")  # 0.14 / 0.5
    assert rows["peak RSS, MiB"].endswith("| 0.43× |")  # 81 / 190
    assert "[1] s3fs: s3fs not found (apt-get install s3fs)" in lines  # one note for all its rows
    summary = report_short.summary_markdown(result)
    assert "| cold sequential read (S3) | 600 MiB/s | boto3 ranged GETs: 800 MiB/s | 0.75× |" in summary
    assert "| mount ready, empty cache | 0.5 s | no-op fs: 0.25 s | 2.00× (lower is better) |" in summary


def test_update_docs_rewrites_only_its_own_sections(tmp_path):
    result = recorded_result(tmp_path)
    doc = tmp_path / "benchmarks.md"
    keep = "# Benchmarks\n\nText a person wrote.\n"
    doc.write_text(keep + "<!-- bench:begin summary-quick -->\nOLD-BODY\n<!-- bench:end summary-quick -->\n"
                   "between\n<!-- bench:begin peers-quick -->\nOLD-BODY\n<!-- bench:end peers-quick -->\n"
                   "<!-- bench:begin peers-quick+20ms -->\nother run\n<!-- bench:end peers-quick+20ms -->\n")
    png = tmp_path / "run-peers.png"
    report_short.peers_chart(result, png)
    assert png.stat().st_size > 1000
    written = report_short.update_docs(result, "quick", png, doc)
    text = doc.read_text()
    assert written == ["summary-quick", "peers-quick"]
    assert text.startswith(keep) and "\nbetween\n" in text and "other run" in text
    assert "OLD-BODY" not in text and text.count("| 590 | 120 |") == 1
    assert "load average 3.0 at start, 4.0 at the end" in text
    assert (tmp_path / "benchmarks-peers-quick.png").read_bytes() == png.read_bytes()


def test_a_peer_that_cannot_mount_gets_rows_saying_why(tmp_path):
    run = Run(MODES["tiny"], tmp_path, Endpoint("http://127.0.0.1:9"), "", None, "1M")

    def missing():
        raise peers.PeerUnavailable("s3fs not found (apt-get install s3fs)")

    workloads_peers._measure_tool(run, "s3fs", missing, None)
    assert [r["row"] for r in run.rows] == [k for k, *_ in workloads_peers.ROWS]
    assert all(r["value"] is None and r["note"].startswith("s3fs not found") for r in run.rows)
    json.dumps(run.rows)  # the results file holds them


def test_rclone_mounts_the_bucket_reads_a_file_then_serves_it_from_its_cache(
        s3server, bucket, put, tmp_path):
    try:
        peers.binary("rclone")
    except peers.PeerUnavailable as e:
        pytest.skip(str(e))  # installed with the bench extra (scripts/dev.sh installs it)
    data = put("dir/small", os.urandom(40_000))
    target = peers.Target(s3server.url, bucket, tmp_path)
    m = peers.rclone(target, tmp_path / "mnt", tmp_path / "cache", tmp_path / "rclone.log")
    try:
        m.start()
        assert m.ready_seconds > 0 and m.peak_rss_bytes() > 1 << 20
        before = s3server.counts()
        assert (m.path / "dir" / "small").read_bytes() == data
        gets = s3server.counts()["GET"] - before["GET"]
        assert gets >= 1  # from S3 (listings and the object)
        workloads_peers._own_cache_only(m, ["dir/small"])
        cached = [p for p in (m.cache_dir / "vfs").rglob("small") if p.is_file()]
        assert cached and cached[0].read_bytes() == data  # rclone's vfs cache holds it whole
        before = s3server.counts()
        drop_file_cache(m.path / "dir" / "small")
        assert (m.path / "dir" / "small").read_bytes() == data
        assert s3server.counts()["GET"] - before["GET"] == 0
    finally:
        m.stop()
    assert not _mounted(m.path)
    assert m.proc.poll() is not None


def test_peers_is_chosen_on_the_command_line_and_checked():
    from bench.__main__ import parse_args, selected

    assert "peers" not in selected(parse_args(["--quick"]))
    args = parse_args(["--quick", "--peers"])
    assert selected(args)[-1] == "peers" and "small" in selected(args)
    assert args.peers.split(",") == list(workloads_peers.TOOLS)
    assert selected(parse_args(["--only", "seq", "--peers", "tieredfs,s3fs"])) == ["seq", "peers"]
    with pytest.raises(SystemExit):
        parse_args(["--peers", "rclone,goofys"])
