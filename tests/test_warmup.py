"""Steering the cache: `tieredfs warmup`, and record on one mount / replay on another.

Real mounts of moto's server; GETs are counted on the server. A read that must reach the
daemon drops the kernel's page cache of the file first (read_uncached).
"""

import json
import os
import re
import stat
import subprocess

from conftest import read_uncached, tieredfs_cmd

K = 1024
SMALL = ("--block-size", "64K")


def warmup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(tieredfs_cmd("warmup", *args), capture_output=True, text=True, timeout=120)


def gets(s3server) -> int:
    return s3server.counts().get("GET", 0)


def test_warmup_then_reads_cost_no_get(bucket, put, mount_factory, s3server):
    files = {f"d/{name}": put(f"d/{name}", os.urandom(size))
             for name, size in [("a", 200 * K), ("b", 70 * K), ("sub/c", 300 * K), ("sub/e", 0)]}
    m = mount_factory(bucket, *SMALL)
    s3server.reset_counts()

    first = warmup(str(m.path / "d"), "--recursive", "--parallel", "2")
    assert first.returncode == 0, first.stderr + first.stdout
    assert "warmed 4 of 4 files" in first.stdout and "failed" not in first.stdout
    assert "s3 " in first.stdout and gets(s3server) >= 1
    m.settle()

    s3server.reset_counts()
    second = warmup(str(m.path / "d"), "-r")
    assert second.returncode == 0, second.stderr
    assert gets(s3server) == 0 and "S3 GETs: 0" in second.stdout  # idempotent: all from tier 1
    assert "local 11 blocks (570.0 KiB)" in second.stdout  # 4 + 2 + 5 + 0 blocks of 64 KiB

    for key, data in files.items():
        assert read_uncached(m.path / key) == data
    assert gets(s3server) == 0


def test_warmup_reports_what_failed(bucket, put, mount_factory, s3, s3server):
    put("d/ok", os.urandom(100 * K))
    put("d/gone", os.urandom(100 * K))
    m = mount_factory(bucket, *SMALL)
    assert sorted(os.listdir(m.path / "d")) == ["gone", "ok"]  # listed, then deleted on S3
    s3.delete_object(Bucket=bucket, Key="d/gone")

    done = warmup(str(m.path / "d"), "-r", str(m.path / "nothing-here"))
    assert done.returncode == 1
    assert "warmed 1 of 2 files" in done.stdout
    assert f"{m.path / 'd' / 'gone'}: " in done.stdout
    assert f"{m.path / 'nothing-here'}: No such file or directory" in done.stdout
    assert "Traceback" not in done.stderr


def test_directory_without_recursive_is_a_failure(bucket, put, mount_factory):
    put("d/a", b"x" * 1000)
    m = mount_factory(bucket)
    done = warmup(str(m.path / "d"))
    assert done.returncode == 1 and "is a directory (add --recursive)" in done.stdout


def _read_ranges(path, ranges) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return b"".join(os.pread(fd, n, off) for off, n in ranges)
    finally:
        os.close(fd)


def test_record_on_one_mount_replay_on_another(bucket, put, mount_factory, s3, s3server, tmp_path):
    job = {"job/x": put("job/x", os.urandom(400 * K)), "job/y": put("job/y", os.urandom(150 * K))}
    other = put("elsewhere/z", os.urandom(200 * K))
    rec = tmp_path / "job.rec"

    a = mount_factory(bucket, *SMALL, "--record", str(rec))
    for key, data in job.items():
        assert read_uncached(a.path / key) == data
    a.stop()  # the recording is complete once the daemon has stopped
    assert stat.S_IMODE(rec.stat().st_mode) == 0o600  # it names a private bucket's keys
    lines = [json.loads(line) for line in rec.read_text().splitlines()]
    assert lines[0] == {"tieredfs_record": 1, "bucket": bucket, "prefix": "", "block_size": 64 * K}
    objects = {o["key"]: o for o in lines[1:] if isinstance(o, dict)}
    blocks = [(obj, i) for r in lines[1:] if isinstance(r, list) for obj, first, last in [r]
              for i in range(first, last + 1)]
    assert set(objects) == set(job)
    x, y = objects["job/x"]["object"], objects["job/y"]["object"]
    assert blocks == [(x, i) for i in range(7)] + [(y, i) for i in range(3)]  # in order, once each

    b = mount_factory(bucket, *SMALL)  # another node: its own cache
    done = warmup("--replay", str(rec), str(b.path))
    assert done.returncode == 0, done.stderr + done.stdout
    assert re.search(r"warmed (\d+) of \1 runs", done.stdout), done.stdout
    b.settle()
    s3server.reset_counts()
    for key, data in job.items():
        assert read_uncached(b.path / key) == data
    assert gets(s3server) == 0  # the job's blocks, all preloaded
    assert read_uncached(b.path / "elsewhere/z") == other
    assert gets(s3server) >= 1  # and only those: the replay warmed nothing else

    s3.create_bucket(Bucket=bucket + "-2")
    c = mount_factory(bucket + "-2")
    refused = warmup("--replay", str(rec), str(c.path))
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"tieredfs: error: {rec} was recorded on bucket {bucket!r}, "
                                      f"but {c.path} serves bucket {bucket + '-2'!r}")

    put("job/y", os.urandom(150 * K))  # a new version of one object
    d = mount_factory(bucket, *SMALL)
    refused = warmup("--replay", str(rec), str(d.path))
    assert refused.returncode == 1
    assert "was recorded on other versions of 1 object(s), e.g. job/y" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_replay_file_that_is_not_one(bucket, mount_factory, tmp_path):
    m = mount_factory(bucket)
    junk = tmp_path / "junk.rec"
    junk.write_text("hello\n")
    done = warmup("--replay", str(junk), str(m.path))
    assert done.returncode == 1
    assert done.stderr.startswith(f"tieredfs: error: {junk} is not a usable replay file")


def test_record_file_runs_and_repeats(tmp_path):
    """The format's arithmetic, without a mount: runs, repeats, a flush inside a run."""
    from tieredfs.blocks import BlockRef, ObjectVersion
    from tieredfs.record import Recorder
    from tieredfs.recording import load
    from tieredfs.stats import Registry

    x, y = ObjectVersion("bkt", "p/x", "ex", 10 * K), ObjectVersion("bkt", "p/y", "ey", 10 * K)
    rec = Recorder(tmp_path / "r", "bkt", "p/", K, Registry().counters("record"))
    for obj, index in [(x, 0), (x, 0), (x, 1), (x, 2), (y, 5), (x, 2), (x, 3)]:
        rec.note([BlockRef(obj, index, K)])
    rec._write(rec._take())  # what the once-a-second flush does
    for obj, index in [(x, 3), (x, 4), (x, 9)]:
        rec.note([BlockRef(obj, index, K)])
    rec.close()

    loaded = load(tmp_path / "r")
    assert (loaded.bucket, loaded.prefix, loaded.block_size) == ("bkt", "p/", K)
    assert [(o.key, o.etag) for o in loaded.objects] == [("p/x", "ex"), ("p/y", "ey")]
    # (x, 3) right after the flush repeats the block the flushed run ended with: written once.
    assert loaded.runs == [(0, 0, 2), (1, 5, 5), (0, 2, 3), (0, 4, 4), (0, 9, 9)]
